"""The scheduler's hand-over of items to async callers (`edgeai.scheduler`): a batched step's chunks
reach each event loop in one wakeup, each job's in order; a closed loop stops its jobs. (The
scheduler's jobs end to end: tests/test_server.py.)"""

from __future__ import annotations

import asyncio

from edgeai.scheduler import _END, Job, deliver


async def _drain(job: Job) -> list:
    return [item async for item in job]


def test_one_wakeup_per_loop_and_step_and_each_job_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (calls.append(a), real(*a))  # counts the wakeups
        a, b = Job(lambda m: iter(()), loop), Job(lambda m: iter(()), loop)
        outbox = {}
        for step in range(3):  # three steps of a batch of two
            a.put(f"a{step}", outbox)
            b.put(f"b{step}", outbox)
            assert len(calls) == step  # staged, not sent
            deliver(outbox)
            assert len(calls) == step + 1 and not outbox
        a.put(_END, outbox)
        b.put(RuntimeError("b failed"), outbox)
        b.put(_END, outbox)
        deliver(outbox)
        assert len(calls) == 4
        assert await _drain(a) == ["a0", "a1", "a2"]
        got = []
        try:
            async for item in b:
                got.append(item)
        except RuntimeError as exc:
            assert str(exc) == "b failed"
        assert got == ["b0", "b1", "b2"]

    asyncio.run(main())


def test_items_for_a_closed_loop_cancel_their_jobs():
    loop = asyncio.new_event_loop()
    job = Job(lambda m: iter(()), loop)
    loop.close()
    outbox = {}
    job.put("x", outbox)
    deliver(outbox)
    assert job.cancelled.is_set()
    alone = Job(lambda m: iter(()), loop)
    alone.put("y")  # without an outbox: the same
    assert alone.cancelled.is_set()


def test_a_thread_callers_items_go_straight_to_its_queue():
    job = Job(lambda m: iter(()), None)
    outbox = {}
    job.put("x", outbox)
    job.put(_END, outbox)
    assert not outbox  # no loop: nothing staged
    assert list(job) == ["x"]
