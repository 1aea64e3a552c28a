"""ONNX export: every family, tiny checkpoints -> ONNX folder -> onnxruntime, compared with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeai
from edgeai.errors import EdgeAIError, OptionError, OutputError, UnsupportedArchitectureError
from edgeai.runtimes.base import GREEDY
from edgeai.runtimes.onnxrt import OnnxBackend
from helpers import TINY_ARCHS, VARIED_TEXT, corpus, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

PROMPT_LEN = 24
N_DECODE = 16
# onnxruntime's GroupQueryAttention needs head_dim % 16 == 0: the tiny Qwen3 gets 32 instead of 24
ONNX_OVERRIDES = {"qwen3": {"head_dim": 32}}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-onnx")
    return {a.name: make_tiny_checkpoint(root / a.name, a, **ONNX_OVERRIDES.get(a.name, {})) for a in TINY_ARCHS}


def _prompt(n_vocab: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, n_vocab, PROMPT_LEN)]


def _hf_steps(folder: Path, tokens: list[int], n: int, keys: list | None = None) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """transformers: prefill logits [T, V], then n greedy decode steps over its KV cache (logits,
    tokens); `keys` gets the prefill's cached keys of every layer, [1, n_head_kv, T, head_dim] each."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=True)
        prefill = out.logits[0].numpy()
        if keys is not None:
            keys.extend(layer.keys.numpy().copy() for layer in out.past_key_values.layers)
        steps, chosen = [], []
        for _ in range(n):
            nxt = int(torch.argmax(out.logits[0, -1]))
            chosen.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1].numpy())
    return prefill, steps, chosen


@pytest.mark.parametrize("arch", [a.name for a in TINY_ARCHS])
def test_fp32_matches_transformers(arch, tiny_models, tmp_path, monkeypatch):
    from edgeai.runtimes import onnxrt

    folder = tiny_models[arch]
    out = edgeai.convert(folder, tmp_path / arch, format="onnx", quant="fp32")
    # the cache is one past/present buffer per layer, updated in place; it starts smaller than
    # prompt + decode steps, so that it grows once on the way
    monkeypatch.setattr(onnxrt, "KV_MIN_CAPACITY", PROMPT_LEN + N_DECODE // 2)
    backend = OnnxBackend(out, threads=1)
    assert backend.shared_kv
    tokens = _prompt(backend.n_vocab)
    ref_keys: list[np.ndarray] = []
    ref_prefill, ref_steps, ref_tokens = _hf_steps(folder, tokens, N_DECODE, ref_keys)

    ours = backend.eval_all(tokens)  # prefill: one graph run, every position
    assert ours.shape == ref_prefill.shape
    assert np.abs(ours - ref_prefill).max() < 1e-3, f"{arch}: prefill logits differ"
    # q/k rows are in Hugging Face order (rotary_interleaved=0): the cached keys are transformers'
    for layer, ref in enumerate(ref_keys):
        cached = backend._kv_arrays[2 * layer][:, :, :PROMPT_LEN]
        assert np.abs(cached - ref).max() < 1e-4, f"{arch}: layer {layer} cached keys differ"
    backend.set_sampling(GREEDY)
    nxt = int(np.argmax(ours[-1]))
    for i in range(N_DECODE):  # decode: one token per run through the KV cache
        assert nxt == ref_tokens[i], f"{arch}: greedy token {i} differs"
        following = backend.step([nxt])
        diff = np.abs(backend.logits() - ref_steps[i]).max()
        assert diff < 1e-3, f"{arch}: decode step {i} logits differ by {diff}"
        nxt = following
    assert backend.capacity > PROMPT_LEN + N_DECODE // 2  # grown once, the prompt's positions kept
    backend.close()


@pytest.mark.parametrize("arch", [a.name for a in TINY_ARCHS])
def test_int8_int4_load_run_generate(arch, tiny_models, tmp_path):
    folder = tiny_models[arch]
    errors = {}
    for quant, bits in (("int8", 8), ("int4", 4)):
        out = edgeai.convert(folder, tmp_path / quant, format="onnx", quant=quant)
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        ops = {n.op_type: n for n in model.graph.node}
        assert {a.name: a.i for a in ops["MatMulNBits"].attribute}["bits"] == bits
        assert {a.name: a.i for a in ops["GatherBlockQuantized"].attribute}["bits"] == bits
        assert "GroupQueryAttention" in ops
        if any(name.endswith("_exps.weight") for name in _recipe(out)["tensor_types"]):  # MoE: routed experts in QMoE
            assert {a.name: a.i for a in ops["QMoE"].attribute}["expert_weight_bits"] == bits
        backend = OnnxBackend(out, threads=1)
        tokens = _prompt(backend.n_vocab)
        logits = backend.eval_all(tokens)
        assert np.isfinite(logits).all()
        ref_prefill, _, _ = _hf_steps(folder, tokens, 0)
        errors[quant] = float(np.abs(logits - ref_prefill).mean())
        backend.set_sampling(GREEDY)
        generated = [backend.step([int(np.argmax(logits[-1]))])]
        for _ in range(7):
            generated.append(backend.step([generated[-1]]))
        assert backend.n_past == PROMPT_LEN + 8 and all(0 <= t < backend.n_vocab for t in generated)
        backend.close()
    spread = float(np.abs(ref_prefill - ref_prefill.mean()).mean())
    # int8 lands closer to the float model than int4, and int4 is a perturbation, not noise
    assert errors["int8"] < errors["int4"] < 0.5 * spread, (errors, spread)


def test_folder_is_complete_and_self_describing(tiny_models, tmp_path):
    out = edgeai.convert(tiny_models["smollm"], tmp_path / "m", format="onnx", quant="int4", block_size=32)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (out / name).is_file(), name
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    recipe = json.loads({p.key: p.value for p in model.metadata_props}["edgeai.recipe"])
    assert recipe["quant"] == "int4" and recipe["block_size"] == 32 and recipe["method"] == "rtn"
    assert recipe["tensor_types"]["blk.0.attn_q.weight"] == "int4"
    assert 4.0 < 8 * recipe["weight_bytes"] / recipe["n_weights"] < 6.0
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    assert genai["search"]["past_present_share_buffer"]  # onnxruntime-genai updates the cache in place too
    # what a decode step does not need is not in the graph: no Identity before logits, no
    # training outputs (mean, inv_std_var) of the skip norms, no residual sum after the last block
    nodes = model.graph.node
    assert not [n for n in nodes if n.op_type == "Identity"]
    assert any(n.op_type == "MatMulNBits" and n.output[0] == "logits" for n in nodes)
    skip = [list(n.output) for n in nodes if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(o[1:3] == ["", ""] and o[3] for o in skip[:-1]) and len(skip[-1]) == 1
    # a tied output shares the embedding's codes: one copy on disk
    assert sum(1 for t in model.graph.initializer if t.name.startswith("token_embd")) == 2  # codes + scales
    assert not list(tmp_path.glob(".*partial"))


def test_block_size_64_falls_back_per_tensor(tiny_models, tmp_path):
    # hidden 64 takes blocks of 64; the FFN's rows of 96 do not, and get blocks of 32 (recorded)
    out = edgeai.convert(tiny_models["llama"], tmp_path / "b64", format="onnx", quant="int4", block_size=64)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    recipe = json.loads(model.metadata_props[0].value)
    assert "blk.0.ffn_down.weight" in recipe["fallbacks"]
    sizes = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert sizes == {32, 64}
    backend = OnnxBackend(out, threads=1)
    assert np.isfinite(backend.eval_all(_prompt(backend.n_vocab))).all()


@pytest.mark.parametrize("method", ["imatrix", "awq", "gptq"])
def test_calibrated_methods(method, tiny_models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(VARIED_TEXT * 8, encoding="utf-8")
    out = edgeai.convert(tiny_models["qwen2"], tmp_path / method, format="onnx", quant="int4", method=method,
                         calib=calib, calib_ctx=64)
    recipe = json.loads(onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props[0].value)
    assert recipe["method"] == method and recipe["calibration"]["n_ctx"] == 64
    backend = OnnxBackend(out, threads=1)
    assert np.isfinite(backend.eval_all(_prompt(backend.n_vocab))).all()
    if method == "awq":  # the scales were searched and folded (alpha > 0 somewhere), and recorded
        assert recipe["awq"]["alphas"] and any(a > 0 for a in recipe["awq"]["alphas"].values())


def _recipe(folder: Path) -> dict:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}["edgeai.recipe"])


def test_awq_folds_scales_without_changing_the_float_model(tiny_models, tmp_path):
    """AWQ divides norms / rows by s and multiplies the next weights' columns by s: in float the
    ONNX graph computes what transformers does; only the int4 rounding sees the scaling."""
    calib = tmp_path / "calib.txt"
    calib.write_text(VARIED_TEXT * 8, encoding="utf-8")
    from edgeai.converters.pipeline import awq as _awq
    from edgeai.converters.plan import open_plan
    from edgeai.converters.onnx_export import OnnxQuant, _grid_formats, _Options, _write_folder
    from edgeai.quant.recipes import Method

    src = tiny_models["llama"]
    plan = open_plan(src, "f32")
    _grid_formats(plan, OnnxQuant.INT4)
    _awq(plan, calib.read_text(), 64, calib.name, 1)
    assert plan.extra_recipe["awq"]["alphas"]
    (tmp_path / "awq-fp32").mkdir()
    _write_folder(tmp_path / "awq-fp32", plan, _Options(OnnxQuant.FP32, 32, 0), Method.AWQ, None, None, 1, "test")
    plan.close()
    backend = OnnxBackend(tmp_path / "awq-fp32", threads=1)
    tokens = _prompt(backend.n_vocab)
    ref, _, _ = _hf_steps(src, tokens, 0)
    assert np.abs(backend.eval_all(tokens) - ref).max() < 1e-3


# ---- bad input: clear errors, nothing left behind ---------------------------------------------------


def _nothing_written(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"


def test_unsupported_architecture(tiny_models, tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    (src / "tokenizer.json").write_text((tiny_models["llama"] / "tokenizer.json").read_text())
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        edgeai.convert(src, tmp_path / "out", format="onnx")
    _nothing_written(tmp_path, tmp_path / "out")


def test_head_dim_groupqueryattention_cannot_run(tmp_path):
    arch = next(a for a in TINY_ARCHS if a.name == "qwen3")  # head_dim 24
    src = make_tiny_checkpoint(tmp_path / "src", arch)
    with pytest.raises(UnsupportedArchitectureError, match="head_dim 24 is not a multiple of 16"):
        edgeai.convert(src, tmp_path / "out", format="onnx")
    _nothing_written(tmp_path, tmp_path / "out")


def test_block_size_not_dividing_hidden_size(tiny_models, tmp_path):
    with pytest.raises(OptionError, match="--block-size 128 does not divide the row length 64 of the hidden size"):
        edgeai.convert(tiny_models["llama"], tmp_path / "out", format="onnx", quant="int4", block_size=128)
    with pytest.raises(OptionError, match="--block-size 48 is not supported"):
        edgeai.convert(tiny_models["llama"], tmp_path / "out", format="onnx", quant="int4", block_size=48)
    _nothing_written(tmp_path, tmp_path / "out")


def test_onnxruntime_too_old(tiny_models, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.16.3")
    with pytest.raises(OptionError, match=r"onnxruntime 1\.16\.3 lacks .*RMSNormalization.*>= 1\.22"):
        edgeai.convert(tiny_models["llama"], tmp_path / "out", format="onnx")
    _nothing_written(tmp_path, tmp_path / "out")


def test_options(tiny_models, tmp_path):
    src = tiny_models["llama"]
    with pytest.raises(OptionError, match="--method awq needs a calibration text"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="int4", method="awq")
    with pytest.raises(OptionError, match="--method awq only applies to int8/int4"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="fp16", method="awq", calib=tmp_path / "x.txt")
    with pytest.raises(OptionError, match="--prune wanda:0.5 needs a calibration text"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="int4", prune="wanda:0.5")
    with pytest.raises(OptionError, match="dense model"):
        edgeai.convert(src, tmp_path / "out", format="onnx", prune="experts:0.5", calib=__file__)
    with pytest.raises(EdgeAIError, match="unknown device 'pi9'"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="int4", device="pi9")
    with pytest.raises(OptionError, match="--device chooses the ONNX MatMulNBits compute type"):
        edgeai.convert(src, tmp_path / "out.gguf", outtype="f32", device="pi5-8gb-sd")
    with pytest.raises(OptionError, match="not an ONNX weight type"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="q4_k_m")
    with pytest.raises(OptionError, match="gptq runs on .* 32-wide blocks"):
        edgeai.convert(src, tmp_path / "out", format="onnx", quant="int4", block_size=64, method="gptq",
                       calib=tmp_path / "x.txt")
    with pytest.raises(OptionError, match="--format 'tflite' is not supported"):
        edgeai.convert(src, tmp_path / "out", format="tflite")
    _nothing_written(tmp_path, tmp_path / "out")


def test_failed_check_leaves_nothing_and_keeps_the_old_folder(tiny_models, tmp_path, monkeypatch):
    out = edgeai.convert(tiny_models["llama"], tmp_path / "out", format="onnx")
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(OutputError, match="exists; pass --force"):
        edgeai.convert(tiny_models["llama"], out, format="onnx")

    def broken(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(OutputError, match="fails onnx.checker: simulated"):
        edgeai.convert(tiny_models["llama"], out, format="onnx", quant="int8", force=True)
    assert (out / "model.onnx").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_replaces_a_previous_export_never_other_files_or_the_source(tiny_models, tmp_path, monkeypatch):
    """--force used to replace the whole folder: a user's files in it, or with -o SRC the checkpoint itself."""
    import shutil

    src = Path(shutil.copytree(tiny_models["llama"], tmp_path / "src"))
    weights = (src / "model.safetensors").read_bytes()
    out = edgeai.convert(src, tmp_path / "out", format="onnx")
    (out / "keep.txt").write_text("mine")
    (out / "notes").mkdir()
    with pytest.raises(OutputError, match="out holds keep.txt, notes/, which an export does not write"):
        edgeai.convert(src, out, format="onnx", force=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="the output .*src is the source .*src"):
        edgeai.convert(src, src, format="onnx", force=True)
    with pytest.raises(OutputError, match="holds the source"):
        edgeai.convert(src, tmp_path, format="onnx", force=True)
    assert (src / "model.safetensors").read_bytes() == weights
    monkeypatch.chdir(out)
    with pytest.raises(OutputError, match="holds keep.txt"):  # "-o ." used to leave a "..XXXX.old" folder
        edgeai.convert(src, ".", format="onnx", force=True)
    (out / "keep.txt").unlink()
    (out / "notes").rmdir()
    edgeai.convert(src, ".", format="onnx", quant="int8", force=True)  # a previous export: replaced
    assert _recipe(out)["quant"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or .old left


def test_cli_convert_onnx(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from edgeai.cli import app

    result = CliRunner().invoke(app, ["convert", str(tiny_models["mistral"]), "-o", str(tmp_path / "cli"), "--format",
                                      "onnx", "--quant", "int4", "--block-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert OnnxBackend.can_run(tmp_path / "cli") is None
    bad = CliRunner().invoke(app, ["convert", str(tiny_models["mistral"]), "-o", str(tmp_path / "bad"), "--format",
                                   "onnx", "--quant", "int4", "--block-size", "100"])
    assert bad.exit_code == 1 and "--block-size 100 is not supported" in bad.output
    assert not (tmp_path / "bad").exists()


# ---- MoE through onnxruntime's MoE / QMoE contrib ops -----------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_qmoe_int4_matches_the_numpy_reference_on_the_same_codes(arch, tiny_models, tmp_path):
    """int4 with float32 activations (accuracy_level 0): onnxruntime's QMoE and MatMulNBits on our
    codes compute what edgeai's numpy forward pass computes on the same codes dequantized: the
    expert layout (interleaved gate/up, nibble order, block scales) and the routing (renormalized
    top k for Mixtral; softmax over all experts for Qwen2-MoE) are onnxruntime's."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant import nbits
    from edgeai.quant.formats import FORMATS, Fit, decode, quantize
    from edgeai.quant.forward import Logits, forward

    src = tiny_models[arch]
    out = edgeai.convert(src, tmp_path / arch, format="onnx", quant="int4", device="pi4-4gb")  # accuracy_level 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QMoE") == 2 and "MoE" not in ops
    assert ("TopK" in ops) == (arch == "qwen2_moe")  # the top k's probability mass, for a family that does not renormalize
    recipe = _recipe(out)
    plan = open_plan(src, "f32")

    def rounded(m: np.ndarray) -> np.ndarray:  # [N, K] as the exporter rounds it: Q4_0's grid, else 16-wide blocks
        if m.shape[1] % 32 == 0:
            return decode(quantize(m, FORMATS["q4_0"], fit=Fit.SEARCH), FORMATS["q4_0"]).reshape(m.shape)
        return nbits.encode(m, 4, 16).dequantize()

    for t in plan.tensors:  # every int4 matrix (every expert)
        if recipe["tensor_types"].get(t.name) == "int4":
            t.chunks = (lambda c=t.chunks, shape=t.shape: (
                np.stack([rounded(m) for m in chunk.reshape(-1, *shape[-2:])]) for chunk in c()))
    tokens = _prompt(plan.hparams.n_vocab)
    ref = forward(plan, [np.array(tokens)], logits=Logits.ALL)
    plan.close()
    ours = OnnxBackend(out, threads=1).eval_all(tokens)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_moe_fp16_runs_the_moe_op(tiny_models, tmp_path):
    """fp16 experts: stored half, cast to float32 for the float MoE node; close to transformers."""
    out = edgeai.convert(tiny_models["olmoe"], tmp_path / "olmoe", format="onnx", quant="fp16")
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MoE") == 2 and "QMoE" not in ops
    backend = OnnxBackend(out, threads=1)
    tokens = _prompt(backend.n_vocab)
    ref, _, _ = _hf_steps(tiny_models["olmoe"], tokens, 0)
    assert np.abs(backend.eval_all(tokens) - ref).max() < 1e-2 * np.abs(ref).max()


# ---- pruning and the device ---------------------------------------------------------------------------


def test_prune_matches_the_pruned_gguf(tiny_models, tmp_path):
    """--prune runs the GGUF path's pruning on the plan: the fp32 ONNX folder and the F32 GGUF pruned
    the same way give the same logits (onnxruntime vs llama.cpp)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus()[:200]), encoding="utf-8")
    src, steps = tiny_models["smollm"], "layers:1,wanda:2:4"
    onnx_out = edgeai.convert(src, tmp_path / "pruned", format="onnx", quant="fp32", prune=steps, calib=calib, calib_ctx=64)
    gguf = edgeai.convert(src, tmp_path / "pruned.gguf", outtype="f32", prune=steps, calib=calib, calib_ctx=64)
    recipe = _recipe(onnx_out)
    assert recipe["pruning"]["layers"]["block_count"] == [2, 1] and recipe["pruning"]["weights"]["pattern"] == "2:4"
    assert json.loads((onnx_out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 1
    backend = OnnxBackend(onnx_out, threads=1)
    tokens = _prompt(backend.n_vocab)
    ours = backend.eval_all(tokens)
    ref = llama_cpp_logits(llama_cpp_model(gguf), tokens)
    assert np.abs(ours - ref).max() < 1e-3


def test_prune_experts_int4(tiny_models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus()[:200]), encoding="utf-8")
    out = edgeai.convert(tiny_models["mixtral"], tmp_path / "mx", format="onnx", quant="int4", prune="experts:0.5",
                         calib=calib, calib_ctx=64)
    qmoe = next(n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node if n.op_type == "QMoE")
    weights = next(t for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
                   if t.name == qmoe.input[2])
    assert weights.dims[0] == 2 and _recipe(out)["pruning"]["experts"]["expert_count"] == [4, 2]
    backend = OnnxBackend(out, threads=1)
    assert np.isfinite(backend.eval_all(_prompt(backend.n_vocab))).all()


@pytest.mark.parametrize(("device", "level"), [("pi4-4gb", 0), ("pi5-8gb-sd", 4), ("x86-avx2-8gb", 4)])
def test_accuracy_level_follows_the_device(device, level, tiny_models, tmp_path):
    out = edgeai.convert(tiny_models["smollm"], tmp_path / "m", format="onnx", quant="int4", device=device)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {level}
    recipe = _recipe(out)
    assert recipe["accuracy_level"] == level and recipe["device"] == device


def test_onnxruntime_without_the_moe_kernels(tiny_models, tmp_path, monkeypatch):
    import onnxruntime

    def no_qmoe(*args, **kwargs):
        raise RuntimeError("Could not find an implementation for QMoE(1) node with name ''")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_qmoe)
    with pytest.raises(OptionError, match=r"cannot run the QMoE contrib op .*Could not find.*onnxruntime >= 1\.31"):
        edgeai.convert(tiny_models["mixtral"], tmp_path / "out", format="onnx", quant="int4")
    _nothing_written(tmp_path, tmp_path / "out")
