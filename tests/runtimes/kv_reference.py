"""A float64 numpy forward pass of the dense Llama-family models whose KV cache is a parameter: each
layer's keys and values go through a cache model (exact, f16, or a block quantizer with or without
the engine's Hadamard rotation) before attention reads them, as the native engine writes a token's
keys and values into its cache before attending. Several cache models run side by side, one block's
weights in memory at a time (`reference_logits`), so that what a cache costs is measured against
the same float64 model, and what the rotation buys against a plain per-block quantizer.

Weights are read through `edgeai.converters.plan` (float32 in GGUF layout); the layers are
`edgeai.quant.forward`'s, in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgeai.architectures import QKNorm, RopeStyle
from edgeai.quant.forward import ForwardConfig, load_block

# A cache model: rows [T, n_head_kv * head_dim] (keys after RoPE, or values) -> what attention reads.
# One with an `exact_recent` attribute R reads the R latest positions of each query through its `exact`
# attribute instead (f16).
CacheModel = Callable[[np.ndarray], np.ndarray]
# The keys' cache model and the values'.
KVModel = tuple[CacheModel, CacheModel]


# native/src/model.hpp kExactRecent: a 4-bit cache keeps its latest positions in f16 too, and attention
# reads those from there
EXACT_RECENT = 64


def hadamard(n: int) -> np.ndarray:
    """The n x n Sylvester-Hadamard matrix / sqrt(n) (n a power of 2): symmetric, orthonormal."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotation_sizes(head_dim: int) -> tuple[int, int]:
    """The engine's rotations (model.cpp): keys in chunks of the largest power of 2 dividing head_dim,
    values in chunks of up to 64."""
    k = 32
    while head_dim % (2 * k) == 0:
        k *= 2
    return k, min(k, 64)


def block_cache(kind: str, rotation: int = 0) -> CacheModel:
    """Rows rounded by the block format `kind` (edgeai.quant.formats: q8_0, q4_0) in float32, after a
    Hadamard rotation over chunks of `rotation` values (0: none) that is undone after decoding (the
    engine rotates the query instead of undoing it on keys, and the output instead of values: the
    same products)."""
    from edgeai.quant.formats import FORMATS, dequantize, quantize

    fmt = FORMATS[kind]

    def rotated(rows: np.ndarray, rounding: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        x = rows.reshape(-1, rotation) @ hadamard(rotation) if rotation else rows
        y = rounding(x)
        return (y @ hadamard(rotation) if rotation else y).reshape(rows.shape)

    def model(rows: np.ndarray) -> np.ndarray:
        return rotated(rows, lambda x: dequantize(quantize(x.astype(np.float32).ravel(), fmt), fmt).astype(np.float64).reshape(x.shape))

    model.exact = lambda rows: rotated(rows, f16_cache)  # the engine's f16 rows of the same rotated values
    return model


def exact_cache(rows: np.ndarray) -> np.ndarray:
    return rows


def f16_cache(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float16).astype(np.float64)


def _rope(cfg: ForwardConfig, x: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_heads, d] rotated to positions 0..T-1 (or `positions` [T], any sign) in float64."""
    d = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    at = np.arange(x.shape[0], dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    angles = (at * cfg.position_scale)[:, None, None] * inv_freq  # [T, 1, d/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if cfg.rope is RopeStyle.NEOX:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)


def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _linear(w: dict, role: str, x: np.ndarray) -> np.ndarray:
    y = x @ w[f"{role}.weight"].T
    bias = w.get(f"{role}.bias")
    return y if bias is None else y + bias


def kv_model(kind: str, head_dim: int, rotate: bool = True, exact_recent: int = EXACT_RECENT) -> KVModel:
    """The cache models of a KV cache type as the engine names it ("q4_0", "q8_0/q4_0", ...), with the
    engine's rotations (or none: rotate=False, a plain per-block quantizer); a 4-bit half reads the
    `exact_recent` latest positions of each query as f16 (0: none), as the engine does."""
    rot_k, rot_v = rotation_sizes(head_dim) if rotate else (0, 0)
    parts = kind.split("/")
    k, v = parts[0], parts[-1]

    def one(t: str, rot: int) -> CacheModel:
        if t == "f16":
            return f16_cache
        model = block_cache(t, rot)
        model.exact_recent = exact_recent if t == "q4_0" else 0
        return model

    return one(k, rot_k), one(v, rot_v)


EXACT: KVModel = (exact_cache, exact_cache)


def _block(cfg: ForwardConfig, w: dict, x: np.ndarray, cache: KVModel, probs: list | None = None) -> np.ndarray:
    """One dense block over x [T, n_embd] with causal attention over the cache's keys and values;
    probs: a list that receives the attention probabilities [n_head_kv, group, T, T]."""
    T, d, hk = x.shape[0], cfg.head_dim, cfg.n_head_kv
    h = _norm(x, w["attn_norm.weight"], cfg.rms_eps)
    q, k, v = (_linear(w, r, h) for r in ("attn_q", "attn_k", "attn_v"))
    if cfg.qk_norm is QKNorm.FULL:
        q, k = _norm(q, w["attn_q_norm.weight"], cfg.rms_eps), _norm(k, w["attn_k_norm.weight"], cfg.rms_eps)
    q, k = q.reshape(T, cfg.n_head, d), k.reshape(T, hk, d)
    if cfg.qk_norm is QKNorm.PER_HEAD:
        q, k = _norm(q, w["attn_q_norm.weight"], cfg.rms_eps), _norm(k, w["attn_k_norm.weight"], cfg.rms_eps)
    q, k = _rope(cfg, q), _rope(cfg, k)
    group = cfg.n_head // hk
    qg = q.reshape(T, hk, group, d)
    # [T (query), T (key)]: the keys (values) a query reads as f16 rather than through the cache model
    lag = np.arange(T)[:, None] - np.arange(T)[None, :]
    exact_k, exact_v = ((lag >= 0) & (lag < getattr(m, "exact_recent", 0)) for m in cache)
    kc = cache[0](k.reshape(T, hk * d)).reshape(T, hk, d)  # [T, n_head_kv, d] as attention reads them
    scores = np.einsum("tkgd,skd->kgts", qg, kc)  # [hk, group, T, T]
    if exact_k.any():
        scores = np.where(exact_k, np.einsum("tkgd,skd->kgts", qg, cache[0].exact(k.reshape(T, hk * d)).reshape(T, hk, d)), scores)
    scores = scores / np.sqrt(d) + np.triu(np.full((T, T), -np.inf), k=1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if probs is not None:
        probs.append(p)
    out = np.einsum("kgts,skd->tkgd", np.where(exact_v, 0.0, p), cache[1](v).reshape(T, hk, d))
    if exact_v.any():
        out += np.einsum("kgts,skd->tkgd", np.where(exact_v, p, 0.0), cache[1].exact(v).reshape(T, hk, d))
    out = out.reshape(T, cfg.n_head * d)
    x = x + _linear(w, "attn_output", out)
    h = _norm(x, w["ffn_norm.weight"], cfg.rms_eps)
    a = _linear(w, "ffn_gate", h)
    return x + _linear(w, "ffn_down", a / (1 + np.exp(-a)) * _linear(w, "ffn_up", h))


def reference_logits(path: Path, tokens: Sequence[int], caches: dict[str, KVModel], last: int | None = None) -> dict[str, np.ndarray]:
    """Float64 logits [len(tokens), n_vocab] (or of the `last` positions) of a dense model file for
    each named KV cache model, the blocks run one at a time for all of them."""
    from edgeai.converters.plan import open_plan

    plan = open_plan(path, "f32")
    try:
        cfg = ForwardConfig.from_plan(plan)
        assert cfg.moe is None and not cfg.has_rope_freqs, "the reference runs dense models without rope_freqs"
        embd = plan.read("token_embd.weight")
        hidden = {name: embd[np.asarray(tokens)].astype(np.float64) for name in caches}
        for i in range(cfg.n_layer):
            w = {role: t.astype(np.float64) for role, t in load_block(plan, i).tensors.items()}
            for name, cache in caches.items():
                hidden[name] = _block(cfg, w, hidden[name], cache)
        norm = plan.read("output_norm.weight").astype(np.float64)
        out_w = (embd if cfg.output_weight == "token_embd.weight" else plan.read(cfg.output_weight)).astype(np.float64)
        rows = slice(-last if last else 0, None)
        return {name: _norm(h[rows], norm, cfg.rms_eps) @ out_w.T for name, h in hidden.items()}
    finally:
        plan.close()


def attention_scores(path: Path, tokens: Sequence[int], window: int, cache: KVModel = (f16_cache, f16_cache)) -> np.ndarray:
    """What compaction scores a cache by (`Model::compact` in native/src/model.cpp), in float64: per
    layer and KV head, the attention probability each position gets from the last `window` positions'
    queries, summed over them and over the KV head's query heads: [n_layer, n_head_kv, len(tokens)]."""
    from edgeai.converters.plan import open_plan

    plan = open_plan(path, "f32")
    try:
        cfg = ForwardConfig.from_plan(plan)
        hidden = plan.read("token_embd.weight")[np.asarray(tokens)].astype(np.float64)
        probs: list[np.ndarray] = []
        for i in range(cfg.n_layer):
            w = {role: t.astype(np.float64) for role, t in load_block(plan, i).tensors.items()}
            hidden = _block(cfg, w, hidden, cache, probs)
        return np.stack([p[:, :, -window:, :].sum(axis=(1, 2)) for p in probs])
    finally:
        plan.close()


def one_layer_logits_over(path: Path, tokens: Sequence[int], kept: np.ndarray, token: int,
                          cache: KVModel = (f16_cache, f16_cache), sink: int = 0) -> np.ndarray:
    """Float64 logits [n_vocab] of `token` after a one-layer model's cache was compacted to the
    positions kept[kv_head] of `tokens` (moved down to positions 0.., as the engine moves them), the
    token at the next position. In one layer a key and value depend only on their token and position,
    so this is attention over exactly the kept entries. A 4-bit cache (an `exact_recent` model) as
    `Model::compact` leaves it (keep within its f16 rows' reach, and tokens within its ring of 127, so
    that the sinks' rows are still held): the `sink` first positions and the new token read from
    their f16 rows, the others from their 4-bit rows (a moved key rounded at its old position, turned
    back and rounded again)."""
    from edgeai.converters.plan import open_plan

    plan = open_plan(path, "f32")
    try:
        cfg = ForwardConfig.from_plan(plan)
        assert cfg.n_layer == 1 and cfg.qk_norm is QKNorm.NONE
        embd = plan.read("token_embd.weight").astype(np.float64)
        w = {role: t.astype(np.float64) for role, t in load_block(plan, 0).tensors.items()}
        d, hk = cfg.head_dim, cfg.n_head_kv
        group, keep = cfg.n_head // hk, kept.shape[-1]
        seq = np.asarray(list(tokens) + [token])
        x = embd[seq]
        h = _norm(x, w["attn_norm.weight"], cfg.rms_eps)
        q, k, v = (_linear(w, r, h) for r in ("attn_q", "attn_k", "attn_v"))
        k, v = k.reshape(len(seq), hk, d), v.reshape(len(seq), hk, d)
        # the token's query at position `keep` (rows 0..keep of a rotation, the last one)
        q_last = _rope(cfg, np.repeat(q[-1:].reshape(1, cfg.n_head, d), keep + 1, axis=0))[-1]
        out = np.empty((cfg.n_head, d))
        def rows_of(model: CacheModel, x: np.ndarray, rows: list[int], key: bool) -> np.ndarray:
            """What attention reads of x [n, d] (keys rotated to their new positions 0..n-1)."""
            new = np.arange(len(rows))
            at_new = _rope(cfg, x[:, None, :])[:, 0] if key else x
            if not getattr(model, "exact_recent", 0):
                return model(at_new)
            assert len(rows) <= model.exact_recent, "the new token's query reads every held f16 row"
            old = np.asarray(rows)
            out = model(at_new)  # kept in place: rounded once
            if key:  # moved: rounded at the old position, turned back by the move, rounded again
                once = model(_rope(cfg, x[:, None, :], old)[:, 0])
                moved = model(_rope(cfg, once[:, None, :], new - old)[:, 0])
                out = np.where((old != new)[:, None], moved, out)
            exact = (new < sink) | (new == len(rows) - 1)
            return np.where(exact[:, None], model.exact(at_new), out)

        for kvh in range(hk):
            rows = list(kept[kvh]) + [len(seq) - 1]  # the kept positions at 0..keep-1, then the token
            kh = rows_of(cache[0], k[rows, kvh], rows, True)
            vh = rows_of(cache[1], v[rows, kvh], rows, False)
            for g in range(group):
                s = kh @ q_last[kvh * group + g] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[kvh * group + g] = (p / p.sum()) @ vh
        x = x[-1] + _linear(w, "attn_output", out.reshape(1, -1))[0]
        hn = _norm(x, w["ffn_norm.weight"], cfg.rms_eps)
        a = _linear(w, "ffn_gate", hn)
        x = x + _linear(w, "ffn_down", a / (1 + np.exp(-a)) * _linear(w, "ffn_up", hn))
        out_w = embd if cfg.output_weight == "token_embd.weight" else plan.read(cfg.output_weight).astype(np.float64)
        return _norm(x, plan.read("output_norm.weight").astype(np.float64), cfg.rms_eps) @ out_w.T
    finally:
        plan.close()
