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
- "compact" (after SnapKV, Li et al. 2024): when the cache fills, it keeps per layer and KV head the
  sinks, the latest positions (half of what it keeps), and between them the positions the latest queries
  attend to most (`Backend.compact`: scored by the last `OBSERVE` queries, max-pooled over
  neighbours, moved down re-rotated; native backend). A prompt longer than the cache is read piece
  by piece and each compaction is scored by the prompt's own end (its last `OBSERVE` tokens are
  evaluated after the cache as a probe, then dropped): what the prompt asks decides what of the text
  before it is kept, which a window cannot do (a passkey far back in a long text).

A cache that slid holds `tokens[:sink] + tokens[sink + evicted:]` of the conversation so far.
`ContextWindow` remembers how many tokens were evicted and a digest of them, so that the next call
whose prompt continues the same conversation reuses the cache (only the new tokens are evaluated);
any other prompt reuses what the cache really holds and no more. A compacted cache's first
`compacted` positions stand for the conversation's first `folded` tokens (a digest of them is kept
the same way), and the positions after them hold the tokens that came since.
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
OBSERVE = 32  # queries a compaction scores the cache by (SnapKV's observation window)
# The fewest latest positions a compaction keeps: the observed queries' own. It keeps more, half of
# what it keeps (`_compact`; H2O's split between recent and heavy-hitter positions, Zhang et al. 2023):
# on the license text of benchmarks/long_context.py, 2,048 tokens through a cache of 256, perplexity
# 19.48 with the 32 alone, 19.00 with half (sink-window: 17.82, see the README).
COMPACT_RECENT = OBSERVE


class ContextOverflow(str, Enum):
    """The policies by the names users write."""
    DROP_TURNS = "drop-turns"
    SINK_WINDOW = "sink-window"
    COMPACT = "compact"


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
        self.compacted = 0  # cache positions standing for the first `folded` tokens (compact)
        self.folded = 0
        self.compacted_total = 0  # positions dropped by compactions over the model's life (stats)
        self.compactions = 0
        self._folded_digest = _digest([])

    @property
    def slides(self) -> bool:
        """The cache makes room (evicting or compacting) instead of stopping."""
        return self.policy is not ContextOverflow.DROP_TURNS

    @property
    def compacts(self) -> bool:
        return self.policy is ContextOverflow.COMPACT

    @property
    def min_context(self) -> int:
        """The smallest cache the policy works in: its kept positions and a piece of prompt."""
        return self.sink + 16 + (COMPACT_RECENT + OBSERVE if self.compacts else 0)

    def reuse(self, cached: Sequence[int], tokens: Sequence[int]) -> tuple[int, int]:
        """(cache positions to keep, prompt tokens they stand for) when `tokens` is the next prompt
        and `cached` the tokens the cache holds. The two differ by the evicted tokens when the
        prompt continues the conversation the cache slid over."""
        if self.folded:
            p, f = self.compacted, self.folded
            if len(tokens) > f and _digest(tokens[:f]).digest() == self._folded_digest.digest():
                q = common_prefix(cached[p:], tokens[f:])
                return p + q, f + q
            n = min(common_prefix(cached, tokens), self.sink)  # past the sinks the positions stand for others
            return n, n
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
            self.compacted, self.folded, self._folded_digest = 0, 0, _digest([])

    def read_prompt(self, backend, pending: list[int], prompt: Sequence[int]) -> list[int]:
        """Evaluate the start of `pending` (the rest of `prompt` not in the cache) piece by piece,
        making room before each, until what is left fits; returns what is left. A sliding policy only:
        the others stop at a prompt that does not fit."""
        probe = list(prompt[-OBSERVE:]) if self.compacts else []
        # pieces of at most half the window: making room for all the rest at once would leave a
        # compacted cache only what the rest does not fill
        most = (backend.n_ctx - self.sink) // 2
        while len(pending) > backend.n_ctx - backend.n_past:
            if not self.make_room(backend, most, probe):
                raise AssertionError("half the window always fits")  # pragma: no cover
            # the last token stays for the caller's step; a probe's room stays free
            piece = pending[:min(most, backend.n_ctx - backend.n_past - len(probe), len(pending) - 1)]
            backend.step(piece)  # its sample is not used: the next piece follows
            pending = pending[len(piece):]
        return pending

    def make_room(self, backend, needed: int, probe: Sequence[int] = ()) -> bool:
        """Ensure `needed` more positions fit in `backend`'s cache, evicting the oldest positions
        after the sinks (sink-window) or compacting (compact: scored by `probe`'s queries, tokens
        evaluated after the cache and dropped, as many as fit; without, by the latest positions'); False
        when they do not fit (the policy stops, or `needed` is more than the window can ever hold)."""
        free = backend.n_ctx - backend.n_past
        if needed <= free:
            return True
        if self.compacts:
            return self._compact(backend, needed, free, probe)
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

    def _compact(self, backend, needed: int, free: int, probe: Sequence[int]) -> bool:
        n = backend.n_past
        window = backend.n_ctx - self.sink - COMPACT_RECENT
        if needed > window:
            return False
        k = min(max(needed - free, window // EVICT_SHARE), n - self.sink - COMPACT_RECENT)  # positions dropped
        recent = max(COMPACT_RECENT, (n - k - self.sink) // 2)
        cached = backend.history
        # the cache's positions from `compacted` on hold the tokens since the last compaction: folded in now
        self._folded_digest.update(np.asarray(cached[self.compacted:n], np.int32).tobytes())
        self.folded += n - self.compacted
        backend.compact(n - k, self.sink, recent, list(probe)[len(probe) - min(free, len(probe)):])
        self.compacted = n - k
        self.compacted_total += k
        self.compactions += 1
        log.debug("context full: compacted %d positions to %d (%d tokens folded so far)", n, n - k, self.folded)
        return True

    def stats(self, backend) -> dict:
        """The cache's fill, policy, evictions and compactions (`Model.stats().extra["context"]`)."""
        return {"policy": self.policy.value, "n_ctx": backend.n_ctx, "fill": backend.n_past, "sink": self.sink,
                "evicted": self.evicted, "evicted_total": self.evicted_total, "evictions": self.evictions,
                "compacted": self.compacted, "folded": self.folded, "compacted_total": self.compacted_total,
                "compactions": self.compactions}
