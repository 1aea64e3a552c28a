"""AWQ: the folded scales keep the float model's function, lower the layer-output error against RTN
(and the plain imatrix search), and the file is an ordinary GGUF that llama.cpp runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader, quants

import edgeai
from edgeai.quant import awq
from edgeai.quant.formats import FORMATS, Fit, decode, quantize
from helpers import TINY_ARCHS, corpus, llama_cpp_greedy, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3)


def _outlier_inputs(rng, n_rows, n_in):
    """Activations whose few loud channels carry most of the energy, as in real LLMs."""
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    x[:, rng.choice(n_in, n_in // 32, replace=False)] *= 20.0
    return x


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q5_0"])
def test_awq_scale_search_beats_imatrix_and_rtn_with_outlier_channels(name):
    rng = np.random.default_rng(0)
    n_in = 512
    x = _outlier_inputs(rng, 2048, n_in)
    weights = [rng.standard_normal((n, n_in)).astype(np.float32) for n in (128, 64)]
    fmt = FORMATS[name]
    h = x.T.astype(np.float64) @ x
    s, alpha, error, imatrix_error = awq.search_scale(weights, [fmt, fmt], h, np.abs(x).mean(axis=0))
    rtn_error = sum(float(np.sum(((decode(quantize(w, fmt), fmt).reshape(w.shape) - w) @ x.T) ** 2)) for w in weights)
    assert alpha > 0 and error < 0.9 * imatrix_error < 0.9 * rtn_error, (alpha, error, imatrix_error, rtn_error)
    # the reported error is the real one: Q(W s) / s against W on the inputs
    imp = (np.diag(h) / np.square(s)).astype(np.float32)
    real = sum(float(np.sum(((decode(quantize(w * s, fmt, fit=Fit.SEARCH, importance=imp), fmt).reshape(w.shape) / s - w)
                              @ x.T) ** 2)) for w in weights)
    assert real == pytest.approx(error, rel=1e-3)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("awq") / "calib.txt"
    path.write_text("\n".join(corpus()[:80]), encoding="utf-8")
    return path


def _loud_checkpoint(folder, arch, **overrides):
    """A tiny checkpoint whose norms make a few loud input channels (what AWQ is for)."""
    from safetensors.numpy import load_file, save_file

    make_tiny_checkpoint(folder, ARCHS[arch], **overrides)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(3)
    for name, t in tensors.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t[rng.choice(t.size, max(2, t.size // 32), replace=False)] *= 12.0
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("arch", ["smollm", "qwen2"])  # GQA (v -> o scales tied per kv head); q/k/v biases
def test_awq_fold_keeps_the_float_model(arch, calib, tmp_path, monkeypatch):
    """With random scales in every group, the folded float model computes the same logits."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import calibration_set
    from edgeai.quant.forward import Logits, forward

    rng = np.random.default_rng(1)

    def random_scale(weights, formats, hessian, act, **kwargs):
        return rng.uniform(0.3, 3.0, act.shape).astype(np.float32), 0.5, 1.0, 2.0

    monkeypatch.setattr(awq, "search_scale", random_scale)
    folder = make_tiny_checkpoint(tmp_path / arch, ARCHS[arch])
    tokens = [np.arange(3, 40) % 300, np.arange(50, 70)]
    plan = open_plan(folder, "q4_0")
    try:
        before = forward(plan, tokens, logits=Logits.ALL)
        result = awq.awq_model(plan, calibration_set(plan, calib.read_text(), n_ctx=32, max_tokens=128).chunks)
        folded = {n for n in result.row_divisor}
        assert {"blk.0.attn_norm.weight", "blk.0.attn_v.weight", "blk.0.ffn_norm.weight", "blk.0.ffn_up.weight"} <= folded
        assert ("blk.0.attn_v.bias" in folded) == (arch == "qwen2")
        result.apply(plan)
        assert not np.allclose(plan.read("blk.1.attn_output.weight"), open_plan(folder, "q4_0").read("blk.1.attn_output.weight"))
        after = forward(plan, tokens, logits=Logits.ALL)
    finally:
        plan.close()
    np.testing.assert_allclose(after, before, atol=2e-4 * np.abs(before).max())


def _file_tensors(path):
    reader = GGUFReader(path)
    return {t.name: quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            for t in reader.tensors}


def _block_errors(plan, file_tensors, sequences):
    """Per block: mean squared difference between the float block and the file's (dequantized) block,
    both fed the float model's input to that block."""
    from edgeai.quant.forward import Batch, BlockWeights, ForwardConfig, RopeTables, embed, load_block, run_block

    cfg = ForwardConfig.from_plan(plan)
    batch = Batch.of(sequences, cfg.n_vocab)
    rope = RopeTables.build(cfg, batch.positions, None)
    hidden = embed(plan, batch)
    errors = []
    for i in range(cfg.n_layer):
        quantized = BlockWeights(i, {n.removeprefix(f"blk.{i}."): v.astype(np.float32)
                                     for n, v in file_tensors.items() if n.startswith(f"blk.{i}.")})
        out_q = hidden.copy()
        run_block(cfg, quantized, out_q, batch, rope)
        run_block(cfg, load_block(plan, i), hidden, batch, rope)
        errors.append(float(np.mean((out_q - hidden) ** 2)))
    return np.array(errors)


def test_awq_lowers_layer_output_error_on_a_tiny_model(calib, tmp_path):
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import calibration_set

    folder = _loud_checkpoint(tmp_path / "loud", "smollm", **WIDE)
    files = {}
    for method in ("rtn", "imatrix", "awq"):
        files[method] = edgeai.convert(folder, tmp_path / f"{method}.gguf", quant="q4_0", method=method,
                                       calib=None if method == "rtn" else calib, calib_ctx=128, threads=1)
    plan = open_plan(folder, "f32")
    try:
        held_out = calibration_set(plan, "\n".join(corpus()[400:520]), n_ctx=128, max_tokens=1024).chunks
        errors = {m: _block_errors(plan, _file_tensors(f), held_out) for m, f in files.items()}
    finally:
        plan.close()
    assert (errors["awq"] < errors["rtn"]).all(), errors
    assert errors["awq"].sum() < 0.9 * errors["imatrix"].sum(), errors
    recipe = json.loads(GGUFReader(files["awq"]).fields["edgeai.recipe"].contents())
    assert recipe["method"] == "awq" and recipe["awq"]["alphas"]["blk.0.attn_norm.weight"] > 0


@pytest.mark.parametrize("arch", ["smollm", "qwen2_moe"])
def test_awq_file_runs_in_llama_cpp(arch, calib, tmp_path):
    folder = make_tiny_checkpoint(tmp_path / arch, ARCHS[arch], **(WIDE if arch == "smollm" else {}))
    out = edgeai.convert(folder, tmp_path / "a.gguf", quant="q4_k_m", method="awq", calib=calib, calib_ctx=128,
                         threads=1)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["method"] == "awq" and recipe["calibration"]["n_ctx"] == 128 and "alphas" in recipe["awq"]
    assert len(llama_cpp_greedy(llama_cpp_model(out, n_ctx=64), list(range(3, 30)), 8)) == 8


def test_awq_with_a_size_target(calib, tmp_path):
    """--target-bpw sizes the mix on the unscaled weights, then AWQ scales within the chosen types."""
    folder = make_tiny_checkpoint(tmp_path / "m", ARCHS["qwen2"])
    out = edgeai.convert(folder, tmp_path / "t.gguf", target_bpw=6.0, target_types=["q4_0", "iq4_nl", "q8_0"],
                         method="awq", calib=calib, calib_ctx=64, threads=1)
    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["method"] == "awq" and recipe["bits_per_weight"] <= 6.0 and "alphas" in recipe["awq"]
    assert len(llama_cpp_greedy(llama_cpp_model(out, n_ctx=64), list(range(3, 30)), 8)) == 8

