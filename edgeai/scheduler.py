"""Several callers, one model: generation jobs run on a worker thread that owns the `Model`, and
their chunks reach each caller as they are made (usable without HTTP; `edgeai serve` is built on it).

A model with several sequence slots (`load(parallel=N)`, the native engine) runs up to N jobs at once
through an `edgeai.batch.BatchGenerator`: one batched engine step for all of them, jobs admitted
into free slots and retired between steps (continuous batching). Any other model runs one job at a
time, in arrival order. Either way, jobs not yet running wait in a bounded queue (more: BusyError,
HTTP 503), and a job whose caller goes away is stopped at its next step, which frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from edgeai.errors import EdgeAIError

log = logging.getLogger(__name__)

_END = object()

# Items for async callers, by event loop, delivered together (`deliver`): one wakeup of a loop for all
# the chunks of a batched step rather than one per chunk.
Outbox = dict[asyncio.AbstractEventLoop, list[tuple["Job", Any]]]


def _put_all(items: list[tuple[Job, Any]]) -> None:  # on the caller's loop
    for job, item in items:
        job._items.put_nowait(item)


def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[Job, Any]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the caller's loop is closed: nobody is listening
        for job, _ in items:
            job.cancelled.set()


def deliver(outbox: Outbox) -> None:
    """Hand each event loop its items of `outbox` in one call, in order, and empty it."""
    for loop, items in outbox.items():
        _send(loop, items)
    outbox.clear()


class BusyError(EdgeAIError):
    """The queue of waiting jobs is full: try again later (HTTP 503)."""


class Job:
    """One caller's generation: iterate it (`for` in a thread, `async for` in an event loop) for the
    items its function yields; an exception the function raised is raised from the iteration."""

    def __init__(self, start: Callable[[Any], Iterator[Any]], loop: asyncio.AbstractEventLoop | None) -> None:
        self.start = start
        self.cancelled = threading.Event()
        self._loop = loop
        self._items: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def put(self, item: Any, outbox: Outbox | None = None) -> None:
        """From the worker thread: hand an item (or an exception, or the end) to the caller; with an
        `outbox`, an async caller's item waits there for the outbox's delivery."""
        if self._loop is None:
            self._items.put(item)
        elif outbox is not None:
            outbox.setdefault(self._loop, []).append((self, item))
        else:
            _send(self._loop, [(self, item)])

    def cancel(self) -> None:
        """The caller is gone: the worker stops the job at its next item."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Any]:
        while (item := self._items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        while (item := await self._items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """Runs jobs on `model` from one worker thread, in arrival order, as many at once as the model has
    sequence slots (`slots`); at most `max_queue` wait."""

    def __init__(self, model: Any, *, max_queue: int = 16) -> None:
        self.model = model
        self.max_queue = max_queue
        self.slots = int(getattr(model.backend, "n_seq", 1))
        self._batch = model.batch() if self.slots > 1 else None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.running: Job | None = None  # one job at a time: the one running
        self._live: dict[Any, Job] = {}  # batched: the requests started and their jobs
        self._worker = threading.Thread(target=self._work if self._batch is None else self._work_batched,
                                        name="edgeai-scheduler", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet started (batched: not yet given a slot)."""
        return self._waiting + (self._batch.waiting if self._batch is not None else 0)

    @property
    def active(self) -> int:
        """Jobs generating now."""
        return self._batch.active if self._batch is not None else int(self.running is not None)

    def submit(self, start: Callable[[Any], Iterator[Any]], *, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue `start(model)` (a function returning an iterator, e.g. of `Chunk`s: with slots, it must
        call the model's `stream` or `chat(..., stream=True)`); BusyError when `max_queue` jobs wait
        already. loop: the event loop of an async caller."""
        with self._lock:
            waiting = self.waiting
            if waiting >= self.max_queue:
                slots = f" ({self.slots} generate at once)" if self.slots > 1 else ""
                raise BusyError(f"{waiting} requests are waiting for the model already{slots} (the most this server "
                                f"queues: {self.max_queue}); try again shortly")
            self._waiting += 1
        job = Job(start, loop)
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():
                job.put(_END)
                continue
            self.running = job
            items = None
            try:
                items = job.start(self.model)
                for item in items:
                    if job.cancelled.is_set():
                        log.info("a caller went away: its generation stops")
                        break
                    job.put(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                job.put(exc)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
                self.running = None
                job.put(_END)

    def _work_batched(self) -> None:
        batch, live = self._batch, self._live
        closing = False
        while not (closing and not batch.busy):
            try:  # new jobs: wait for one when idle, else take those already queued
                job = self._jobs.get(block=not batch.busy and not closing)
                while True:
                    if job is None:
                        closing = True
                    else:
                        self._start(job)
                    job = self._jobs.get_nowait()
            except queue.Empty:
                pass
            for request, job in live.items():
                if job.cancelled.is_set() and not request.cancelled:
                    log.info("a caller went away: its generation stops")
                    request.cancel()
            try:
                batch.step()
            except BaseException as exc:  # noqa: BLE001 - a bug here must not leave callers waiting
                log.exception("the batch generator failed")
                for request, job in live.items():
                    job.put(exc)
                    job.put(_END)
                live.clear()
                self._batch = batch = self.model.batch()
                continue
            outbox: Outbox = {}
            for request, job in list(live.items()):
                for chunk in request.take():
                    job.put(chunk, outbox)
                if request.done:
                    if request.error is not None:
                        job.put(request.error, outbox)
                    job.put(_END, outbox)
                    del live[request]
            deliver(outbox)

    def _start(self, job: Job) -> None:
        """A queued job into the batch generator (its request waits there for a slot)."""
        with self._lock:
            self._waiting -= 1
        if job.cancelled.is_set():
            job.put(_END)
            return
        try:
            request = self._batch.submit_job(job.start)
        except BaseException as exc:  # noqa: BLE001 - bad options: handed to the caller
            job.put(exc)
            job.put(_END)
            return
        self._live[request] = job

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._worker.join(timeout=30)
