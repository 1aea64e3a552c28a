"""Pruning: the sparsity asked is the sparsity written, Wanda beats magnitude on real activations,
structurally pruned files agree with themselves and run in llama.cpp and the native engine, bad input is refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import edgeai
from edgeai.errors import OptionError
from edgeai.quant.prune import ExpertRouting, ExpertScore, PruneKind, Score, parse_prune, prunable, prune_magnitude, prune_n_m, prune_wanda
from helpers import TINY_ARCHS, corpus, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
WIDE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    calib = root / "calib.txt"
    calib.write_text("\n".join(corpus()[:120]), encoding="utf-8")  # a few thousand tokens: calibration is the slow part
    return {
        "dense": _with_outlier_features(make_tiny_checkpoint(root / "dense", ARCHS["smollm"], **WIDE)),
        "moe": make_tiny_checkpoint(root / "moe", ARCHS["qwen3_moe"]),
        "calib": calib,
    }


def _with_outlier_features(folder):
    """Give the RMSNorm weights a log-normal spread. Trained LLMs have a few input features far
    larger than the rest (what Wanda's activation term is for); a random model with unit norm
    weights has none, and there Wanda and magnitude rank alike."""
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in tensors:
        if name.endswith("layernorm.weight"):
            tensors[name] = rng.lognormal(0.0, 1.0, tensors[name].shape).astype(np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _tensors(path) -> dict[str, np.ndarray]:
    """An F32 file's tensors in numpy order."""
    return {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in GGUFReader(path).tensors}


def _fields(path) -> dict[str, object]:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


PROMPT = list(range(3, 30))


def runs_in_llama_cpp_and_native(path) -> None:
    """The pruned file generates in llama.cpp, and the native engine loads it and computes the same
    logits (KL divergence from llama.cpp's below 1e-3, as for unpruned files)."""
    from edgeai.runtimes.native import NativeBackend

    llm = llama_cpp_model(path, n_ctx=64)
    assert len(llama_cpp_greedy(llm, PROMPT, 8)) == 8
    ref = llama_cpp_logits(llm, PROMPT).astype(np.float64)
    native = NativeBackend(path, n_ctx=64, threads=1)
    try:
        ours = native.eval_logits(PROMPT).astype(np.float64)
    finally:
        native.close()
    p = ref - ref.max(-1, keepdims=True)
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    q = ours - ours.max(-1, keepdims=True)
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    assert float((np.exp(p) * (p - q)).sum(-1).mean()) < 1e-3


# ---- the spec -----------------------------------------------------------------------------------


def test_spec_grammar():
    (s,) = parse_prune("wanda:0.5")
    assert (s.kind, s.score, s.sparsity) == (PruneKind.UNSTRUCTURED, Score.WANDA, 0.5) and s.needs_calibration
    (s,) = parse_prune("2:4")
    assert (s.kind, s.score, s.n, s.m, s.needs_calibration) == (PruneKind.N_M, Score.MAGNITUDE, 2, 4, False)
    steps = parse_prune("layers:2, wanda:4:8 ,experts:0.25")
    assert [str(s) for s in steps] == ["layers:2", "wanda:4:8", "experts:0.25"]
    (s,) = parse_prune("experts:0.5:loss")
    assert s.expert_score is ExpertScore.LOSS and str(s) == "experts:0.5:loss"


@pytest.mark.parametrize("text, why", [
    ("wanda:1.5", r"outside \(0, 1\)"), ("magnitude:0", r"outside \(0, 1\)"), ("experts:1", r"outside \(0, 1\)"),
    ("4:4", "0 < N < M"), ("wanda:2:x", "not a positive integer"), ("layers:-1", "not a positive integer"),
    ("sparsegpt:0.5", "unknown method"), ("experts:0.5:often", "routing or loss"), ("wanda:0.5,2:4", "at most one weight step"), ("", "no pruning step"),
])
def test_bad_spec_names_the_grammar(text, why):
    with pytest.raises(OptionError, match=why) as err:
        parse_prune(text)
    assert "layers:K" in str(err.value)


# ---- the pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsity_reached_equals_asked(sparsity):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 200)).astype(np.float32)
    norm = rng.uniform(0.1, 5, 200).astype(np.float32)
    mag = prune_magnitude(w, sparsity)
    assert np.count_nonzero(mag == 0) == round(sparsity * w.size)  # per tensor
    assert np.abs(w[mag == 0]).max() <= np.abs(mag[mag != 0]).min()  # the smallest ones
    wanda = prune_wanda(w, norm, sparsity)
    assert (np.count_nonzero(wanda == 0, axis=1) == round(sparsity * 200)).all()  # per output row
    score = np.abs(w) * norm
    for row in range(w.shape[0]):
        assert score[row][wanda[row] == 0].max() <= score[row][wanda[row] != 0].min()
    np.testing.assert_array_equal(wanda[wanda != 0], w[wanda != 0])  # survivors untouched


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_keeps_n_of_every_group(n, m):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    norm = rng.uniform(0.1, 5, 64).astype(np.float32)
    for col_norm in (None, norm):
        out = prune_n_m(w, n, m, col_norm)
        groups = out.reshape(16, 64 // m, m)
        assert (np.count_nonzero(groups, axis=2) == n).all()
        score = (np.abs(w) * (1 if col_norm is None else col_norm)).reshape(16, 64 // m, m)
        kept_min = np.where(groups != 0, score, np.inf).min(axis=2)
        dropped_max = np.where(groups == 0, score, -np.inf).max(axis=2)
        assert (dropped_max <= kept_min).all()


def test_wanda_has_lower_layer_output_error_than_magnitude(models):
    """On the tiny model's own calibration activations, ||(W' - W) X^T|| is lower for Wanda at the
    same sparsity, for every prunable matrix of the model (by at least 3 %)."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import collect_statistics
    from edgeai.quant.forward import RowRecorder

    plan = open_plan(models["dense"], "f32")
    try:
        names = [t.name for t in plan.tensors if prunable(t.name)]
        recorder = RowRecorder(names, max_rows=1024)
        stats = collect_statistics(plan, models["calib"].read_text(), n_ctx=128, max_tokens=1024, observers=[recorder])
        for name in names:
            w, x = plan.read(name), recorder.rows(name)
            norm = np.sqrt(stats.importance(name))
            err = {k: float(np.linalg.norm((p - w) @ x.T)) for k, p in (
                ("magnitude", prune_magnitude(w, 0.5)), ("wanda", prune_wanda(w, norm, 0.5)))}
            assert err["wanda"] < 0.97 * err["magnitude"], (name, err)
    finally:
        plan.close()


def test_expert_loss_is_the_block_output_lost_by_dropping_it(models):
    """The loss score of expert e equals ||block output - block output with expert e's down
    projection zeroed||^2, measured by running the block again."""
    from edgeai.converters.plan import open_plan
    from edgeai.quant.calibrate import collect_statistics
    from edgeai.quant.forward import BlockWeights, ForwardConfig, RopeTables, run_block

    class FirstBlock:
        def observe(self, inp):
            pass

        def observe_block(self, out):
            if out.index == 0:
                self.out = out
                self.before, self.after = np.array(out.before), np.array(out.after)

    plan = open_plan(models["moe"], "f32")
    try:
        cfg = ForwardConfig.from_plan(plan)
        routing, first = ExpertRouting(cfg, loss=True), FirstBlock()
        collect_statistics(plan, models["calib"].read_text(), n_ctx=64, max_tokens=512, observers=[routing, first])
        batch = first.out.batch
        rope = RopeTables.build(cfg, batch.positions, None)
        assert (routing.frequency[0] > 0).all()
        for e in range(cfg.n_expert):
            tensors = dict(first.out.weights.tensors)
            tensors["ffn_down_exps.weight"] = tensors["ffn_down_exps.weight"].copy()
            tensors["ffn_down_exps.weight"][e] = 0.0
            hidden = first.before.copy()
            run_block(cfg, BlockWeights(0, tensors), hidden, batch, rope)
            lost = float(np.square(first.after.astype(np.float64) - hidden).sum())
            assert routing.loss[0][e] == pytest.approx(lost, rel=1e-3), e
    finally:
        plan.close()


# ---- files --------------------------------------------------------------------------------------


def test_wanda_n_m_and_layers_file_agrees_and_runs(models, tmp_path):
    """layers:2 + wanda:2:4 on a 4-block model: block_count 2, blocks renumbered, every prunable
    matrix exactly 2:4 sparse, the rest equal to the unpruned file, runs in llama.cpp."""
    dense = edgeai.convert(models["dense"], tmp_path / "dense.gguf", outtype="f32")
    out = edgeai.convert(models["dense"], tmp_path / "p.gguf", outtype="f32", prune="layers:2,wanda:2:4",
                         calib=models["calib"], calib_ctx=128)
    fields = _fields(out)
    recipe = json.loads(fields["edgeai.recipe"])["pruning"]
    assert fields["llama.block_count"] == 2 and recipe["spec"] == "layers:2,wanda:2:4"
    dropped = recipe["layers"]["dropped"]
    kept = [i for i in range(4) if i not in dropped]
    assert len(dropped) == 2 and recipe["weights"]["sparsity"] == 0.5
    before, after = _tensors(dense), _tensors(out)
    per_block = len([n for n in before if n.startswith("blk.0.")])
    assert len(after) == len(before) - 2 * per_block
    assert {int(re.match(r"blk\.(\d+)", n).group(1)) for n in after if n.startswith("blk.")} == {0, 1}
    for name, data in after.items():
        old = re.sub(r"^blk\.(\d+)\.", lambda m: f"blk.{kept[int(m.group(1))]}.", name)
        if prunable(name):
            groups = data.reshape(-1, 4)
            assert (np.count_nonzero(groups, axis=1) == 2).all(), name
            np.testing.assert_array_equal(data[data != 0], before[old][data != 0])
        else:
            np.testing.assert_array_equal(data, before[old])
    runs_in_llama_cpp_and_native(out)


@pytest.mark.parametrize("spec", ["magnitude:0.3", "wanda:0.5"])
def test_unstructured_file_sparsity_per_tensor(models, tmp_path, spec):
    out = edgeai.convert(models["dense"], tmp_path / "u.gguf", outtype="f32", prune=spec, calib=models["calib"]
                         if spec.startswith("wanda") else None, calib_ctx=128)
    sparsity = float(spec.split(":")[1])
    before = _tensors(edgeai.convert(models["dense"], tmp_path / "d.gguf", outtype="f32"))
    for name, data in _tensors(out).items():
        zeros = np.count_nonzero(data == 0)
        if not prunable(name):
            np.testing.assert_array_equal(data, before[name])
        elif spec.startswith("wanda"):
            assert (np.count_nonzero(data == 0, axis=1) == round(sparsity * data.shape[1])).all(), name
        else:
            assert zeros == round(sparsity * data.size), name
    runs_in_llama_cpp_and_native(out)


@pytest.mark.parametrize("spec", ["experts:0.5", "experts:0.5:loss"])
def test_expert_pruning_slices_experts_and_router(models, tmp_path, spec):
    """experts:0.5 on a 4-expert top-2 model, from the checkpoint and from its GGUF: 2 experts
    per block, the kept experts' and router rows' data unchanged, the same file either way."""
    moe, calib = models["moe"], models["calib"]
    full = edgeai.convert(moe, tmp_path / "full.gguf", outtype="f32")
    out = edgeai.convert(moe, tmp_path / "e.gguf", outtype="f32", prune=spec, calib=calib, calib_ctx=64)
    from_gguf = edgeai.convert(full, tmp_path / "g.gguf", outtype="f32", prune=spec, calib=calib,
                               calib_ctx=64)
    fields = _fields(out)
    assert fields["qwen3moe.expert_count"] == 2 and fields["qwen3moe.expert_used_count"] == 2
    dropped = json.loads(fields["edgeai.recipe"])["pruning"]["experts"]["dropped"]
    before, after, again = _tensors(full), _tensors(out), _tensors(from_gguf)
    assert after.keys() == before.keys() == again.keys()
    for name, data in after.items():
        block = re.match(r"blk\.(\d+)\.(.+)", name)
        if block and (block.group(2) == "ffn_gate_inp.weight" or block.group(2).endswith("_exps.weight")):
            keep = [e for e in range(4) if e not in dropped[block.group(1)]]
            assert data.shape[0] == 2 and len(keep) == 2, name
            np.testing.assert_array_equal(data, before[name][keep])
        else:
            np.testing.assert_array_equal(data, before[name])
        np.testing.assert_array_equal(again[name], data)
    runs_in_llama_cpp_and_native(out)


def test_expert_used_count_follows_when_fewer_experts_remain(models, tmp_path):
    out = edgeai.convert(models["moe"], tmp_path / "one.gguf", outtype="f16", prune="experts:0.75",
                         calib=models["calib"], calib_ctx=64)
    fields = _fields(out)
    assert fields["qwen3moe.expert_count"] == 1 and fields["qwen3moe.expert_used_count"] == 1
    assert json.loads(fields["edgeai.recipe"])["pruning"]["experts"]["expert_used_count"] == [2, 1]
    runs_in_llama_cpp_and_native(out)


def test_cli_prune_then_quantize(models, tmp_path):
    from edgeai.cli import app

    out = tmp_path / "c.gguf"
    result = CliRunner().invoke(app, ["convert", str(models["moe"]), "-o", str(out), "--prune", "experts:0.25,2:4",
                                      "--calib", str(models["calib"]), "--calib-ctx", "64", "--quant", "q4_0",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    fields = _fields(out)
    assert fields["qwen3moe.expert_count"] == 3 and fields["qwen3moe.expert_used_count"] == 2
    recipe = json.loads(fields["edgeai.recipe"])
    assert recipe["pruning"]["spec"] == "experts:0.25,magnitude:2:4" and recipe["recipe"] == "q4_0"
    runs_in_llama_cpp_and_native(out)
    result = CliRunner().invoke(app, ["run", str(out), "Once upon a time", "-n", "4", "--temp", "0", "--backend",
                                      "native", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["backend"] == "native" and answer["generated_tokens"] >= 1


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model, spec, calib, why", [
    ("moe", "wanda:1.5", True, r"outside \(0, 1\)"),
    ("moe", "2:5", False, "not a multiple of M=5"),
    ("dense", "layers:4", True, "has 4 blocks; at least one must remain"),
    ("moe", "experts:0.9", True, "drops between 1 and 3 experts"),
    ("dense", "experts:0.5", True, "dense model"),
    ("dense", "wanda:0.5", False, r"--prune wanda:0.5 needs a calibration text: pass --calib"),
    ("moe", "layers:1", False, r"--prune layers:1 needs a calibration text"),
])
def test_bad_input_is_refused_and_nothing_written(models, tmp_path, model, spec, calib, why):
    out = tmp_path / "bad.gguf"
    with pytest.raises(OptionError, match=why):
        edgeai.convert(models[model], out, outtype="f16", prune=spec, calib=models["calib"] if calib else None)
    assert list(tmp_path.iterdir()) == []
