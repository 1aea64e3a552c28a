"""The reference sampler (numpy), used by the backends whose engine does not sample itself
(onnxruntime; llama.cpp through its logits). The native engine implements the same chain in C++
and is tested against this one. Order and semantics are documented in `runtimes.base`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeai.runtimes.base import Sampling


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], sampling: Sampling) -> np.ndarray:
    """llama.cpp's penalty: positive logits of recently seen tokens are divided by the penalty,
    negative ones multiplied (so both move towards 'less likely'). Returns a new array."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if sampling.repeat_penalty == 1.0 or sampling.repeat_last_n == 0 or not history:
        return out
    seen = np.unique(np.asarray(history[-sampling.repeat_last_n:], dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < out.shape[0])]
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / sampling.repeat_penalty, vals * sampling.repeat_penalty)
    return out


def candidates(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """Filter (top-k, top-p, min-p) and temper: returns (token ids, probabilities), the
    probabilities summing to 1. Logits must already carry the repetition penalty."""
    ids = np.argsort(-logits, kind="stable")
    if sampling.top_k > 0:
        ids = ids[: sampling.top_k]
    z = logits[ids].astype(np.float64)
    p = np.exp(z - z[0])
    p /= p.sum()
    if sampling.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(p), sampling.top_p) + 1)
        ids, z, p = ids[:keep], z[:keep], p[:keep]
    if sampling.min_p > 0:
        keep = max(1, int(np.count_nonzero(p >= sampling.min_p * p[0])))
        ids, z = ids[:keep], z[:keep]
    z = z / sampling.temperature
    p = np.exp(z - z[0])
    return ids, p / p.sum()


def checked_mask(mask: np.ndarray, n_vocab: int) -> np.ndarray:
    """`mask` as contiguous uint32 words [ceil(n_vocab / 32)], bit t % 32 of word t // 32 allowing
    token t (32 tokens a word, low bit first), checked: the shape, and at least one token allowed.
    O(n_vocab / 32): cheap enough for every decode step."""
    from edgeai.errors import OptionError

    mask = np.asarray(mask)
    words = (n_vocab + 31) // 32
    if mask.dtype != np.uint32 or mask.shape != (words,):
        raise OptionError(f"a token mask is {words} uint32 words for a vocabulary of {n_vocab} tokens; "
                          f"got {mask.dtype} {mask.shape}")
    tail = np.uint32((1 << (n_vocab - 32 * (words - 1))) - 1)  # the last word's bits that are tokens
    if not (mask[:-1].any() or mask[-1] & tail):
        raise OptionError("the token mask allows no token of the vocabulary")
    return np.ascontiguousarray(mask)


def mask_words(allow: np.ndarray) -> np.ndarray:
    """The token mask (see `checked_mask`) allowing the tokens `allow` [n_vocab] (bool) marks: the
    inverse of `allowed`."""
    packed = np.packbits(np.asarray(allow, bool), bitorder="little")  # token t: byte t >> 3, bit t & 7
    words = np.zeros((len(allow) + 31) // 32, "<u4")
    words.view(np.uint8)[:packed.size] = packed  # little-endian words: token t is bit t & 31 of word t >> 5
    return words.astype(np.uint32, copy=False)


def allowed(mask: np.ndarray, n_vocab: int) -> np.ndarray:
    """The bool [n_vocab] a token mask allows (see `checked_mask`)."""
    mask = checked_mask(mask, n_vocab)
    return np.unpackbits(mask.astype("<u4").view(np.uint8), bitorder="little")[:n_vocab].astype(bool)


def sample(logits: np.ndarray, history: Sequence[int], sampling: Sampling, rng: np.random.Generator,
           mask: np.ndarray | None = None) -> int:
    """One token from `logits` [n_vocab] given the tokens already in the sequence; `mask` (see
    `allowed`) removes tokens before every other stage, as a grammar does."""
    if mask is not None:
        logits = np.where(allowed(mask, len(logits)), logits, -np.inf).astype(np.float32)
    penalized = apply_repeat_penalty(logits, history, sampling)
    if sampling.greedy:
        return int(np.argmax(penalized))
    ids, p = candidates(penalized, sampling)
    return int(ids[rng.choice(len(ids), p=p)])


def make_rng(sampling: Sampling) -> np.random.Generator:
    """The generator a backend keeps between steps (seeded, or fresh when seed is None)."""
    return np.random.default_rng(sampling.seed)
