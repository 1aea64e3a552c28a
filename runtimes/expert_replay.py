"""Offline replays of an expert-access trace: which accesses a cache of `slots` experts would hit.

A trace is the expert store's demand accesses in order (`NativeBackend.expert_trace()`: keys
layer * n_expert + expert). Replaying it under a policy tells how far the store's own policy is
from the best possible one:
- belady: on a miss with a full cache, evict the expert whose next use lies furthest in the future
  (Belady's MIN). No policy without knowledge of the future hits more often; prefetching is not
  part of it, so a store that prefetches can exceed it.
- lru: evict the least recently used.
- lfu: evict the least frequently used so far (counts kept for every expert seen, ties broken by
  recency).
Every miss loads the expert into the cache (no bypass), as the store must to compute with it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def _check(slots: int) -> None:
    if slots < 1:
        raise ValueError(f"a cache needs at least one slot, got {slots}")


def belady(trace: Sequence[int], slots: int) -> np.ndarray:
    """Hits (bool per access) of Belady's MIN with `slots` slots."""
    _check(slots)
    n = len(trace)
    next_use = np.full(n, n, dtype=np.int64)  # index of the key's next access; n = never again
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(trace[i], n)
        last[trace[i]] = i
    hits = np.zeros(n, dtype=bool)
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped on pop
    for i, key in enumerate(trace):
        if key in cached:
            hits[i] = True
        elif len(cached) >= slots:
            while True:
                far, victim = heapq.heappop(heap)
                if cached.get(victim) == -far:
                    del cached[victim]
                    break
        cached[key] = int(next_use[i])
        heapq.heappush(heap, (-int(next_use[i]), key))
    return hits


def lru(trace: Sequence[int], slots: int) -> np.ndarray:
    """Hits (bool per access) of least-recently-used replacement with `slots` slots."""
    _check(slots)
    hits = np.zeros(len(trace), dtype=bool)
    cached: OrderedDict[int, None] = OrderedDict()  # oldest first
    for i, key in enumerate(trace):
        if key in cached:
            hits[i] = True
            cached.move_to_end(key)
            continue
        if len(cached) >= slots:
            cached.popitem(last=False)
        cached[key] = None
    return hits


def lfu(trace: Sequence[int], slots: int) -> np.ndarray:
    """Hits (bool per access) of least-frequently-used replacement with `slots` slots."""
    _check(slots)
    hits = np.zeros(len(trace), dtype=bool)
    count: dict[int, int] = {}
    last_use: dict[int, int] = {}
    cached: set[int] = set()
    for i, key in enumerate(trace):
        count[key] = count.get(key, 0) + 1
        if key in cached:
            hits[i] = True
        else:
            if len(cached) >= slots:
                cached.remove(min(cached, key=lambda k: (count[k], last_use[k])))
            cached.add(key)
        last_use[key] = i
    return hits


REPLAYS = {"belady": belady, "lru": lru, "lfu": lfu}


def hit_rate(hits: np.ndarray, start: int = 0) -> float:
    """The share of hits among accesses from index `start` on (NaN when there are none)."""
    tail = hits[start:]
    return float(tail.mean()) if len(tail) else float("nan")
