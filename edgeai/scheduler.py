"""Several callers, one model: generation jobs run on a worker thread that owns the `Model`, and
their chunks reach each caller as they are made (usable without HTTP; `edgeai serve` is built on it).

Today every backend decodes one sequence per step, so jobs run one at a time in arrival order and
the rest wait in a bounded queue; a job whose caller goes away is closed at its next chunk, which
frees the model for the next one. (Decoding several sequences in one batched step needs per-sequence
KV slots in the engine; this class is where that scheduling goes.)
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

    def put(self, item: Any) -> None:
        """From the worker thread: hand an item (or an exception, or the end) to the caller."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._items.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self.cancelled.set()
        else:
            self._items.put(item)

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
    """Runs jobs on `model` from one worker thread, in arrival order; at most `max_queue` wait."""

    def __init__(self, model: Any, *, max_queue: int = 16) -> None:
        self.model = model
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.running: Job | None = None
        self._worker = threading.Thread(target=self._work, name="edgeai-scheduler", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet started."""
        return self._waiting

    def submit(self, start: Callable[[Any], Iterator[Any]], *, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue `start(model)` (a function returning an iterator, e.g. of `Chunk`s); BusyError when
        `max_queue` jobs wait already. loop: the event loop of an async caller."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise BusyError(f"{self._waiting} requests are waiting for the model already (the most this server "
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

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._worker.join(timeout=30)
