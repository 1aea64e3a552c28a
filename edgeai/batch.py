"""Continuous batching: several generations on one model, decoded together (`Model.batch()`).

A `BatchGenerator` runs each request with the model's own generation code (`Model.stream` /
`Model.chat`: stop strings, constraints, tools, thinking, logprobs and the context policy, unchanged)
on a sequence slot of its own (`load(parallel=N)`: the native engine's slots, each with its own KV
cache, history and sampler), and advances all of them with one engine call per step
(`NativeBackend.step_batch`): the weights are read once per step for every sequence, which is where
a memory-bound decode gains. Between steps, finished and cancelled requests give back their slots
and waiting ones are admitted (continuous batching); a new request takes the free slot whose cache
shares the longest prefix with its prompt, so a chat's next turn reuses its history.

Each request's generator yields `STEP_PENDING` where it needs its engine step (its slot, a
`SlotBackend`, has recorded the tokens and mask); the generator collects those of all slots, runs
them in one call, hands each slot its token and resumes the requests. Prompts are evaluated in
chunks of `prefill_chunk` tokens, one chunk per step, so a long prompt delays the others' next
token by one chunk, not by the whole prompt. A slot's logits are those it would get alone (the
engine's decode batch gives each row the one-token bits below 16 rows; prompts are evaluated on
their own, in the chunks a lone request uses).

A backend with one sequence (llama.cpp, onnxruntime, or the native engine without `parallel`) runs
the same API one request at a time, in arrival order.

Its requests may be iterated from several threads (each `next` steps the generator, one step at a
time); the server's scheduler (`edgeai.scheduler`) steps it from one thread for HTTP requests. With
slots, the generator holds the model's own sequence (slot 0) while it has requests, as a generation
does (`edgeai.turns`): a plain generation in another thread meanwhile is refused, one in the same
thread ends the request it overwrote with `ModelBusyError`.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from edgeai.context import ContextWindow, common_prefix
from edgeai.errors import ModelBusyError

log = logging.getLogger(__name__)

# Yielded by `Model._generate`, in place of a chunk, when its backend is a `SlotBackend` and it waits for
# the engine step it asked its slot for. Callers of `Model.stream` and `Model.chat` never see it.
STEP_PENDING = object()
# A prompt continues a slot's cache when it starts with this share of it at least (a chat's next turn
# re-renders the last answer, whose tokens may differ from the generated ones near its end).
CONTINUES = 0.9


class SlotBackend:
    """One sequence slot of a backend, as the `Backend` that `Model._generate` drives: the calls that
    touch a sequence (history, truncate, evict, sampling, logits) go to this slot; the vocabulary and
    everything else to the backend. A decode step is asked for (`request`) and run by the generator
    together with the other slots' (`result`)."""

    batched = True

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.seq: int | None = None  # bound when the request is admitted
        self.prompt: list[int] = []  # announced when the generation is made (chooses the slot)
        self.pending: tuple[list[int], np.ndarray | None] | None = None
        self._result: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def announce(self, tokens: Sequence[int]) -> None:
        self.prompt = list(tokens)

    @property
    def n_past(self) -> int:
        return self._backend.n_past_of(self.seq)

    @property
    def history(self) -> list[int]:
        return self._backend.history_of(self.seq)

    def truncate(self, n: int) -> None:
        self._backend.truncate(n, seq=self.seq)

    def evict(self, start: int, end: int) -> None:
        self._backend.evict(start, end, seq=self.seq)

    def compact(self, keep: int, sink: int, recent: int, probe: Sequence[int] = ()):
        return self._backend.compact(keep, sink, recent, probe, seq=self.seq)

    def set_sampling(self, sampling) -> None:
        self._backend.set_sampling(sampling, seq=self.seq)

    def logits(self) -> np.ndarray:
        return self._backend.logits(seq=self.seq)

    def step(self, tokens: Sequence[int], mask: np.ndarray | None = None) -> int:
        """At once, alone (a sliding window reading a long prompt piece by piece)."""
        return self._backend.step(tokens, mask, seq=self.seq)

    def request(self, tokens: Sequence[int], mask: np.ndarray | None) -> None:
        self.pending, self._result = (list(tokens), mask), None

    def result(self) -> int:
        token, self._result = self._result, None
        assert token is not None, "resumed before its batched step ran"
        return token


class BatchRequest:
    """One generation of a `BatchGenerator`: iterate it for its chunks (`edgeai.model.Chunk`; each
    `next` steps the generator until this request has one, so one thread can consume several
    requests in turn). An error of the generation is raised from the iteration. `cancel()` ends it
    and frees its slot at the next step."""

    def __init__(self, batch: BatchGenerator, model: Any, generation: Iterator[Any], view: SlotBackend | None) -> None:
        self._batch = batch
        self.model = model  # the request's own Model over its slot
        self._generation = generation
        self.view = view  # None: the backend has no slots (one request at a time)
        self.slot: int | None = None
        self.chunks: deque = deque()  # made and not yet taken
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False

    @property
    def prompt(self) -> list[int]:
        return self.view.prompt if self.view is not None else []

    def take(self) -> list[Any]:
        """The chunks made since the last call (without stepping)."""
        out = list(self.chunks)
        self.chunks.clear()
        return out

    def cancel(self) -> None:
        """The caller is gone: the generation ends at the next step and its slot is freed; chunks
        made and not taken are dropped."""
        self.cancelled = True
        self.chunks.clear()

    def __iter__(self) -> BatchRequest:
        return self

    def __next__(self) -> Any:
        while not self.chunks:
            if self.done:
                if self.error is not None:
                    error, self.error = self.error, None
                    raise error
                raise StopIteration
            self._batch.step()
        return self.chunks.popleft()


class BatchGenerator:
    """Generations on one model, decoded together in its backend's sequence slots (see the module)."""

    def __init__(self, model: Any, *, prefill_chunk: int = 64) -> None:
        from edgeai.options import checked_int

        self.model = model
        backend = model.backend
        self.prefill_chunk = checked_int("prefill_chunk", prefill_chunk, minimum=1,
                                         why="prompt tokens evaluated per step while others decode")
        self.slotted = hasattr(backend, "step_batch")
        self.n_slots = int(getattr(backend, "n_seq", 1)) if self.slotted else 1
        # per slot: its context window (slot 0 is the model's own sequence: its window too) and
        # whether a generation stopped inside an engine call there (its cache may not match its history)
        self._windows = [model.context] + [ContextWindow(model.context.policy, model.context.sink)
                                           for _ in range(self.n_slots - 1)]
        self._suspect = [bool(model._cache_suspect)] + [False] * (self.n_slots - 1)
        self._free = list(range(self.n_slots))
        self._last_used = [0] * self.n_slots  # when each slot was last given to a request
        self._used = 0
        self._waiting: deque[BatchRequest] = deque()
        self._active: list[BatchRequest] = []
        self.steps = 0  # engine calls made
        self.batched_rows = 0  # sequences they stepped, in all
        self._stepping = threading.Lock()  # one step at a time (requests iterated from several threads)
        self._has_turn = False  # holds the model's own sequence (slots only: without, each request takes it)

    # -- submitting ----------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], **options: Any) -> BatchRequest:
        """A generation from `prompt` with `Model.stream`'s options (max_tokens, stop, sampling,
        constraints, logprobs); bad options raise here."""
        return self.submit_job(lambda m: m.stream(prompt, **options))

    def submit_chat(self, messages: Sequence[Any], **options: Any) -> BatchRequest:
        """The answer to `messages` with `Model.chat`'s options (tools, think, constraints, sampling...)."""
        if options.pop("stream", True) is not True:
            from edgeai.errors import OptionError

            raise OptionError("a batched chat always streams: iterate the request, or edgeai.model.Reply.of(it)")
        return self.submit_job(lambda m: m.chat(messages, stream=True, **options))

    def submit_job(self, start: Callable[[Any], Iterator[Any]]) -> BatchRequest:
        """A generation made by `start(model)`, a function calling `stream` or `chat(..., stream=True)`
        on the model it is given (the request's own view of the model, on the slot it will get)."""
        model = copy.copy(self.model)
        model._speculator = None  # speculative decoding drafts for one sequence; batched steps verify none
        view = SlotBackend(self.model.backend) if self.slotted else None
        if view is not None:
            model.backend = view
        request = BatchRequest(self, model, start(model), view)
        self._waiting.append(request)
        return request

    @property
    def waiting(self) -> int:
        """Requests not yet admitted to a slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._active)

    @property
    def busy(self) -> bool:
        return bool(self._active or self._waiting)

    # -- stepping ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until every request is done."""
        while self.step():
            pass

    def step(self) -> bool:
        """One round: retire cancelled requests, admit waiting ones into free slots, advance every
        request to its next engine step (its chunks are then ready), and run those steps in one
        engine call. False when there is nothing left to do."""
        with self._stepping:
            self._hold_turn()
            try:
                return self._step()
            finally:
                if self._has_turn and not self.busy:
                    self.model._turn.give_back(self)
                    self._has_turn = False

    def _hold_turn(self) -> None:
        """With slots, hold the model's own sequence while there are requests (see the module); a
        request on slot 0 whose cache another generation of this thread overwrote ends with the error."""
        if not self.slotted or not self.busy:
            return
        turn = self.model._turn
        if self._has_turn and not turn.holds(self):
            self._suspect[0] = True
            for r in [r for r in self._active if r.slot == 0]:
                self._close(r, ModelBusyError("another generation ran on this model's own sequence (slot 0) during "
                                               "this batched request; iterate the model's batch or its plain "
                                               "generations, not both at once"))
        turn.take(self)
        self._has_turn = True

    def _step(self) -> bool:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, None)
        for r in [r for r in self._active if r.cancelled]:
            self._close(r)
        self._admit()
        for r in list(self._active):
            self._advance(r)
        if self.slotted:
            self._engine_step()
        return self.busy

    def _admit(self) -> None:
        while self._waiting and self._free:
            r = self._waiting.popleft()
            if r.view is None:
                slot = self._free.pop()
            else:
                backend = self.model.backend
                slot = max(self._free, key=lambda s: self._affinity(s, r.prompt))
                self._free.remove(slot)
                r.view.seq = slot
                if self._suspect[slot]:
                    backend.truncate(0, seq=slot)
                    self._windows[slot].kept(0)
                    self._suspect[slot] = False
                r.model.context = self._windows[slot]
            r.model._cache_suspect = self._suspect[slot]  # slotted: False, the slot was just emptied
            r.slot = slot
            self._used += 1
            self._last_used[slot] = self._used
            self._active.append(r)

    def _affinity(self, slot: int, prompt: list[int]) -> tuple:
        """How well `slot` suits a prompt, larger better: a slot whose cache the prompt continues (a
        chat's next turn: nearly all its history is the prompt's start) by the length kept; else the
        least recently used slot, so that a conversation's cache lasts until its next turn (a shared
        system prompt alone is not worth another conversation's history)."""
        history = self.model.backend.history_of(slot)
        kept = common_prefix(history, prompt)
        continues = kept > 0 and kept >= CONTINUES * len(history)
        return (continues, kept if continues else 0, -self._last_used[slot], kept)

    def _advance(self, r: BatchRequest) -> None:
        """Run r's generation up to its next engine step (or, without slots, one chunk)."""
        if r.view is not None and r.view.pending is not None:
            return  # still waiting for its step
        try:
            while True:
                item = next(r._generation)
                if item is STEP_PENDING:
                    return
                r.chunks.append(item)
                if r.view is None:
                    return
        except StopIteration:
            self._finish(r, None)
        except BaseException as exc:  # noqa: BLE001 - the request's caller gets it
            self._finish(r, exc)

    def _engine_step(self) -> None:
        """The steps the active requests wait for, in one engine call: every one-token step, and the
        next prompt chunk of the first request that has one."""
        entries, owners = [], []
        prefilled = False
        for r in self._active:
            if r.view is None or r.view.pending is None:
                continue
            tokens, mask = r.view.pending
            if len(tokens) > 1:
                if prefilled:
                    continue  # one prompt chunk per step: the others' tokens come first
                prefilled = True
                if len(tokens) > self.prefill_chunk:  # this chunk is not sampled: the rest follows
                    entries.append((r.slot, tokens[:self.prefill_chunk], False, None))
                    owners.append((r, tokens[self.prefill_chunk:]))
                    continue
            entries.append((r.slot, tokens, True, mask))
            owners.append((r, None))
        if not entries:
            return
        try:
            tokens = self.model.backend.step_batch(entries)
        except BaseException as exc:  # noqa: BLE001 - the requests in this step get it
            for r, _ in owners:
                self._suspect[r.slot] = True
                self._finish(r, exc)
            return
        self.steps += 1
        self.batched_rows += len(entries)
        for (r, rest), token in zip(owners, tokens):
            if rest is not None:
                r.view.pending = (rest, r.view.pending[1])
            else:
                r.view.pending, r.view._result = None, token

    def _close(self, r: BatchRequest, error: BaseException | None = None) -> None:
        """A cancelled (or overwritten) request: its generation is closed (which rolls its slot back to
        what it answered), then the request ends with `error`."""
        try:
            r._generation.close()
        except BaseException as exc:  # noqa: BLE001
            log.warning("closing a cancelled generation failed: %s", exc)
        self._finish(r, error)

    def _finish(self, r: BatchRequest, error: BaseException | None) -> None:
        r.done, r.error = True, error
        if r in self._active:
            self._active.remove(r)
            if r.view is not None:
                r.view.pending = None
            self._suspect[r.slot] = self._suspect[r.slot] or bool(r.model._cache_suspect)
            if r.slot == 0:  # the model's own sequence: its own flag
                self.model._cache_suspect = self._suspect[0]
            self._free.append(r.slot)
