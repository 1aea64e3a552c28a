"""The numpy reference forward pass (edgeai.quant.forward) against transformers, and calibration
statistics (edgeai.quant.calibrate) against inputs captured by hooks on the transformers model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import edgeai
from edgeai.converters.plan import open_plan
from edgeai.errors import CalibrationError
from edgeai.quant.calibrate import calibration_chunks, collect_statistics, tokenize
from edgeai.quant.forward import ForwardConfig, Logits, RowRecorder, StatsCollector, forward
from helpers import TINY_ARCHS, VARIED_TEXT, hf_logits_and_greedy, make_tiny_checkpoint

ARCHS = {a.name: a for a in TINY_ARCHS}
MOE_ARCHS = [a.name for a in TINY_ARCHS if "num_experts_per_tok" in a.extra]
LENGTHS = (40, 23)  # two sequences of different lengths in one batch


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a.name: make_tiny_checkpoint(root / a.name, a) for a in TINY_ARCHS}


@pytest.fixture
def plan_of(tiny_models):
    """open_plan(folder, "f32") for an architecture name; closed after the test."""
    plans = []

    def open_(arch: str):
        plans.append(open_plan(tiny_models[arch], "f32"))
        return plans[-1]

    yield open_
    for p in plans:
        p.close()


def _sequences(n_vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, n_vocab, n) for n in LENGTHS]


def _hf_model(folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def _hf_inputs(model, module, sequences) -> np.ndarray:
    """The rows that reach `module` when each sequence runs alone: [n_tokens, n_in]."""
    import torch

    rows = []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).numpy().copy()))
    try:
        with torch.no_grad():
            for seq in sequences:
                model(torch.tensor([seq.tolist()]))
    finally:
        handle.remove()
    return np.concatenate(rows)


def _assert_close_rel(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < rtol, f"relative difference {rel}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(arch, tiny_models, plan_of):
    plan = plan_of(arch)
    cfg = ForwardConfig.from_plan(plan)
    if arch == "llama3":  # Llama 3.1 RoPE scaling comes from the generated rope_freqs tensor
        assert cfg.has_rope_freqs
    sequences = _sequences(cfg.n_vocab)

    ours = forward(plan, sequences, logits=Logits.ALL)  # [n_tokens, n_vocab]
    last = forward(plan, sequences)  # [n_seq, n_vocab]
    start = 0
    for s, seq in enumerate(sequences):
        ref, _ = hf_logits_and_greedy(tiny_models[arch], seq.tolist(), 0)
        mine = ours[start : start + len(seq)]
        start += len(seq)
        diff = np.abs(mine[-1] - ref[-1]).max()
        assert diff < 1e-3, f"{arch}: sequence {s}: last-position logits differ by {diff}"
        assert np.abs(mine - ref).max() < 1e-3, f"{arch}: sequence {s}: logits differ at some position"
        np.testing.assert_allclose(last[s], mine[-1], atol=1e-5)  # one row vs many: BLAS rounds differently


def test_weights_stream_one_block_at_a_time(plan_of):
    plan = plan_of("qwen2_moe")
    reads: list[str] = []
    read = plan.read
    plan.read = lambda name: (reads.append(name), read(name))[1]
    forward(plan, _sequences(plan.hparams.n_vocab))
    blocks = [int(n.split(".")[1]) for n in reads if n.startswith("blk.")]
    assert blocks == sorted(blocks), "blocks were not read in order"
    assert len(reads) == len(set(reads)), "a tensor was read twice"
    assert set(reads) == {t.name for t in plan.tensors}


def test_imatrix_of_a_dense_linear_matches_transformers(tiny_models, plan_of):
    plan = plan_of("llama")
    sequences = _sequences(plan.hparams.n_vocab)
    stats, rows = StatsCollector(), RowRecorder(["blk.0.ffn_down.weight"])
    forward(plan, sequences, observers=[stats, rows], logits=Logits.NONE)

    model = _hf_model(tiny_models["llama"])
    x = _hf_inputs(model, model.model.layers[0].mlp.down_proj, sequences)  # [n_tokens, n_ff]
    down = stats.columns["blk.0.ffn_down.weight"]
    assert down.tokens() == x.shape[0] == sum(LENGTHS)
    _assert_close_rel(down.mean_sq(), np.mean(x.astype(np.float64) ** 2, axis=0))
    _assert_close_rel(down.mean_abs(), np.mean(np.abs(x.astype(np.float64)), axis=0))
    recorded = rows.rows("blk.0.ffn_down.weight")
    assert recorded.dtype == np.float32
    np.testing.assert_allclose(recorded, x, atol=1e-5)

    # q, k and v share their input rows, hence their statistics
    xq = _hf_inputs(model, model.model.layers[1].self_attn.q_proj, sequences)
    for role in ("attn_q", "attn_k", "attn_v"):
        _assert_close_rel(stats.columns[f"blk.1.{role}.weight"].mean_sq(), np.mean(xq.astype(np.float64) ** 2, axis=0))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_statistics_follow_routing(arch, tiny_models, plan_of):
    plan = plan_of(arch)
    cfg = ForwardConfig.from_plan(plan)
    sequences = _sequences(cfg.n_vocab)
    stats = StatsCollector()
    forward(plan, sequences, observers=[stats], logits=Logits.NONE)

    model = _hf_model(tiny_models[arch])
    mlp = model.model.layers[1].mlp
    routed = []  # the router returns (logits, weights, expert ids [n_tokens, top_k])
    handle = mlp.gate.register_forward_hook(lambda _m, _args, out: routed.append(out[2].numpy().copy()))
    try:
        x = _hf_inputs(model, mlp.gate, sequences).astype(np.float64)  # [n_tokens, n_embd]
    finally:
        handle.remove()
    chosen = np.concatenate(routed)  # [n_tokens, n_expert_used]

    gate = stats.columns["blk.1.ffn_gate_exps.weight"]
    counts = gate.tokens()
    assert counts.sum() == sum(LENGTHS) * cfg.n_expert_used
    np.testing.assert_array_equal(counts, np.bincount(chosen.ravel(), minlength=cfg.n_expert))
    np.testing.assert_array_equal(stats.columns["blk.1.ffn_down_exps.weight"].tokens(), counts)
    expected = np.stack([np.mean(x[(chosen == e).any(axis=1)] ** 2, axis=0) for e in range(cfg.n_expert)])
    _assert_close_rel(gate.mean_sq(), expected)
    assert stats.columns["blk.1.ffn_gate_inp.weight"].tokens() == sum(LENGTHS)
    if cfg.moe.shared_expert:
        xs = _hf_inputs(model, mlp.shared_expert.down_proj, sequences).astype(np.float64)
        _assert_close_rel(stats.columns["blk.1.ffn_down_shexp.weight"].mean_sq(), np.mean(xs**2, axis=0))


def test_collect_statistics(tiny_models, plan_of):
    plan = plan_of("qwen2_moe")
    text = VARIED_TEXT * 4
    stats = collect_statistics(plan, text, n_ctx=64, max_tokens=640)
    n_text = len(tokenize(plan, text))
    assert stats.n_chunks == min(n_text // 64, 10)  # this tokenizer adds no BOS
    assert stats.n_tokens == stats.n_chunks * 64
    assert stats.text_sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    linears = {t.name for t in plan.tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    assert linears <= set(stats.columns)
    assert stats.tokens("blk.0.ffn_down_shexp.weight") == stats.n_tokens
    assert stats.tokens("blk.0.ffn_up_exps.weight").sum() == stats.n_tokens * plan.hparams.n_expert_used
    assert stats.importance("blk.0.ffn_up_exps.weight").shape == (plan.hparams.n_expert, plan.hparams.n_embd)
    assert stats.importance("blk.0.attn_q.weight").shape == (plan.hparams.n_embd,)
    assert stats.recipe()["n_tokens"] == stats.n_tokens


def test_gguf_source_gives_the_same_statistics(tiny_models, plan_of, tmp_path):
    """A GGUF (tied output, rope_freqs from the file) is tokenized by llama.cpp and run the same way."""
    gguf = edgeai.convert(tiny_models["llama3"], tmp_path / "llama3.gguf", outtype="f32")
    from_hf, from_gguf = plan_of("llama3"), open_plan(gguf, "f32")
    try:
        assert "output.weight" not in {t.name for t in from_gguf.tensors}
        sequences = _sequences(from_hf.hparams.n_vocab)
        np.testing.assert_allclose(forward(from_gguf, sequences), forward(from_hf, sequences), atol=1e-5)
        a = collect_statistics(from_hf, VARIED_TEXT * 3, n_ctx=32)
        b = collect_statistics(from_gguf, VARIED_TEXT * 3, n_ctx=32)
    finally:
        from_gguf.close()
    assert (a.n_chunks, a.text_sha256) == (b.n_chunks, b.text_sha256)
    assert set(a.columns) == set(b.columns)
    for name in a.columns:
        _assert_close_rel(b.importance(name), a.importance(name))


def test_too_short_text_says_how_many_tokens(plan_of):
    plan = plan_of("llama")
    text = "def fib(n): return n"
    found = len(tokenize(plan, text))
    with pytest.raises(CalibrationError, match=rf"is {found} tokens long, but one chunk of n_ctx=64 needs 64"):
        collect_statistics(plan, text, n_ctx=64)


def test_chunks_start_with_bos_when_the_model_adds_it():
    chunks = calibration_chunks(list(range(10, 30)), n_ctx=8, bos=1, max_tokens=100)
    assert [c.tolist() for c in chunks] == [[1, *range(10, 17)], [1, *range(17, 24)]]  # 6 leftover tokens dropped
    assert len(calibration_chunks(list(range(100)), n_ctx=8, bos=None, max_tokens=20)) == 2
    with pytest.raises(CalibrationError, match="6 tokens long, but one chunk of n_ctx=8 needs 7 \\(plus BOS\\)"):
        calibration_chunks(list(range(6)), n_ctx=8, bos=1, max_tokens=100)
