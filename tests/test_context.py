"""Context-overflow policies (`edgeai.context`): a sliding cache (sink-window) that keeps the first
tokens and the latest, and a compacting one (compact) that also keeps what the latest queries attend
to; both read prompts longer than the context, reuse their cache across calls that continue the
conversation, and hold their memory flat over a generation many times their size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgeai
from edgeai.context import COMPACT_RECENT, OBSERVE, ContextWindow, common_prefix
from edgeai.errors import BackendError, ContextOverflowError, OptionError

N_CTX = 64


def _free_running(m):
    """Generation that never ends at an end-of-generation token (a tiny random model says one soon)."""
    m.backend.eog_ids = frozenset()


@pytest.mark.parametrize("backend", ["native", "llama.cpp"])
def test_sink_window_generates_past_the_context_and_holds_sinks_and_the_latest(tiny_chat_gguf, backend):
    prompt = "one two three four five six seven"
    with edgeai.load(tiny_chat_gguf, backend=backend, n_ctx=N_CTX, threads=1, context_overflow="sink-window") as m:
        _free_running(m)
        chunks = list(m.stream(prompt, max_tokens=5 * N_CTX, temperature=0))
        assert chunks[-1].finish_reason == "length" and len(chunks) == 5 * N_CTX
        tokens = m.tokenize(prompt) + [c.token for c in chunks]
        ctx = m.stats().extra["context"]
        e = ctx["evicted"]
        assert ctx["policy"] == "sink-window" and ctx["evictions"] >= 4 and e == ctx["evicted_total"]
        assert m.backend.n_past <= N_CTX
        # the cache holds the sinks, then everything after the evicted middle (the last token is sampled, not cached)
        assert m.backend.history == tokens[:4] + tokens[4 + e:-1]


def test_a_continuing_prompt_reuses_the_slid_cache_and_another_does_not(tiny_chat_gguf):
    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=N_CTX, threads=1, context_overflow="sink-window") as m:
        _free_running(m)
        first = m.tokenize("a b c d e f g h")
        out = [c.token for c in m.stream(first, max_tokens=2 * N_CTX, temperature=0)]
        assert m.context.evicted > 0
        cont = first + out + m.tokenize("more words", add_special=False)
        chunks = list(m.stream(cont, max_tokens=4, temperature=0))
        t = chunks[-1].timings
        # only the tokens after the cache's last position were evaluated
        assert t.prompt_tokens == len(cont) - (len(first) + len(out) - 1) and t.cached_tokens == len(first) + len(out) - 1
        # the same text read afresh by a sliding cache gives the same tokens only if nothing was lost; here
        # the answer follows the window: a prompt that differs inside the evicted middle reuses just the sinks
        other = list(cont)
        other[10] = (other[10] + 1) % 32
        chunks = list(m.stream(other, max_tokens=2, temperature=0))
        assert chunks[-1].timings.cached_tokens == 4
        # and a short unrelated prompt reuses what the cache really holds: its common prefix with the sinks
        chunks = list(m.stream(first[:3] + [5, 6, 7], max_tokens=2, temperature=0))
        assert chunks[-1].timings.cached_tokens == 3 and m.context.evicted == 0


def test_a_prompt_longer_than_the_context_is_read_in_pieces(tiny_chat_gguf):
    long = "the quick brown fox jumps over the lazy dog " * 30
    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=N_CTX, threads=1) as m:
        with pytest.raises(ContextOverflowError, match="context holds 64"):
            m.generate(long, max_tokens=4)
        n = len(m.tokenize(long))
    assert n > 3 * N_CTX
    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=N_CTX, threads=1, context_overflow="sink-window") as m:
        _free_running(m)
        reply = m.generate(long, max_tokens=8, temperature=0)
        assert reply.finish_reason == "length" and m.backend.n_past <= N_CTX
        toks = m.tokenize(long)
        e = m.context.evicted
        assert m.backend.history[:4] == toks[:4] and m.backend.history[4:4 + 8] == toks[4 + e:4 + e + 8]
    # the llama.cpp backend slides the same window over the same prompt
    with edgeai.load(tiny_chat_gguf, backend="llama.cpp", n_ctx=N_CTX, threads=1, context_overflow="sink-window") as m:
        _free_running(m)
        assert m.generate(long, max_tokens=8, temperature=0).finish_reason == "length"
        assert m.context.evicted == e and m.backend.history[:12] == toks[:4] + toks[4 + e:4 + e + 8]


def test_drop_turns_stops_at_a_full_context(tiny_chat_gguf):
    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=N_CTX, threads=1) as m:
        _free_running(m)
        chunks = list(m.stream("a b c", max_tokens=5 * N_CTX, temperature=0))
        assert chunks[-1].finish_reason == "context" and m.stats().extra["context"]["evicted_total"] == 0


def test_options_are_checked_by_name(tiny_chat_gguf, tiny_chat_onnx):
    with pytest.raises(OptionError, match="context_overflow must be one of drop-turns, sink-window, compact, got 'shift'"):
        edgeai.load(tiny_chat_gguf, context_overflow="shift")
    with pytest.raises(OptionError, match="the onnxruntime backend cannot"):
        edgeai.load(tiny_chat_onnx, context_overflow="sink-window")
    with pytest.raises(OptionError, match="needs a context of at least 20"):
        edgeai.load(tiny_chat_gguf, n_ctx=16, context_overflow="sink-window")
    with pytest.raises(OptionError, match="'compact' needs a context of at least 84"):
        edgeai.load(tiny_chat_gguf, n_ctx=64, context_overflow="compact")
    for backend, path in (("llama.cpp", tiny_chat_gguf), ("onnxruntime", tiny_chat_onnx)):
        with pytest.raises(OptionError, match=f"the {backend} backend cannot"):
            edgeai.load(path, backend=backend, n_ctx=128, context_overflow="compact")


def test_window_bookkeeping():
    class Cache:  # the part of a backend ContextWindow uses
        n_ctx = 40

        def __init__(self, tokens):
            self.history = list(tokens)

        @property
        def n_past(self):
            return len(self.history)

        def evict(self, start, end):
            del self.history[start:end]

    w = ContextWindow("sink-window", sink=2)
    seq = list(range(100, 140))
    cache = Cache(seq)
    assert w.make_room(cache, 3) and w.evicted == 4  # a slide frees an eighth of the window at least
    assert cache.history == seq[:2] + seq[6:]
    assert w.reuse(cache.history, seq + [7]) == (36, 40)  # the continuation: all of the cache
    assert w.reuse(cache.history, seq[:5]) == (2, 2)  # a prompt inside the evicted part: the sinks
    assert not w.make_room(cache, 39)  # more than the window can ever hold
    assert not ContextWindow("drop-turns").make_room(cache, 5) and common_prefix([1, 2, 3], [1, 2, 4]) == 2
    w.kept(2)
    assert w.evicted == 0 and w.reuse(cache.history, seq) == (2, 2)


def test_compact_bookkeeping():
    """A compacted cache's first positions stand for every token before them: a prompt continuing
    the conversation reuses all of it, any other only the sinks."""
    class Cache:
        n_ctx = 2 * (4 + COMPACT_RECENT + OBSERVE)

        def __init__(self, tokens):
            self.history, self.calls = list(tokens), []

        @property
        def n_past(self):
            return len(self.history)

        def compact(self, keep, sink, recent, probe):
            self.calls.append((keep, sink, recent, list(probe)))
            self.history = self.history[:sink] + self.history[len(self.history) - (keep - sink):]

    w = ContextWindow("compact", sink=4)
    seq = list(range(1000, 1000 + Cache.n_ctx - 3))
    cache = Cache(seq)
    probe = list(range(7, 7 + OBSERVE + 5))
    assert w.make_room(cache, 10, probe)
    window = Cache.n_ctx - 4 - COMPACT_RECENT
    # 7 more positions than were free, but a compaction frees an eighth of the window at least; the
    # probe's tokens are as many of its last ones as fit in the free room
    dropped = window // 8
    keep = len(seq) - dropped
    assert dropped > 10 - 3 and cache.calls == [(keep, 4, max(COMPACT_RECENT, (keep - 4) // 2), probe[-3:])]
    assert (w.compacted, w.folded, w.compactions, w.compacted_total) == (keep, len(seq), 1, dropped)
    more = seq + [5, 6, 7]
    cache.history += [5, 6]
    assert w.reuse(cache.history, more) == (keep + 2, len(seq) + 2)
    assert w.reuse(cache.history, seq[:20] + [1]) == (4, 4)  # inside the folded part: the sinks only
    assert not w.make_room(cache, window + 1)
    w.kept(4)
    assert w.folded == 0 and w.reuse(cache.history, more) == (4, 4)


def test_compaction_needs_the_observed_queries(tiny_chat_gguf):
    from edgeai.runtimes.native import NativeBackend

    b = NativeBackend(tiny_chat_gguf, n_ctx=128, threads=1)  # loaded without observe=
    try:
        b.step([5, 6, 7, 8, 9, 10])
        with pytest.raises(OptionError, match="load it with observe=N"):
            b.compact(4, 1, 1)
        with pytest.raises(OptionError, match="compact a KV cache of 6 positions to 7"):
            b.compact(7, 1, 1)
    finally:
        b.close()


def test_the_planner_counts_the_observed_queries_of_every_slot(tiny_chat_gguf):
    from edgeai.gguf_header import read_header
    from edgeai.native_bridge import native
    from edgeai.runtimes.native import NativeBackend, engine_config

    plain = NativeBackend.plan_for(tiny_chat_gguf, n_ctx=128, parallel=2)
    observed = NativeBackend.plan_for(tiny_chat_gguf, n_ctx=128, parallel=2, observe=OBSERVE)
    config = engine_config(read_header(tiny_chat_gguf))
    one = native.observe_bytes(config, OBSERVE)  # [n_layer][32 queries][n_head * head_dim] floats and positions
    assert one == int(config["n_layer"]) * OBSERVE * (int(config["n_head"]) * int(config["head_dim"]) * 4 + 4)
    # counted with each slot (the plan's total also holds the process's resident set, which moves)
    assert observed.scratch - plain.scratch == 2 * one and observed.slot_bytes_per_seq - plain.slot_bytes_per_seq == one


def test_compact_generates_past_the_context_and_reuses_its_cache(tiny_chat_gguf):
    n_ctx = 128
    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=n_ctx, threads=1, context_overflow="compact") as m:
        _free_running(m)
        first = m.tokenize("one two three four five six seven")
        out = [c.token for c in m.stream(first, max_tokens=4 * n_ctx, temperature=0)]
        assert len(out) == 4 * n_ctx
        ctx = m.stats().extra["context"]
        assert ctx["policy"] == "compact" and ctx["compactions"] >= 3 and ctx["folded"] > n_ctx
        assert m.backend.n_past <= n_ctx
        # the continuation reuses the whole compacted cache: only its new tokens are evaluated
        cont = first + out + m.tokenize("more words", add_special=False)
        chunks = list(m.stream(cont, max_tokens=2, temperature=0))
        t = chunks[-1].timings
        assert t.prompt_tokens == len(cont) - (len(first) + len(out) - 1)
        # a prompt longer than the context is read in pieces, each compaction scored by its end
        long = m.tokenize("the quick brown fox jumps over the lazy dog " * 30)
        assert len(long) > 3 * n_ctx
        before = m.context.compactions
        assert m.generate(long, max_tokens=4, temperature=0).finish_reason == "length"
        assert m.context.compactions > before and m.backend.n_past <= n_ctx
        m.backend.truncate(0)
        with pytest.raises(OptionError, match="cannot compact a KV cache of 0 positions to 10"):
            m.backend.compact(10, 4, 8)
    with edgeai.load(tiny_chat_gguf, backend="llama.cpp", n_ctx=n_ctx, threads=1) as m:
        m.backend.step([5, 6, 7])
        with pytest.raises(BackendError, match="llama.cpp backend cannot compact"):
            m.backend.compact(2, 1, 1)


CHILD = r"""
import json, sys, resource
import edgeai
m = edgeai.load(sys.argv[1], backend="native", n_ctx=int(sys.argv[4]), threads=1, context_overflow=sys.argv[3])
m.backend.eog_ids = frozenset()
n = 0
for c in m.stream("a b c", max_tokens=int(sys.argv[2]), temperature=0):
    n += 1
print(json.dumps({"tokens": n, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "dropped": m.context.evicted_total + m.context.compacted_total}))
"""


@pytest.mark.parametrize("policy,n_ctx", [("sink-window", N_CTX), ("compact", 2 * N_CTX)])
def test_memory_stays_flat_over_a_generation_many_times_the_context(tiny_chat_gguf, tmp_path, policy, n_ctx):
    """Twenty times more tokens than a short run, in the short run's peak memory (a cgroup's limit)."""
    from edgeai.devices.cgroup import run_limited, unavailable

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [policy, str(n_ctx)]
    short = json.loads(subprocess.run([sys.executable, str(script), str(tiny_chat_gguf), str(4 * n_ctx), *args],
                                      capture_output=True, text=True, check=True).stdout)
    why = unavailable()
    if why:
        pytest.skip(f"cannot enforce a memory limit here: {why}")
    limit = short["maxrss_kib"] * 1024 + (8 << 20)  # the short run's peak and 8 MiB for the page cache's swings
    r = run_limited([sys.executable, str(script), str(tiny_chat_gguf), str(80 * n_ctx), *args], limit, timeout=240)
    assert r.returncode == 0 and not r.oom_killed, r.stderr[-2000:]
    long = json.loads(r.stdout)
    assert long["tokens"] == 80 * n_ctx and long["dropped"] > 70 * n_ctx
    assert long["maxrss_kib"] <= short["maxrss_kib"] + 2048  # flat: at most 2 MiB more over 20x the tokens
    assert np.isfinite(r.peak) and r.peak <= limit
