"""The engine seam the next capabilities land on: a step with a token mask (structured output),
KV-cache eviction with the later keys re-rotated and compaction per layer and KV head (context-overflow
policies), in every backend that can, with the same answers."""

from __future__ import annotations

import numpy as np
import pytest

import edgeai
from edgeai.context import OBSERVE
from edgeai.errors import BackendError, OptionError
from edgeai.runtimes.base import GREEDY, Sampling
from edgeai.runtimes.sampling import allowed, make_rng, sample


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    """Tiny Llamas with 32-wide heads (a q8_0 KV cache needs them) as F32 GGUFs: {n_layer: path}."""
    from helpers import TINY_ARCHS, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("seam")
    spec = next(a for a in TINY_ARCHS if a.name == "llama")
    return {n: edgeai.convert(make_tiny_checkpoint(root / f"llama{n}", spec, head_dim=32, num_hidden_layers=n),
                              root / f"llama{n}.gguf", outtype="f32") for n in (1, 2)}


def _mask(n_vocab: int, ids) -> np.ndarray:
    bits = np.zeros(((n_vocab + 31) // 32) * 32, dtype=bool)
    bits[list(ids)] = True
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


def test_mask_layout_and_refusals():
    mask = _mask(70, [0, 33, 69])
    assert mask.shape == (3,) and mask[1] == 2 and mask[2] == 1 << 5
    assert list(np.flatnonzero(allowed(mask, 70))) == [0, 33, 69]
    with pytest.raises(OptionError, match="3 uint32 words for a vocabulary of 70"):
        allowed(mask[:2], 70)
    for empty in (np.zeros(3, np.uint32), np.array([0, 0, 1 << 6], np.uint32)):  # bit 70: past the vocabulary
        with pytest.raises(OptionError, match="allows no token"):
            allowed(empty, 70)


def test_native_sampler_with_a_mask_matches_the_reference():
    """Greedy picks the best allowed token; sampling never leaves the allowed set (C++ and numpy)."""
    from edgeai import _native

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    ids = rng.choice(1000, 7, replace=False)
    mask = _mask(1000, ids)
    best = int(ids[np.argmax(logits[ids])])
    args = dict(history=[int(ids[0])], top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64, seed=3)
    assert _native.sample_logits(logits, **{**args, "history": []}, temperature=0.0, n_draws=1, mask=mask) == [best]
    drawn = _native.sample_logits(logits, **args, temperature=1.5, n_draws=300, mask=mask)
    assert set(drawn) <= set(ids.tolist()) and len(set(drawn)) > 2
    sampling = Sampling(temperature=1.5, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.1, seed=3)
    gen = make_rng(sampling)
    ref = [sample(logits, [int(ids[0])], sampling, gen, mask) for _ in range(300)]
    assert set(ref) <= set(ids.tolist())
    assert sample(logits, [], GREEDY, make_rng(GREEDY), mask) == best


@pytest.mark.parametrize("backend", ["native", "llama.cpp", "onnxruntime"])
def test_step_takes_a_mask_in_every_backend(tiny_chat_gguf, tiny_chat_onnx, backend):
    path = tiny_chat_onnx if backend == "onnxruntime" else tiny_chat_gguf
    with edgeai.load(path, backend=backend, threads=1) as m:
        b = m.backend
        b.set_sampling(GREEDY)
        prompt = b.tokenize("Hello there")
        free = b.step(prompt)
        logits = b.logits()
        b.truncate(0)
        ids = [t for t in np.argsort(-logits)[5:12]]  # not the free choice
        assert free not in ids
        token = b.step(prompt, _mask(b.n_vocab, ids))
        assert token == max(ids, key=lambda t: logits[t])
        with pytest.raises(OptionError, match="uint32 words"):
            b.step([token], np.zeros(2, np.uint32))


def _after_evict(path, backend, kv_cache, tokens, start, end, n_ctx=64):
    """Logits of token 7 after `tokens`, with [start, end) evicted; and of the kept tokens + 7 afresh."""
    with edgeai.load(path, backend=backend, threads=1, n_ctx=n_ctx, kv_cache=kv_cache) as m:
        b = m.backend
        b.set_sampling(GREEDY)
        b.step(tokens)
        b.evict(start, end)
        assert b.n_past == len(tokens) - (end - start) and b.history == tokens[:start] + tokens[end:]
        b.step([7])
        shifted = b.logits()
        with pytest.raises(OptionError, match=rf"cannot evict positions \[10, {b.n_past + 1}\)"):
            b.evict(10, b.n_past + 1)
        b.truncate(0)
        b.step(tokens[:start] + tokens[end:] + [7])
        return shifted, b.logits()


TOKENS = [int(t) for t in np.random.default_rng(5).integers(3, 200, 24)]


@pytest.mark.parametrize("backend,kv_cache,tol", [("native", "f16", 1e-2), ("native", "q8_0", 0.1), ("native", "q4_0", 1e-2),
                                                   ("llama.cpp", "f16", 1e-2)])
def test_evict_in_one_layer_equals_evaluating_the_kept_tokens(tiny_llamas, backend, kv_cache, tol):
    """With one layer a key depends only on its token and position, so moving the later keys down
    (re-rotated) must give the logits of the kept tokens evaluated afresh, within the cache's rounding.
    q4_0: 24 tokens are all within the f16 rows of the latest positions, which move with them (re-rotated
    from their f16 bits), so within f16's rounding (read from the 4-bit rows instead: 0.11 of the scale)."""
    shifted, fresh = _after_evict(tiny_llamas[1], backend, kv_cache, TOKENS, 4, 12)
    assert np.max(np.abs(shifted - fresh)) < tol * np.max(np.abs(fresh))


@pytest.mark.parametrize("kv_cache", ["q4_0", "q4_0/f16", "q8_0/q4_0"])
def test_evict_re_encodes_quantized_keys_within_their_own_rounding(tiny_llamas, kv_cache):
    """A quantized key moved by an eviction is decoded, re-rotated and rounded again, so the logits
    after it differ from the kept tokens evaluated afresh by one more rounding of the keys: less than
    twice the cache's own distance from the f16 cache, and, with q8_0 keys, as little as q8_0's (values
    move as they are). 100 tokens, [4, 12) evicted: the next token reads 25 moved keys from the 4-bit
    rows (the latest 64 from the f16 ones)."""
    shifted, fresh = _after_evict(tiny_llamas[1], "native", kv_cache, LONG, 4, 12, n_ctx=128)
    _, fresh_f16 = _after_evict(tiny_llamas[1], "native", "f16", LONG, 4, 12, n_ctx=128)
    scale = np.max(np.abs(fresh_f16))
    own = np.max(np.abs(fresh - fresh_f16))
    assert np.max(np.abs(shifted - fresh)) < (0.02 * scale if kv_cache.startswith("q8_0") else 2 * own)


def test_quantized_caches_with_heads_of_32_equal_the_float64_model(tiny_llamas):
    """Heads of 32 are rotated by 32 (one rotation per block): test_kv4's check against the float64
    model of each cache type, on these heads."""
    from test_kv4 import check_against_the_float64_model

    check_against_the_float64_model(tiny_llamas[2], 32)


def test_evict_matches_llama_cpp_context_shift(tiny_llamas):
    """Deeper layers' keys carry the evicted context (StreamingLLM's trade): there the reference is
    llama.cpp's own shift (llama_memory_seq_rm + seq_add), which the native engine must match."""
    ours, fresh = _after_evict(tiny_llamas[2], "native", "f16", TOKENS, 4, 12)
    theirs, _ = _after_evict(tiny_llamas[2], "llama.cpp", "f16", TOKENS, 4, 12)
    scale = np.max(np.abs(theirs))
    assert np.max(np.abs(ours - theirs)) < 1e-2 * scale < np.max(np.abs(ours - fresh))


def test_onnxruntime_refuses_to_evict(tiny_chat_onnx):
    with edgeai.load(tiny_chat_onnx, backend="onnxruntime", threads=1) as m:
        m.backend.step([5, 6, 7])
        with pytest.raises(BackendError, match="cannot evict"):
            m.backend.evict(0, 1)


LONG = [int(t) for t in np.random.default_rng(11).integers(3, 200, 100)]


def _rule(scores: np.ndarray, keep: int, sink: int, recent: int) -> np.ndarray:
    """The compaction rule over scores [n_layer, n_kv, n] (native/src/model.cpp, Model::compact)."""
    from edgeai import _native

    width = _native.Engine.POOL_WIDTH
    n = scores.shape[-1]
    lo, hi = sink, n - recent
    kept = np.empty(scores.shape[:2] + (keep,), np.int64)
    for idx in np.ndindex(scores.shape[:2]):
        s = scores[idx]
        pooled = np.array([s[max(lo, j - width // 2):min(hi, j + width // 2 + 1)].max() for j in range(lo, hi)])
        order = sorted(range(lo, hi), key=lambda j: (-pooled[j - lo], -j))[:keep - sink - recent]
        kept[idx] = list(range(sink)) + sorted(order) + list(range(hi, n))
    return kept


def test_compaction_keeps_exactly_the_positions_the_rule_selects(tiny_llamas):
    """The engine's scores are the float64 model's attention of the last OBSERVE queries (summed over
    them and a KV head's query heads), and the kept positions are the rule's over them."""
    from kv_reference import attention_scores

    with edgeai.load(tiny_llamas[2], backend="native", n_ctx=128, threads=2, context_overflow="compact") as m:
        b = m.backend
        b.eval_logits(LONG)
        kept, scores = b._call("compact", len(LONG), 50, 4, 8, 0, True)
        assert kept.shape == (2, 2, 50) and scores.shape == (2, 2, len(LONG))
        assert b.n_past == 50 and b.history == LONG[:4] + LONG[-46:]
    ref = attention_scores(tiny_llamas[2], LONG, OBSERVE)
    np.testing.assert_allclose(scores, ref, rtol=2e-3, atol=2e-4)
    np.testing.assert_array_equal(kept, _rule(scores, 50, 4, 8))
    # the heads choose differently: a per-head rule, not one set for all
    assert len({tuple(k) for k in kept.reshape(-1, 50)}) > 1


@pytest.mark.parametrize("kv_cache,tol", [("f16", 1e-2), ("q8_0", 0.1), ("q4_0", 1e-3)])
def test_after_compaction_the_next_step_attends_over_exactly_the_kept_entries(tiny_llamas, kv_cache, tol):
    """One layer: each KV head's kept keys, moved down and re-rotated, and the next token, give the
    float64 model's logits of attention over exactly those entries at their new positions. q4_0: as
    the engine leaves a 4-bit cache, the sinks and the new token read from their f16 rows and the other
    kept entries from their 4-bit rows, moved keys rounded twice (kv_reference); its f16 rows of the
    moved positions are forgotten (read, they would be other positions')."""
    from kv_reference import kv_model, one_layer_logits_over

    with edgeai.load(tiny_llamas[1], backend="native", n_ctx=128, threads=1, kv_cache=kv_cache,
                     context_overflow="compact") as m:
        b = m.backend
        b.eval_logits(LONG)
        kept = b.compact(40, 4, 8, probe=[9, 8, 7])
        assert b.n_past == 40
        after = b.eval_logits([7])[0]
    ref = one_layer_logits_over(tiny_llamas[1], LONG, kept[0], 7, kv_model(kv_cache, 32), sink=4)
    assert np.max(np.abs(after - ref)) < tol * np.max(np.abs(ref))
