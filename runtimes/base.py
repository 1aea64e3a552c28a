"""The protocol every backend (native, llama.cpp, onnxruntime) implements, and the sampling
parameters they share.

A backend owns one loaded artifact and one sequence: a KV cache holding `n_past` positions and
the token ids that filled them (`history`). The API layer (`edgeai.api`) builds everything else
(streaming, stop strings, chat templates, prompt-prefix reuse) from these few calls, so a new
engine only has to implement this file's `Backend`. (The native engine can hold several sequences,
`n_seq` slots: the same calls then take `seq=`, and `edgeai.batch` steps them together.)

Sampling order, the same in every backend (llama.cpp's default chain, without the exotic stages):
repetition penalty over the last `repeat_last_n` tokens -> top-k -> top-p -> min-p ->
temperature -> draw. `temperature <= 0` is greedy (arg-max after the penalty).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Context positions a backend opens when the caller does not say (capped at what the model was
# trained for): enough for a chat, small enough for a Pi's KV cache.
DEFAULT_N_CTX = 2048

# Element types of the KV cache (llama.cpp's names, as in its --cache-type-k/v), largest first:
# q8_0 takes 34/64 of f16's memory (ggml's Q8_0 block: an f16 scale and 32 int8 values) for a small
# loss in accuracy, q4_0 18/64 (an f16 scale and 32 4-bit values). Keys and values may differ:
# "q8_0/q4_0" is q8_0 keys and q4_0 values (keys decide where attention goes, so they are the ones
# to keep finer).
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
# Bytes per cached value of each type (the blocks' bytes over their 32 values).
KV_ELEMENT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_cache_types(value: str | None) -> tuple[str, str]:
    """(keys' type, values' type) of a KV cache type: "q4_0" -> ("q4_0", "q4_0"), "q8_0/q4_0" ->
    ("q8_0", "q4_0"), None -> ("f16", "f16"); OptionError naming the choices for anything else."""
    from edgeai.errors import OptionError

    text = "f16" if value is None else str(value).strip().lower()
    parts = text.split("/")
    if len(parts) > 2 or any(p not in KV_CACHE_TYPES for p in parts):
        raise OptionError(f"KV cache type {value!r} is not one of {', '.join(KV_CACHE_TYPES)}, or a key/value pair "
                          f"of them such as 'q8_0/q4_0' (--kv-cache)")
    return parts[0], parts[-1]


def kv_cache_type(value: str | None) -> str:
    """The KV cache type a backend should use, by its canonical name: `value` checked, "f16" when None,
    one name when keys and values share it ("q4_0/q4_0" -> "q4_0"), else "keys/values"."""
    k, v = kv_cache_types(value)
    return k if k == v else f"{k}/{v}"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Defaults are llama.cpp's (and ollama's) defaults."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh seed per generation

    def __post_init__(self) -> None:
        from edgeai.errors import OptionError
        from edgeai.options import checked_int

        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptionError(f"{name} must be a number, got {value!r:.40}")
        # the engines take 32-bit ints: a larger top_k or window would not reach them intact
        checked_int("top_k", self.top_k, minimum=-(2**31), maximum=2**31 - 1, why="<= 0 turns it off")
        checked_int("repeat_last_n", self.repeat_last_n, minimum=0, maximum=2**31 - 1)
        if self.seed is not None:
            checked_int("seed", self.seed, minimum=-(2**63), maximum=2**64 - 1, why="a 64-bit seed, or None")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan and inf sample garbage
            raise OptionError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise OptionError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise OptionError(f"repeat_penalty must be a finite number > 0 (1 is off), got {self.repeat_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


GREEDY = Sampling(temperature=0.0)


@dataclass
class BackendStats:
    """What a backend can say about itself for `/stats` and `edgeai bench`."""

    backend: str
    n_ctx: int
    n_past: int
    threads: int
    weights_bytes: int  # bytes of weights the engine holds or maps
    extra: dict = field(default_factory=dict)  # engine-specific: kv bytes, expert cache hit rate, ...


@runtime_checkable
class Backend(Protocol):
    """One loaded artifact and one sequence (KV cache) in an engine."""

    name: str  # "native", "llama.cpp", "onnxruntime"
    can_evict: bool  # evict() works (context_overflow="sink-window" needs it)
    can_compact: bool  # compact() works (context_overflow="compact" needs it)
    n_seq: int  # sequence slots: 1, but for the native engine loaded with parallel=N (its calls then take seq=)
    path: Path
    n_ctx: int  # positions the KV cache holds
    n_vocab: int
    bos_id: int | None
    eos_id: int | None  # the artifact's eos token (chat templates write it as `eos_token`)
    eog_ids: frozenset[int]  # end-of-generation tokens (eos, eot, im_end...)
    chat_template: str | None  # jinja2 source from the artifact, if it has one

    @property
    def n_past(self) -> int:
        """Positions in the KV cache (== len(history))."""

    @property
    def history(self) -> list[int]:
        """Token ids in the KV cache, oldest first."""

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids; `add_special` adds BOS/EOS as the artifact asks, `parse_special`
        turns `<|im_start|>`-style text into its special token."""

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """Token ids -> UTF-8 bytes (bytes: one token may end in the middle of a character)."""

    def constraint_tokenizer(self):
        """The vocabulary as an llguidance `LLTokenizer` (structured output, `edgeai.constraints`):
        the bytes of every token, the special ones marked, and the end-of-generation ids."""

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions of the KV cache, drop the rest (0: empty). Speculative
        decoding rolls back rejected drafts with it."""

    def evict(self, start: int, end: int) -> None:
        """Drop positions [start, end) of the KV cache; the later ones move down by end - start, their
        keys re-rotated to the new positions, without recomputation (context-overflow policies).
        A backend whose cache cannot shift raises BackendError saying so."""

    def compact(self, keep: int, sink: int, recent: int, probe: Sequence[int] = ()) -> np.ndarray:
        """Keep `keep` of the cache's positions, chosen per layer and KV head by how much the latest
        queries attend to them (SnapKV-style, `edgeai.context`): the first `sink`, the last `recent`
        and the best scored between, moved down with their keys re-rotated. probe: tokens evaluated
        after the cache first, whose queries then score it (a long prompt's end: what it asks decides
        what of the text is kept), and dropped. Returns the kept positions [n_layer, n_head_kv, keep].
        A backend that cannot raises BackendError saying so."""

    def set_sampling(self, sampling: Sampling) -> None:
        """Use these parameters from now on; re-seeds the random generator."""

    def step(self, tokens: Sequence[int], mask: np.ndarray | None = None) -> int:
        """Append `tokens` to the KV cache (prefill in batches when there are many), then sample
        the next token from the last position's logits and return it. The returned token is not
        yet in the cache: the caller passes it to the next `step`. mask: the tokens the sampler
        may choose (uint32 bit words, `runtimes.sampling.allowed`), applied before every other
        stage (structured output)."""

    def logits(self) -> np.ndarray:
        """Float32 logits [n_vocab] of the last position evaluated (tests, evaluation)."""

    def stats(self) -> BackendStats:
        """Counters for `/stats` and benchmarks."""

    def close(self) -> None:
        """Free the engine's memory; the backend is unusable afterwards. Idempotent."""
