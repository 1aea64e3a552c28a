"""What happens when the KV cache is full: the context-overflow policies (`load(context_overflow=)`).

- "drop-turns" (the default): a generation stops with finish reason "context" when the cache is
  full, a prompt longer than the context is refused, and the chat REPL drops the oldest turns of a
  conversation to make it fit (`Model.fit_messages`).
- "sink-window": the cache keeps the first `sink` positions (the attention sinks of StreamingLLM,
  Xiao et al. 2023: the first tokens draw attention whatever they say, and dropping them breaks
  the model) and the latest ones; when it fills, the oldest positions after the sinks are evicted
  (`Backend.evict`: the later keys are re-rotated to their new positions, nothing is recomputed)
  and generation goes on. Prompts longer than the context are read piece by piece the same way.
  Memory stays what the cache was sized for, however long the conversation.

A cache that slid holds `tokens[:sink] + tokens[sink + evicted:]` of the conversation so far.
`ContextWindow` remembers how many tokens were evicted and a digest of them, so that the next call
whose prompt continues the same conversation reuses the cache (only the new tokens are evaluated);
any other prompt reuses what the cache really holds and no more.
"""

from __future__ import annotations

import hashlib
import logging
from enum import Enum
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SINK = 4  # StreamingLLM's choice: four initial tokens restore the model's attention pattern
# Positions evicted at once, as a fraction of the window: every eviction moves (and, in a quantized
# cache, rounds again) all later keys, so one position at a time would cost a pass over the cache per
# token; a larger share loses more context at each slide (llama.cpp's context shift drops half).
EVICT_SHARE = 8


class ContextOverflow(str, Enum):
    """The policies by the names users write."""
    DROP_TURNS = "drop-turns"
    SINK_WINDOW = "sink-window"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _digest(tokens: Sequence[int]) -> "hashlib._Hash":
    return hashlib.blake2b(np.asarray(tokens, np.int32).tobytes(), digest_size=16)


class ContextWindow:
    """The KV cache as a window over a conversation's tokens, under one overflow policy."""

    def __init__(self, policy: ContextOverflow | str = ContextOverflow.DROP_TURNS, sink: int = DEFAULT_SINK) -> None:
        from edgeai.options import checked_choice, checked_int

        self.policy = checked_choice("context_overflow", policy, ContextOverflow)
        self.sink = checked_int("context_sink", sink, minimum=0, why="the first positions a sliding cache keeps")
        self.evicted = 0  # tokens evicted from the middle of what the cache holds now
        self.evicted_total = 0  # over the model's life (stats)
        self.evictions = 0
        self._evicted_digest = _digest([])

    @property
    def slides(self) -> bool:
        """The cache evicts to make room instead of stopping."""
        return self.policy is ContextOverflow.SINK_WINDOW

    def reuse(self, cached: Sequence[int], tokens: Sequence[int]) -> tuple[int, int]:
        """(cache positions to keep, prompt tokens they stand for) when `tokens` is the next prompt
        and `cached` the tokens the cache holds. The two differ by the evicted tokens when the
        prompt continues the conversation the cache slid over."""
        s, e = self.sink, self.evicted
        if e and len(tokens) > s + e and list(tokens[:s]) == list(cached[:s]) \
                and _digest(tokens[s:s + e]).digest() == self._evicted_digest.digest():
            q = common_prefix(cached[s:], tokens[s + e:])
            return s + q, s + e + q
        n = common_prefix(cached, tokens)
        if e:
            n = min(n, s)  # past the sinks the cache holds later tokens than the prompt has there
        return n, n

    def kept(self, n: int) -> None:
        """The cache was cut to its first `n` positions: with no window position left, no eviction
        stands between the cache and the tokens it holds."""
        if n <= self.sink:
            self.evicted, self._evicted_digest = 0, _digest([])

    def make_room(self, backend, needed: int) -> bool:
        """Ensure `needed` more positions fit in `backend`'s cache, evicting the oldest positions
        after the sinks if the policy slides; False when they do not fit (the policy stops, or
        `needed` is more than the window can ever hold)."""
        free = backend.n_ctx - backend.n_past
        if needed <= free:
            return True
        window = backend.n_ctx - self.sink
        if not self.slides or needed > window:
            return False
        k = min(max(needed - free, window // EVICT_SHARE), backend.n_past - self.sink)
        gone = backend.history[self.sink:self.sink + k]
        backend.evict(self.sink, self.sink + k)
        self._evicted_digest.update(np.asarray(gone, np.int32).tobytes())
        self.evicted += k
        self.evicted_total += k
        self.evictions += 1
        log.debug("context full: evicted positions %d..%d (%d evicted so far)", self.sink, self.sink + k, self.evicted)
        return True

    def stats(self, backend) -> dict:
        """The cache's fill, policy and evictions (`Model.stats().extra["context"]`)."""
        return {"policy": self.policy.value, "n_ctx": backend.n_ctx, "fill": backend.n_past, "sink": self.sink,
                "evicted": self.evicted, "evicted_total": self.evicted_total, "evictions": self.evictions}
