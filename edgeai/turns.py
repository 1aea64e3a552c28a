"""Whose turn it is on a model's own sequence: one generation at a time.

A `Model` has one KV cache for its own sequence (slot 0), and a generation (`Model.stream`, `chat`,
`generate`, or a `BatchGenerator` while it has requests) decodes into it step by step, pausing at
every chunk it yields. Two generations interleaved there would each continue on the other's cache:
wrong tokens, silently. The native engine itself serialises its calls (no crash from two threads),
but only the model knows which generation a cache belongs to. So:

- a generation takes the turn when it starts and gives it back when it ends or is closed;
- a generation started in the thread that holds the turn takes it over (the common case: a stream
  left unfinished, then another call); the older one, if resumed, raises `ModelBusyError` instead of
  decoding on a cache that is no longer its own, and touches nothing when closed;
- a generation started in another thread while the holder's thread is alive is refused with
  `ModelBusyError`, naming the ways out (wait for it, one model per thread, or `Model.batch()`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from edgeai.errors import ModelBusyError

FIXES = ("finish or close the other generation first, load one model per thread, or decode several requests "
         "together with Model.batch()")


class Turn:
    """The holder of a model's sequence (any object naming a generation), and the thread it last ran in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: object | None = None
        self._thread: threading.Thread | None = None

    def take(self, holder: object) -> None:
        """Give the sequence to `holder` (see the module for when another holder is overtaken or refused)."""
        me = threading.current_thread()
        with self._lock:
            other = self._thread
            if self._holder is not None and self._holder is not holder and other is not me and other.is_alive():
                raise ModelBusyError(f"this model is generating in thread {other.name!r}; a model decodes one "
                                     f"generation at a time: {FIXES}")
            self._holder, self._thread = holder, me

    def holds(self, holder: object) -> bool:
        return self._holder is holder

    def resume(self, holder: object) -> None:
        """`holder` continues (in this thread): raises if another generation took the sequence meanwhile."""
        with self._lock:
            if self._holder is not holder:
                raise ModelBusyError("another generation ran on this model since this one's last chunk, so its cache "
                                     f"is gone: {FIXES}")
            self._thread = threading.current_thread()

    def give_back(self, holder: object) -> None:
        with self._lock:
            if self._holder is holder:
                self._holder = self._thread = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The sequence for one call that changes it (`Model.step`, `reset`), by the rules of `take`."""
        holder = object()
        self.take(holder)
        try:
            yield
        finally:
            self.give_back(holder)
