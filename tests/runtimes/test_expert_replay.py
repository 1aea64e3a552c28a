"""Offline cache replays (runtimes/expert_replay.py) on hand-made traces."""

import itertools

import numpy as np
import pytest

from edgeai.runtimes.expert_replay import belady, hit_rate, lfu, lru

# The page-reference string of Silberschatz et al., Operating System Concepts (ch. 9/10): with 3
# frames, OPT takes 9 page faults and LRU 12.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_textbook_fault_counts():
    assert (~belady(TEXTBOOK, 3)).sum() == 9
    assert (~lru(TEXTBOOK, 3)).sum() == 12


def test_lru_and_lfu_differ_where_they_should():
    trace = [1, 1, 2, 3, 1, 2]  # at 3, LRU evicts 1 (used longest ago), LFU evicts 2 (used once)
    assert lru(trace, 2).tolist() == [False, True, False, False, False, False]
    assert lfu(trace, 2).tolist() == [False, True, False, False, True, False]


def test_cyclic_scan_defeats_lru_not_belady():
    trace = [0, 1, 2] * 4  # one more key than slots: LRU always evicts the next one needed
    assert lru(trace, 2).sum() == 0
    assert belady(trace, 2).sum() == 5
    assert belady(trace, 3)[3:].all()


def _optimal_hits(trace, slots):
    """The most hits any eviction sequence gets (exhaustive search; no bypass)."""
    best = 0

    def go(i, cache, hits):
        nonlocal best
        if i == len(trace):
            best = max(best, hits)
            return
        key = trace[i]
        if key in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < slots:
            go(i + 1, cache | {key}, hits)
        else:
            for victim in cache:
                go(i + 1, (cache - {victim}) | {key}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_is_optimal_and_bounds_the_others():
    rng = np.random.default_rng(0)
    for _ in range(40):
        trace = rng.integers(0, 5, size=10).tolist()
        slots = int(rng.integers(1, 4))
        b = belady(trace, slots).sum()
        assert b == _optimal_hits(trace, slots), (trace, slots)
        assert b >= lru(trace, slots).sum() and b >= lfu(trace, slots).sum()


def test_enough_slots_miss_only_first_uses():
    trace = [k for k, _ in itertools.product(range(6), range(3))] + list(range(6))
    for replay in (belady, lru, lfu):
        hits = replay(trace, 6)
        assert (~hits).sum() == 6


def test_hit_rate_from_an_index():
    hits = np.array([False, False, True, True])
    assert hit_rate(hits) == 0.5
    assert hit_rate(hits, start=2) == 1.0
    with pytest.raises(ValueError):
        belady([1, 2], 0)
