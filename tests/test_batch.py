"""Several sequences on one model: the native engine's sequence slots (`load(parallel=N)`), its batched
step, and `edgeai.batch.BatchGenerator` (continuous batching over `Model.stream` / `Model.chat`).

What must hold: a sequence decoded in a batch with others gets the logits it gets alone (bit for
bit: one-token rows of a batch below 16 rows get the one-token kernel's bits, and prompts are
evaluated on their own), so greedy answers equal the same requests run one at a time; requests
beyond the slots wait and are admitted as slots free up; a cancelled request frees its slot; a
chat's next turn finds its history in the slot it used; the planner counts every slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgeai
from edgeai.errors import BudgetError, CheckpointError, ModelBusyError, OptionError
from edgeai.model import Reply
from edgeai.paths import default_model_path
from edgeai.runtimes.base import GREEDY, Sampling
from edgeai.runtimes.native import NativeBackend

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colors:", "Water boils at"]


@pytest.fixture(scope="module")
def model():
    with edgeai.load(n_ctx=512, threads=2, parallel=3) as m:  # the bundled SmolLM2 (Q4_1)
        yield m


def _alone(backend: NativeBackend, prompt: list[int], n: int, sampling: Sampling = GREEDY):
    """(tokens, logits per step) of one sequence decoded by itself in slot 0."""
    backend.truncate(0)
    backend.set_sampling(sampling)
    toks, logits = [backend.step(prompt)], [backend.logits()]
    for _ in range(n):
        toks.append(backend.step([toks[-1]]))
        logits.append(backend.logits())
    return toks, logits


@pytest.mark.parametrize("kv_cache", ["f16", "q8_0/q4_0"])
def test_a_batch_gives_each_sequence_its_own_logits_bit_for_bit(kv_cache):
    b = NativeBackend(default_model_path(), n_ctx=256, threads=2, kv_cache=kv_cache, parallel=4)
    assert b.n_seq == 4 and b.stats().extra["parallel"] == 4
    prompts = [[1, 2, 3, 50, 60, 70, 80], list(range(100, 170)), [5, 6], list(range(300, 340))]
    sampling = [GREEDY, Sampling(temperature=0.9, seed=7), GREEDY, Sampling(temperature=0.7, top_k=0, seed=3)]
    n = 10
    alone = [_alone(b, p, n, s) for p, s in zip(prompts, sampling)]
    for s in range(4):
        b.truncate(0, seq=s)
        b.set_sampling(sampling[s], seq=s)
    # prompts of several lengths in one call (70 tokens: two prefill batches), then decode steps in
    # a changing order, with a slot sitting out a step now and then
    toks = dict(zip(range(4), b.step_batch([(s, prompts[s], True, None) for s in range(4)])))
    got = {s: ([toks[s]], [b.logits(seq=s)]) for s in range(4)}
    for i in range(n + 2):
        order = [3, 1, 0, 2] if i % 2 else [0, 1, 2, 3]
        order = [s for s in order if len(got[s][0]) <= n and not (i == 3 and s == 2)]
        for s, t in zip(order, b.step_batch([(s, [got[s][0][-1]], True, None) for s in order])):
            got[s][0].append(t)
            got[s][1].append(b.logits(seq=s))
    for s in range(4):
        assert got[s][0] == alone[s][0], f"slot {s}"
        assert all(x.tobytes() == y.tobytes() for x, y in zip(got[s][1], alone[s][1])), f"slot {s}"
        assert b.n_past_of(s) == len(prompts[s]) + n and b.history_of(s)[:len(prompts[s])] == prompts[s]
    # per-slot truncate and evict leave the other slots alone
    before = b.history_of(1)
    b.truncate(3, seq=0)
    b.evict(1, 4, seq=2)
    assert b.n_past_of(0) == 3 and b.history_of(2) == [5] + alone[2][0][2:n] and b.history_of(1) == before
    b.close()


def test_slot_and_step_errors_name_the_fix():
    b = NativeBackend(default_model_path(), n_ctx=32, threads=1, parallel=2)
    with pytest.raises(OptionError, match=r"sequence slot 2 does not exist.*slots 0\.\.1.*parallel"):
        b.truncate(0, seq=2)
    with pytest.raises(OptionError, match="names a sequence slot twice"):
        b.step_batch([(0, [1], True, None), (0, [2], True, None)])
    with pytest.raises(edgeai.errors.ContextOverflowError, match=r"sequence slot 1"):
        b.step_batch([(0, [1], True, None), (1, list(range(40)), True, None)])
    assert b.n_past_of(0) == 0  # refused before anything ran
    with pytest.raises(OptionError, match=r"parallel must be"):
        NativeBackend(default_model_path(), n_ctx=32, parallel=65)
    from edgeai.native_bridge import native

    with pytest.raises(native.ModelError, match="appears twice"):
        b._engine.step_batch([1, 1], [[1], [2]], [True, True], [None, None])
    b.close()


def test_batched_requests_equal_the_same_requests_one_at_a_time(model):
    """Five requests on three slots (two wait, then take freed slots), greedy and seeded sampling, a
    stop string and a constraint: each answer equals the same request run alone."""
    requests = [dict(prompt=p, max_tokens=20 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    requests[1].update(temperature=0.8, seed=11)
    requests[2].update(stop=[","])
    requests[3].update(regex=r"(red|green|blue)(, (red|green|blue)){2}\.")
    alone = [model.generate(**r) for r in requests]
    batch = model.batch()
    handles = [batch.submit(r.pop("prompt"), **r) for r in requests]
    assert batch.waiting == 5 and batch.active == 0
    got = [Reply.of(h) for h in handles]
    assert [str(g) for g in got] == [str(a) for a in alone]
    assert [g.finish_reason for g in got] == [a.finish_reason for a in alone]
    assert not batch.busy and batch.active == 0
    # the steps were shared: fewer engine calls than tokens generated
    assert batch.steps < sum(g.timings.generated_tokens for g in got)


def test_chat_turns_and_cancellation(model):
    batch = model.batch()
    convo = [{"role": "user", "content": "Name a fruit."}]
    first = Reply.of(batch.submit_chat(convo, max_tokens=12, temperature=0))
    other = batch.submit_chat([{"role": "user", "content": "Count to ten."}], max_tokens=200, temperature=0)
    assert next(other).text is not None and other.slot is not None
    # the next turn finds its history in the slot the first used (only the new tokens are evaluated)
    turn = batch.submit_chat(convo + [first.message(), {"role": "user", "content": "Another?"}], max_tokens=8,
                             temperature=0)
    reply = Reply.of(turn)
    assert reply.timings.cached_tokens > 10
    slot = other.slot
    other.cancel()
    batch.step()
    assert other.done and batch.active == 0 and slot in batch._free
    with pytest.raises(StopIteration):
        next(other)
    with pytest.raises(OptionError, match="always streams"):
        batch.submit_chat(convo, stream=False)
    with pytest.raises(OptionError, match="max_tokens"):
        batch.submit("x", max_tokens=0)  # bad options raise at submit
    assert not batch.busy


def test_the_planner_counts_every_slot_and_names_what_fits():
    one = edgeai.plan(n_ctx=2048)
    four = edgeai.plan(n_ctx=2048, parallel=4)
    assert four.kv == 4 * one.kv and four.n_seq == 4 and four.to_json()["parallel"] == 4
    per_slot = four.slot_bytes_per_seq
    budget = four.minimum - 2 * per_slot + per_slot // 2  # room for two slots and a half, not four
    with pytest.raises(BudgetError, match=r"with 4 sequence slots.*2 sequence slots \(--parallel 2\) fit"):
        edgeai.plan(n_ctx=2048, parallel=4, memory_budget=budget)


def test_a_backend_without_slots_runs_requests_one_at_a_time(tiny_chat_gguf, caplog):
    with edgeai.load(tiny_chat_gguf, backend="llama.cpp", n_ctx=256, parallel=2) as m:
        assert "parallel=2 is ignored" in caplog.text
        batch = m.batch()
        assert batch.n_slots == 1
        prompts = [[5, 6, 7], [9, 10]]
        alone = [str(m.generate(p, max_tokens=6, temperature=0)) for p in prompts]
        handles = [batch.submit(p, max_tokens=6, temperature=0) for p in prompts]
        assert [str(Reply.of(h)) for h in handles] == alone
    with pytest.raises(OptionError, match="speculative decoding drafts for one sequence"):
        edgeai.load(n_ctx=64, parallel=2, speculative="lookup")


def test_a_models_own_sequence_serves_one_generation_at_a_time(model):
    """A stream left unfinished is overtaken by a newer generation of its thread (and raises if resumed,
    never decoding on the other's cache); a generation from another thread meanwhile is refused by name."""
    alone = [str(model.generate(p, max_tokens=10, temperature=0)) for p in PROMPTS[:2]]
    old = model.stream(PROMPTS[0], max_tokens=10, temperature=0)
    next(old)
    assert str(model.generate(PROMPTS[1], max_tokens=10, temperature=0)) == alone[1]
    with pytest.raises(ModelBusyError, match="another generation ran on this model"):
        next(old)
    old.close()
    assert str(model.generate(PROMPTS[0], max_tokens=10, temperature=0)) == alone[0]

    held = model.stream(PROMPTS[0], max_tokens=10, temperature=0)
    first = next(held)
    errors = []
    other = threading.Thread(target=lambda: errors.extend(_error_of(f) for f in (
        lambda: model.generate(PROMPTS[1], max_tokens=4), lambda: model.step([5]), model.reset)))
    other.start()
    other.join()
    assert all(isinstance(e, ModelBusyError) for e in errors) and "Model.batch()" in str(errors[0])
    assert first.text + str(Reply.of(held)) == alone[0]  # the holder was not disturbed
    done = []
    other = threading.Thread(target=lambda: done.append(str(model.generate(PROMPTS[1], max_tokens=10, temperature=0))))
    other.start()
    other.join()
    assert done == [alone[1]]  # free again once the holder finished

    left = []  # a stream its thread left unfinished: once that thread is gone, the sequence is free
    other = threading.Thread(target=lambda: left.append(next(iter(model.stream(PROMPTS[1], max_tokens=10)))) or
                             left.append(model.stream(PROMPTS[1], max_tokens=10)) or next(left[-1]))
    other.start()
    other.join()
    assert str(model.generate(PROMPTS[0], max_tokens=10, temperature=0)) == alone[0]


def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc
    return None


def test_requests_iterated_from_several_threads(model):
    """One thread per request (each `next` steps the generator, one step at a time) gives each the
    answer it gets alone; while the batch has requests, a plain generation from another thread is refused."""
    alone = [str(model.generate(p, max_tokens=12, temperature=0)) for p in PROMPTS[:3]]
    batch = model.batch()
    handles = [batch.submit(p, max_tokens=12, temperature=0) for p in PROMPTS[:3]]
    first = next(handles[0]).text  # the batch holds the model's own sequence now
    refused = []
    t = threading.Thread(target=lambda: refused.append(_error_of(lambda: model.generate("Hi", max_tokens=2))))
    t.start()
    t.join()
    assert isinstance(refused[0], ModelBusyError)
    got = [""] * 3

    def drain(i):
        got[i] = "".join(c.text for c in handles[i])

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [first + got[0]] + got[1:] == alone


def test_a_plain_generation_of_the_same_thread_ends_the_batched_request_it_overwrote(model):
    """A batch on every slot, then a plain generation in the same thread (slot 0 is the model's own
    sequence): the request on slot 0 ends with ModelBusyError, the others answer as they would alone."""
    alone = [str(model.generate(p, max_tokens=12, temperature=0)) for p in PROMPTS[:3]]
    batch = model.batch()
    handles = [batch.submit(p, max_tokens=12, temperature=0) for p in PROMPTS[:3]]
    firsts = [next(h).text for h in handles]  # all three admitted, one per slot
    assert sorted(h.slot for h in handles) == [0, 1, 2]
    assert str(model.generate(PROMPTS[3], max_tokens=4, temperature=0))  # takes the model's own sequence
    for i, h in enumerate(handles):
        if h.slot == 0:
            with pytest.raises(ModelBusyError, match="slot 0"):
                Reply.of(h)
        else:
            assert firsts[i] + "".join(c.text for c in h) == alone[i]
    assert not batch.busy
    assert str(model.generate(PROMPTS[0], max_tokens=12, temperature=0)) == alone[0]  # slot 0 emptied, exact again
    assert not batch.busy
    assert str(model.generate(PROMPTS[3], max_tokens=4, temperature=0))  # the sequence is free again
