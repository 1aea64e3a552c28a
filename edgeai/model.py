"""`Model`: generation on top of one backend, layered `step -> stream -> generate / chat`.

The backend (`runtimes.base.Backend`) evaluates tokens and samples; this module adds what every
engine shares: sampling options, incremental UTF-8 decoding, stop strings, max tokens, the
chat template (jinja2, sandboxed), prompt-prefix reuse of the KV cache, and context limits.
"""

from __future__ import annotations

import codecs
import enum
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeai.batch import STEP_PENDING
from edgeai.constraints import MaskAhead
from edgeai.errors import ContextOverflowError, OptionError
from edgeai.runtimes.base import Backend, BackendStats, Sampling
from edgeai.turns import Turn

if TYPE_CHECKING:
    from edgeai.batch import BatchGenerator

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MATCHER_CACHE = 16  # compiled constraints a Model keeps (`Model._matcher`)
SAMPLING_OPTIONS = tuple(f.name for f in fields(Sampling))
ROLES = ("system", "user", "assistant", "tool")

# Used when the artifact has no chat template or its template fails to render.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PLAIN_STOPS = ("\nuser:", "\nsystem:")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # the context window is full
    TOOL_CALLS = "tool_calls"  # the answer is tool calls (chat with tools; as OpenAI names it)


@dataclass(frozen=True)
class Timings:
    """Counters of one generation so far."""

    prompt_tokens: int  # prompt tokens evaluated (the ones not reused from the KV cache)
    cached_tokens: int  # prompt tokens reused from the KV cache
    generated_tokens: int
    prompt_seconds: float  # prefill and the first sample: the time to first token
    decode_seconds: float  # every later step

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first one (the first is prefill's)."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class Chunk:
    """One step of a stream. `text` may be empty: a token ending inside a UTF-8 character, or
    text held back because it may begin a stop string. The last chunk has a `finish_reason`.

    In a chat, `reasoning` is the text of the model's thinking section (not part of `text`); with
    tools, the last chunk carries the answer's `tool_calls` (OpenAI's shape), whose text is not in
    `text`. `incomplete` (last chunk): a constraint was asked for and the output does not satisfy it
    (max_tokens or the context ran out first, or a stop string cut it)."""

    text: str
    token: int | None  # None on a closing chunk that carries no token (context full, grammar complete)
    finish_reason: FinishReason | None
    timings: Timings
    reasoning: str = ""
    incomplete: bool = False
    tool_calls: tuple = ()
    logprobs: TokenLogprobs | None = None  # with stream(logprobs=N): the token's log-probability and the top N


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's log-probabilities (raw logits, before any sampling stage) at one generated token."""

    logprob: float  # of the token chosen
    top: tuple[tuple[int, float], ...]  # the N most likely tokens, most likely first


def token_logprobs(logits: np.ndarray, token: int, n: int) -> TokenLogprobs:
    """log_softmax of `logits` [n_vocab] at `token`, and its top `n` (token, logprob) pairs."""
    z = logits.astype(np.float64)
    z = z - z.max()
    lse = math.log(float(np.exp(z).sum()))
    top = np.argsort(-z, kind="stable")[:n] if n else np.empty(0, np.int64)
    return TokenLogprobs(float(z[token] - lse), tuple((int(t), float(z[t] - lse)) for t in top))


class Reply(str):
    """A whole answer: the text (this str), and what else is known of it. `finish_reason` as in
    `Chunk`; `incomplete`: a constraint was asked for and the text does not satisfy it (never to be
    parsed as if it did); `reasoning_content`: the thinking section; `tool_calls`: OpenAI-style calls."""

    finish_reason: FinishReason | None
    incomplete: bool
    reasoning_content: str
    tool_calls: list[dict]
    timings: Timings | None

    @classmethod
    def of(cls, chunks: Iterator[Chunk]) -> Reply:
        """The Reply a stream adds up to."""
        text, reasoning, last = [], [], None
        for c in chunks:
            text.append(c.text)
            reasoning.append(c.reasoning)
            last = c
        r = cls("".join(text))
        r.finish_reason = last.finish_reason if last else None
        r.incomplete = bool(last and last.incomplete)
        r.reasoning_content = "".join(reasoning)
        r.tool_calls = list(last.tool_calls) if last else []
        r.timings = last.timings if last else None
        return r

    def message(self) -> dict:
        """The answer as an assistant message for the next `chat` call (OpenAI's shape)."""
        m: dict[str, Any] = {"role": "assistant", "content": str(self)}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        return m


def _checked_logprobs(n: int | None) -> int | None:
    from edgeai.options import checked_int

    return None if n is None else checked_int("logprobs", n, minimum=0, maximum=20, why="the most likely tokens "
                                                "shown beside each one (as OpenAI's top_logprobs)")


class _StopStrings:
    """Holds back text that may be the start of a stop string; reports the first one found."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for k in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                keep = k
                break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _compile_template(source: str | None, model_name: str):
    """(the artifact's chat template, the plain template), compiled in the bounded sandbox
    (`edgeai.chat_template`); the first is None (with a warning) if it does not compile."""
    from edgeai.chat_template import BoundedEnvironment, compile_template

    env = BoundedEnvironment()
    plain = compile_template(env, PLAIN_TEMPLATE)
    if source is None:
        return None, plain
    try:
        return compile_template(env, source), plain
    except Exception as exc:  # jinja2 syntax errors, unknown filters...
        log.warning("the chat template of %s does not compile (%s); using a plain 'role: text' template",
                    model_name, exc)
        return None, plain


def check_messages(messages: Any) -> list[dict]:
    """Messages as `[{"role": ..., "content": ...}]`; an OptionError names the first bad one.
    Besides role and content, an assistant message may carry `tool_calls` (content then may be
    None) and its thinking (`reasoning_content`, or ollama's `thinking`: templates that render a turn's
    thinking read one of them), a tool message `tool_call_id` and `name` (OpenAI's shapes); other keys
    are dropped."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise OptionError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise OptionError(f"message {i} must be a dict with string 'role' and 'content', got {m!r:.80}")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if not (isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise OptionError(f"message {i} must be a dict with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise OptionError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        msg = {"role": m["role"], "content": m.get("content")}
        if calls:
            msg["tool_calls"] = calls
        for key in ("reasoning_content", "thinking"):
            if m["role"] == "assistant" and isinstance(m.get(key), str) and m[key]:
                msg[key] = m[key]
        for key in ("tool_call_id", "name"):
            if m["role"] == "tool" and isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


class Model:
    """A loaded model: `generate`, `stream`, `chat`, `tokenize`, `detokenize`. Use it as a context
    manager, or call `close()` to free the engine's memory."""

    def __init__(self, backend: Backend, *, device: Any = None, memory_budget: int | None = None,
                 speculator: Any = None, context_overflow: str = "drop-turns") -> None:
        """speculator: an `edgeai.speculative.Speculator` over `backend` (generation then drafts and
        verifies several tokens per engine call), or None. context_overflow: what a full KV cache
        does, "drop-turns" (stop; the REPL drops old turns), "sink-window" or "compact" (`edgeai.context`;
        compact needs a backend loaded with observe=, as `edgeai.load` does)."""
        from edgeai.context import ContextWindow

        self.backend = backend
        self.context = ContextWindow(context_overflow)
        policy = self.context.policy.value
        if self.context.compacts and not getattr(backend, "can_compact", False):
            raise OptionError(f"context_overflow='compact' needs a backend that can compact its KV cache per head; the "
                              f"{backend.name} backend cannot for {backend.path.name} (use the native backend for a model "
                              "without sliding-window layers, or context_overflow='sink-window')")
        if self.context.slides and not backend.can_evict:
            raise OptionError(f"context_overflow='{policy}' needs a backend that can evict KV positions; the "
                              f"{backend.name} backend cannot for {backend.path.name} (use the llama.cpp backend, or "
                              "the native one for a model without sliding-window layers)")
        if self.context.slides and backend.n_ctx < self.context.min_context:
            raise OptionError(f"context_overflow='{policy}' needs a context of at least {self.context.min_context} "
                              f"tokens (the sink of {self.context.sink} and a window); this one holds {backend.n_ctx}")
        self._speculator = speculator
        self.path: Path = backend.path
        self.device = device
        self.memory_budget = memory_budget
        self._template, self._plain = _compile_template(backend.chat_template, self.path.name)
        self._template_failed = False
        specials = backend.tokenize("", add_special=True)
        self._bos_prefix = [t for t in specials[:1] if t == backend.bos_id]
        self._cache_suspect = False  # an interrupted step may have left the cache out of step with history
        self._turn = Turn()  # which generation the model's own sequence belongs to (copies share it)
        self._matchers: dict[str, Any] = {}  # grammar -> a compiled Matcher never advanced (see _matcher)

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def chat_template(self) -> str | None:
        return self.backend.chat_template

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids (BOS added as the artifact asks when `add_special`)."""
        return self.backend.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """Token ids -> UTF-8 bytes (a token may end inside a character, hence bytes)."""
        return self.backend.detokenize(tokens)

    def step(self, tokens: Sequence[int]) -> int:
        """Append tokens to the KV cache and sample the next one (see `Backend.step`)."""
        with self._turn.held():
            return self.backend.step(tokens)

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._turn.held():
            self.backend.truncate(0)

    def batch(self, *, prefill_chunk: int = 64) -> BatchGenerator:
        """Several generations at once on this model (continuous batching): an `edgeai.batch.BatchGenerator`
        whose `submit` / `submit_chat` take `stream`'s and `chat`'s arguments and return iterators of
        `Chunk`. With `load(parallel=N)` (native backend) up to N of them decode together, one batched
        engine step for all; otherwise they run one after another. While it has requests it holds the
        model's own sequence (`edgeai.turns`): use the model through it until they are done."""
        from edgeai.batch import BatchGenerator

        return BatchGenerator(self, prefill_chunk=prefill_chunk)

    def stats(self) -> BackendStats:
        """The backend's counters; with speculative decoding, `extra["speculative"]` holds its
        acceptance rate, mean accepted length and counts."""
        stats = self.backend.stats()
        stats.extra["context"] = self.context.stats(self.backend)
        if self._speculator is not None:
            stats.extra["speculative"] = self._speculator.stats.as_dict()
        return stats

    @staticmethod
    def sampling(**options: Any) -> Sampling:
        """`Sampling` from keyword options; an unknown name is an OptionError listing the known ones."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise OptionError(f"unknown sampling option {unknown[0]!r}; use {', '.join(SAMPLING_OPTIONS)}")
        return Sampling(**options)

    # -- generation ------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: Sequence[str] | str | None = None, grammar: str | None = None, json_schema: Any = None,
               regex: str | None = None, response_format: Mapping | None = None, logprobs: int | None = None,
               **sampling: Any) -> Iterator[Chunk]:
        """Generate from `prompt` (text, or token ids used as they are), one `Chunk` per token.

        The KV cache keeps its longest prefix shared with the prompt (only the rest is evaluated).
        Stops at an end-of-generation token, a stop string (not included in the text), after
        `max_tokens` (a whole number >= 1; larger than the room left in the context is fine: the
        context filling up ends the generation too, with finish_reason "context"), or when the
        context is full. Sampling options: see `runtimes.base.Sampling`.

        Structured output (at most one): `grammar` (llama.cpp GBNF text), `json_schema` (a dict),
        `regex`, or OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema",
        "json_schema": {"schema": {...}}}): every token is drawn from those the constraint allows
        (`edgeai.constraints`); a token that is the only one allowed is appended without sampling,
        a run of them evaluated as one batch. A bad constraint raises ConstraintError here, before
        any token; output cut short is marked `incomplete` on the last chunk.

        logprobs: None, or N in 0..20: every chunk with a token carries its log-probability under the
        model and the N most likely tokens (`TokenLogprobs`; forced tokens are then evaluated one by
        one, so each has its own logits).
        """
        from edgeai.constraints import constraint_from

        constraint = constraint_from(grammar=grammar, json_schema=json_schema, regex=regex,
                                     response_format=response_format)
        tokens, params = self._checked_prompt(prompt, max_tokens, sampling)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        return self._stream(tokens, max_tokens, stops, params, self._matcher(constraint),
                            logprobs=_checked_logprobs(logprobs))

    def _checked_prompt(self, prompt: str | Sequence[int], max_tokens: int, sampling: Mapping) -> tuple[list[int], Sampling]:
        from edgeai.options import checked_int

        params = self.sampling(**sampling)
        # no upper bound: generation also stops when the context is full (finish_reason "context")
        checked_int("max_tokens", max_tokens, minimum=1, why="the most tokens to generate; generation also stops "
                    "at a full context")
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise OptionError("the prompt is empty (no tokens); give some text")
        if len(tokens) >= self.n_ctx and not self.context.slides:
            raise ContextOverflowError(f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
                                       "(with room for the answer); shorten it or load the model with a larger n_ctx")
        return tokens, params

    def _matcher(self, constraint):
        """A fresh grammar state for `constraint` over this model's vocabulary (None for None).
        Apps and servers ask for the same few schemas again and again: the last MATCHER_CACHE
        constraints are kept compiled, and each generation gets a copy."""
        if constraint is None:
            return None
        cache = self._matchers
        pristine = cache.pop(constraint.grammar, None)
        if pristine is None:
            pristine = constraint.matcher(self.backend.constraint_tokenizer(), eog_ids=self.backend.eog_ids)
        cache[constraint.grammar] = pristine  # most recently used last
        while len(cache) > MATCHER_CACHE:
            del cache[next(iter(cache))]
        return pristine.copy()

    def _stream(self, tokens: list[int], max_tokens: int, stops: list[str], params: Sampling, matcher=None,
                split=None, tools: bool = False, logprobs: int | None = None) -> Iterator[Chunk]:
        """The generation loop (`_generate`), made now and started at its first chunk. A backend that is
        a slot of a `BatchGenerator` learns the prompt here, before its slot is chosen."""
        announce = getattr(self.backend, "announce", None)
        if announce is not None:
            announce(tokens)
        return self._generate(tokens, max_tokens, stops, params, matcher, split, tools, logprobs)

    def _generate(self, tokens: list[int], max_tokens: int, stops: list[str], params: Sampling, matcher=None,
                  split=None, tools: bool = False, logprobs: int | None = None) -> Iterator[Chunk]:
        """`_decode` holding the model's sequence while it runs (`edgeai.turns`); a slot of a
        `BatchGenerator` is the generator's to guard."""
        args = (tokens, max_tokens, stops, params, matcher, split, tools, logprobs)
        if getattr(self.backend, "batched", False):
            return (yield from self._decode(*args))
        me = object()
        self._turn.take(me)
        try:
            return (yield from self._decode(*args, turn=me))
        finally:
            self._turn.give_back(me)

    def _decode(self, tokens: list[int], max_tokens: int, stops: list[str], params: Sampling, matcher=None,
                split=None, tools: bool = False, logprobs: int | None = None, *,
                turn: object | None = None) -> Iterator[Chunk]:
        """The generation loop. matcher: an `edgeai.constraints.Matcher`, applied once `split` (an
        `edgeai.tools.ThinkSplit` or `HarmonySplit`, chats with a thinking section) reaches the answer;
        a split's own `matcher` (a harmony tool call's arguments) takes over while it has one, and a
        split that `carries_calls` gives the tool calls; tools: parse generic-format tool calls from the
        answer into the last chunk. Over a slot of a `BatchGenerator` it yields STEP_PENDING where it
        waits for its batched step. turn: its holder of the model's turn, checked where it resumes after a
        chunk (another generation may have taken the sequence meanwhile)."""
        be, window = self.backend, self.context

        def resumed() -> None:
            if turn is not None:
                self._turn.resume(turn)

        def owns() -> bool:  # after the last chunk: touch the model only if the sequence is still this one's
            return turn is None or self._turn.holds(turn)

        if self._cache_suspect:
            be.truncate(0)
            window.kept(0)
        # reuse the cached prefix, but evaluate at least one token: its logits give the first sample
        keep, cached = window.reuse(be.history, tokens)
        if cached == len(tokens):
            keep, cached = keep - 1, cached - 1
        be.truncate(keep)
        window.kept(keep)
        be.set_sampling(params)
        spec = self._speculator
        if spec is not None:
            spec.begin(params)
        plain_past: int | None = None
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = _StopStrings(stops)
        pending = tokens[cached:]
        prev = tokens[-1]
        if window.slides:  # a prompt longer than the window: read in pieces, making room before each
            pending = window.read_prompt(be, pending, tokens)
        prev_piece = be.detokenize([prev])
        n_gen, prompt_s, decode_s, stepped = 0, 0.0, 0.0, False
        base = matcher

        def gate():
            """(the matcher in force, whether it applies now): a split's tool call brings its own."""
            m = getattr(split, "matcher", None) or base
            return m, m is not None and (split is None or split.done)

        matcher, active = gate()
        answer: list[str] = []  # the answer's text so far (tool calls are parsed from it)

        def timings() -> Timings:
            return Timings(len(tokens) - cached, cached, n_gen, prompt_s, decode_s)

        def parts(text: str, final: bool = False) -> tuple[str, str]:
            """(thinking, answer) of newly decoded text; final: flush what is held back."""
            if final:
                text += utf8.decode(b"", final=True)
            think, out = split.feed(text) if split is not None else ("", text)
            if final and split is not None:
                t2, o2 = split.flush()
                think, out = think + t2, out + o2
            return think, out

        call_mode = None if tools else "text"  # with tools: "calls" once the answer opens with a call

        def show(text: str) -> str:
            """The part of new answer text a chunk shows: tool calls are not text (they reach the last
            chunk as tool_calls), so with tools the start is held back until it is clear which it is."""
            nonlocal call_mode
            answer.append(text)
            if call_mode == "text":
                return text
            if call_mode is None:
                from edgeai.tools import CALL_OPEN

                whole = "".join(answer)
                head = whole.lstrip()
                if head.startswith(CALL_OPEN):
                    call_mode = "calls"
                elif not CALL_OPEN.startswith(head):
                    call_mode = "text"
                    return whole
            return ""

        def close(reason: FinishReason, tok: int | None, text: str = "", think: str = "") -> Chunk:
            t2, out = parts("", final=True)
            text += show(stopper.flush() + out)
            incomplete = matcher is not None and not (active and matcher.accepting)
            calls: tuple = ()
            found = split.tool_calls() if getattr(split, "carries_calls", False) and not incomplete else []
            if found:
                calls, reason = tuple(found), FinishReason.TOOL_CALLS
            if call_mode != "text":
                from edgeai.tools import parse_tool_calls

                whole = "".join(answer)
                _, found = parse_tool_calls(whole) if call_mode == "calls" and not incomplete else ("", [])
                if found:
                    calls, reason = tuple(found), FinishReason.TOOL_CALLS
                else:  # not calls after all (cut short, or only spaces): the held text is the answer
                    text = whole
            return Chunk(text, tok, reason, timings(), think + t2, incomplete, calls)

        def emit(tok: int, lp: TokenLogprobs | None = None) -> tuple[Chunk, bool]:
            """The chunk of an appended token, and whether it ends the generation."""
            nonlocal prev, prev_piece
            # the piece of `tok` after the previous token (detokenizers may strip a sequence's first space)
            pair = be.detokenize([prev, tok])
            piece = pair[len(prev_piece):] if pair.startswith(prev_piece) else be.detokenize([tok])
            prev, prev_piece = tok, be.detokenize([tok])
            think, out = parts(utf8.decode(piece))
            text, hit = stopper.feed(out)
            text = show(text)
            if hit:
                return replace(close(FinishReason.STOP, tok, text, think), logprobs=lp), True
            if n_gen >= max_tokens:
                return replace(close(FinishReason.LENGTH, tok, text, think), logprobs=lp), True
            return Chunk(text, tok, None, timings(), think, logprobs=lp), False

        # masks made while the forward pass runs: the plain step of an engine that can wait for one
        overlaps = getattr(be, "overlaps_masks", False) and not getattr(be, "batched", False)
        carried = None  # such a mask that turned out to force a token (the next round starts from it)

        def rides(mask: np.ndarray | None) -> int | None:
            """The token `mask` forces where it is appended unsampled, to be evaluated with the next step
            (not an end of generation, which is sampled to end it; not with logprobs: each token its own)."""
            forced = matcher.forced(mask) if mask is not None else None
            return forced if forced is not None and forced not in be.eog_ids and logprobs is None else None

        def next_mask(ahead_ok: bool) -> tuple[np.ndarray | None, MaskAhead | None]:
            """The next token's mask now, or (None, a `MaskAhead` making it during the step) where it
            cannot force a token (a forced one must be known before the step, to be evaluated with it)."""
            if ahead_ok and matcher.forces_nothing():
                return None, MaskAhead(matcher)
            return matcher.mask(), None

        def sample_under(ahead: MaskAhead) -> np.ndarray | None:
            """The step's mask, or None where it forces a token that rides with the next step."""
            words = ahead.words()
            return None if rides(words) is not None else words

        self._cache_suspect = True
        try:
            while True:
                resumed()
                t0 = time.perf_counter()
                mask, ahead, forced = None, None, None
                if active:
                    if matcher.stopped:  # complete, and nothing may follow: no step needed
                        yield close(FinishReason.STOP, None)
                        break
                    # a mask that cannot force a token is made during the step (not for a speculative one)
                    ahead_ok = overlaps and not (spec is not None and stepped and logprobs is None)
                    if carried is not None:  # made during the last step, and it forces a token
                        mask, carried = carried, None
                    else:
                        mask, ahead = next_mask(ahead_ok)
                    # tokens the grammar forces are appended unsampled and evaluated with the next step
                    forced, done = rides(mask), False
                    while forced is not None and not done:
                        if not window.make_room(be, len(pending) + 1):
                            break
                        matcher.consume(forced)
                        pending.append(forced)
                        n_gen += 1
                        chunk, done = emit(forced)
                        yield chunk
                        if not done:
                            resumed()
                            if matcher.stopped:
                                yield close(FinishReason.STOP, None)
                                done = True
                            else:
                                mask, ahead = next_mask(ahead_ok)
                                forced = rides(mask)
                    if done:
                        break
                # a forced run that stopped with a forced token still to append stopped for lack of room
                if not window.make_room(be, len(pending)) or forced is not None:
                    if ahead is not None:
                        ahead.settle()  # the matcher is this thread's again
                    yield close(FinishReason.CONTEXT, None)
                    break
                if spec is not None and stepped and logprobs is None and (matcher is None or active):
                    # may return several tokens (accepted drafts, then the target's own); the last is not cached
                    toks = spec.step(pending, be.history + pending, limit=max_tokens - n_gen, mask=mask,
                                     matcher=matcher if active else None)
                elif getattr(be, "batched", False):  # a slot of a BatchGenerator: stepped together with the others
                    be.request(pending, mask)
                    yield STEP_PENDING
                    toks = [be.result()]
                elif ahead is not None:
                    try:
                        toks = [be.step(pending, mask_fn=lambda: sample_under(ahead))]
                    finally:
                        ahead.settle()
                else:
                    toks = [be.step(pending, mask)]
                if not stepped:
                    prompt_s, stepped = time.perf_counter() - t0, True
                else:
                    decode_s += time.perf_counter() - t0
                if toks[0] < 0:  # the mask made during the step forces a token: nothing sampled, pending cached
                    carried, pending = ahead.words(), []
                    continue
                keep = be.n_past - (len(toks) - 1)  # positions plain decoding would have cached before toks[0]
                finished = False
                for j, tok in enumerate(toks):
                    plain_past = keep + j  # what plain decoding caches before toks[j]: stopping here rolls back to it
                    n_gen += 1
                    # logprobs turn speculation off (below), so the logits are those of this one token
                    lp = token_logprobs(be.logits(), tok, logprobs) if logprobs is not None else None
                    if tok in be.eog_ids:
                        be.truncate(plain_past)
                        yield replace(close(FinishReason.STOP, tok), logprobs=lp)
                        finished = True
                        break
                    if active:
                        matcher.consume(tok)
                    chunk, done = emit(tok, lp)
                    if done:
                        be.truncate(plain_past)
                        yield chunk
                        finished = True
                        break
                    yield chunk
                    resumed()
                    before = (matcher, active)
                    matcher, active = gate()
                    if (matcher, active) != before and j < len(toks) - 1:
                        # the constraint in force changed inside accepted drafts (a harmony call's header
                        # ended): the drafts after this token were not checked against it; drop them
                        be.truncate(plain_past)
                        toks = toks[:j + 1]
                        break
                if finished:
                    break
                pending = [toks[-1]]
            if owns():
                self._cache_suspect = False
        except GeneratorExit:  # the consumer stopped at a yield: the cache matches the history
            if not owns():
                raise  # another generation has the sequence now: nothing here is this one's to fix
            if plain_past is not None and be.n_past > plain_past:
                be.truncate(plain_past)  # drop drafts accepted after the token the consumer stopped at
            self._cache_suspect = False
            raise

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 stop: Sequence[str] | str | None = None, **options: Any) -> Reply:
        """The text generated from `prompt`, as a `Reply` (a str with finish_reason and incomplete);
        options: the constraints and sampling options of `stream`."""
        return Reply.of(self.stream(prompt, max_tokens=max_tokens, stop=stop, **options))

    # -- chat ------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping] | None = None, think: bool | None = None) -> str:
        """The conversation as text through the artifact's chat template; if the template is missing
        or fails (a bug in it), a plain 'role: text' template (with a warning, once).

        tools: OpenAI-style tools, given to a template that renders `tools` itself, else described
        in a system message (`edgeai.tools`, the generic format). think: the template's
        `enable_thinking` (Qwen3's switch for its thinking section); for a harmony template (gpt-oss),
        whose model always thinks, its `reasoning_effort`: "low", "medium" or "high" (ollama's levels),
        False for "low", True for the template's default; None leaves the default.

        Raises ChatTemplateError, for this call only, when the template refuses the conversation
        (its own raise_exception(...), e.g. "no system messages") or is stopped by the sandbox's
        bounds on time and size (`edgeai.chat_template`); the template stays in use.
        """
        from edgeai.chat_template import render
        from edgeai.errors import ChatTemplateError
        from edgeai.tools import check_tools, messages_for_template, openai_tools, template_knows_tools

        checked = check_tools(tools) if tools is not None else None
        native = template_knows_tools(self.chat_template) and not self.plain_chat
        msgs = messages_for_template(check_messages(messages), checked, native)
        be = self.backend
        variables = dict(
            messages=msgs, add_generation_prompt=add_generation_prompt,
            bos_token=be.detokenize([be.bos_id]).decode("utf-8", "replace") if be.bos_id is not None else "",
            eos_token=be.detokenize([be.eos_id]).decode("utf-8", "replace") if be.eos_id is not None else "",
        )
        if checked and native:
            variables["tools"] = openai_tools(checked)
        if think is not None:
            from edgeai.tools import REASONING_EFFORTS

            if not isinstance(think, bool) and think not in REASONING_EFFORTS:
                raise OptionError(f"think must be True, False or one of {', '.join(REASONING_EFFORTS)}, got {think!r:.40}")
            if self.harmony:
                # harmony's thinking cannot be turned off: False asks for the least, True for the template's default
                if think is not True:
                    variables["reasoning_effort"] = "low" if think is False else think
            else:
                variables["enable_thinking"] = bool(think)
        if self._template is not None and not self._template_failed:
            try:
                return render(self._template, variables, self.path.name)
            except ChatTemplateError:
                raise
            except Exception as exc:
                log.warning("the chat template of %s failed to render (%s); using a plain 'role: text' template",
                            self.path.name, exc)
                self._template_failed = True
                if checked:  # the plain template knows no tools: describe them in the generic format
                    variables["messages"] = messages_for_template(check_messages(messages), checked, False)
        return render(self._plain, variables, self.path.name)

    @property
    def plain_chat(self) -> bool:
        """True when chats use the plain fallback template."""
        return self._template is None or self._template_failed

    @property
    def thinks(self) -> bool:
        """Whether the chat template has a thinking section (`<think>`, as Qwen3's and DeepSeek-R1's,
        or harmony's analysis channel, gpt-oss's)."""
        from edgeai.tools import THINK_OPEN

        return not self.plain_chat and (THINK_OPEN in (self.chat_template or "") or self.harmony)

    @property
    def harmony(self) -> bool:
        """Whether chats use OpenAI's harmony format (gpt-oss's template: channels, `edgeai.tools.HarmonySplit`)."""
        from edgeai.tools import is_harmony

        return not self.plain_chat and is_harmony(self.chat_template)

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping] | None = None, think: bool | None = None) -> list[int]:
        """Token ids of the rendered conversation (special tokens parsed, BOS added once if the artifact wants it)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, think=think)
        return self._chat_ids(text)

    def _chat_ids(self, text: str) -> list[int]:
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        if self._bos_prefix and tokens[:1] != self._bos_prefix:
            tokens = self._bos_prefix + tokens
        return tokens

    def fit_messages(self, messages: Sequence[Mapping[str, Any]], *, reserve: int) -> tuple[list[dict], int]:
        """Drop the oldest turns (a user message and the replies after it; system messages stay)
        until the conversation plus `reserve` answer tokens fits the context. Returns (kept
        messages, number of messages dropped)."""
        msgs = check_messages(messages)
        dropped = 0
        while len(self.chat_tokens(msgs)) + reserve > self.n_ctx:
            first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
            if first is None or first == len(msgs) - 1:
                raise ContextOverflowError(
                    f"the last message alone needs more than the {self.n_ctx}-token context (with {reserve} tokens "
                    "kept for the answer); shorten it or load the model with a larger n_ctx")
            end = first + 1
            while end < len(msgs) - 1 and msgs[end]["role"] not in ("user", "system"):
                end += 1
            dropped += end - first
            del msgs[first:end]
        return msgs, dropped

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS,
             stop: Sequence[str] | str | None = None, tools: Sequence[Mapping] | None = None,
             tool_choice: str | Mapping | None = None, parallel_tool_calls: bool = False,
             think: bool | None = None, grammar: str | None = None,
             json_schema: Any = None, regex: str | None = None, response_format: Mapping | None = None,
             logprobs: int | None = None, **sampling: Any) -> Reply | Iterator[Chunk]:
        """The assistant's answer to `messages` ([{"role", "content"}, ...]): a `Reply` (a str with
        finish_reason, reasoning_content, tool_calls, incomplete; `.message()` gives the assistant
        message to append), or with `stream=True` an iterator of `Chunk`. Consecutive turns reuse
        the cached conversation.

        tools / tool_choice: OpenAI's (`edgeai.tools`): "auto" (default) lets the model answer or call,
        "required" makes it call one or more tools, {"type": "function", "function": {"name": N}} call
        N, "none" leaves the tools out; parallel_tool_calls: allow several calls in one answer (else
        one, as llama-server's default); a call's arguments always match the tool's schema, and tool
        results go back as {"role": "tool", "content": ..., "tool_call_id": ...} messages.
        think: for templates with a thinking section, turn it on or off (None: the template's
        default); the thinking text comes apart from the answer (`reasoning_content`, `Chunk.reasoning`)
        and a constraint applies to the answer after it. Constraints, logprobs and sampling: see `stream`.
        """
        from edgeai.constraints import ConstraintError, constraint_from, json_schema_constraint
        from edgeai.tools import (THINK_CLOSE, THINK_OPEN, HarmonySplit, ThinkSplit, check_tool_choice, check_tools,
                                  harmony_call_header, tool_call_constraint)

        constraint = constraint_from(grammar=grammar, json_schema=json_schema, regex=regex,
                                     response_format=response_format)
        harmony = self.harmony
        checked, mode = None, None
        call_constraints: dict = {}  # harmony: each callable tool's arguments constraint
        named = None  # harmony: the tool the answer must call
        if tools is not None:
            checked = check_tools(tools)
            mode, callable_tools = check_tool_choice(tool_choice, checked)
            if mode == "none":
                checked = None
            else:
                if constraint is not None:
                    raise ConstraintError("tools and a constraint (grammar, json_schema, regex, response_format) "
                                          "cannot be combined: the tools' schemas constrain the calls")
                if harmony:
                    if parallel_tool_calls:
                        raise OptionError("parallel_tool_calls: a harmony template (gpt-oss) makes one call per answer")
                    call_constraints = {t.name: json_schema_constraint(t.parameters, option=f"the parameters of tool {t.name!r}")
                                        for t in callable_tools}
                    if mode == "required":
                        if len(callable_tools) > 1:
                            raise OptionError("tool_choice 'required' with several tools: with a harmony template "
                                              "(gpt-oss) the answer can be made to call one named tool; name it "
                                              "({'type': 'function', 'function': {'name': ...}}) or use 'auto'")
                        named = callable_tools[0].name
                else:
                    constraint = tool_call_constraint(callable_tools, mode, parallel=bool(parallel_tool_calls),
                                                      **self._call_marker_ids())
        elif tool_choice is not None:
            raise OptionError("tool_choice needs tools")
        text = self.render_chat(messages, tools=checked, think=think)
        split = None
        if harmony:
            # the answer's messages: analysis is the thinking, the final message (a constraint's) or a call
            # (its tool's arguments constraint) the answer; a named call is opened in the prompt
            if named is not None:
                text += harmony_call_header(named)

            def matcher_for(name: str):
                return self._matcher(call_constraints[name]) if name in call_constraints else None

            split = HarmonySplit(matcher_for, call=named, tools=call_constraints.keys())
        elif self.thinks and not text.rstrip().endswith(THINK_CLOSE):  # (a closed section: no thinking this time)
            if constraint is not None and not text.rstrip().endswith(THINK_OPEN):
                # the model would open its thinking itself, but a constraint in force from the first token
                # would forbid that: open it here, and the constraint starts after </think>
                text += THINK_OPEN + "\n"
            split = ThinkSplit(opened=text.rstrip().endswith(THINK_OPEN))
        tokens, params = self._checked_prompt(self._chat_ids(text), max_tokens, sampling)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if self.plain_chat:
            stops += PLAIN_STOPS
        chunks = self._stream(tokens, max_tokens, stops, params, self._matcher(constraint), split,
                              tools=checked is not None and not harmony, logprobs=_checked_logprobs(logprobs))
        return chunks if stream else Reply.of(chunks)

    def _call_marker_ids(self) -> dict:
        """The token ids of <tool_call> and </tool_call> where the vocabulary has them as special
        tokens (a grammar must then name the token, as its text is not made of ordinary tokens)."""
        from edgeai.tools import CALL_CLOSE, CALL_OPEN

        tokenizer = self.backend.constraint_tokenizer()
        out = {}
        for key, text in (("open_id", CALL_OPEN), ("close_id", CALL_CLOSE)):
            ids = self.tokenize(text, add_special=False, parse_special=True)
            out[key] = ids[0] if len(ids) == 1 and tokenizer.is_special_token(ids[0]) else None
        return out

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engine's memory; the model is unusable afterwards. Idempotent."""
        if self._speculator is not None:
            self._speculator.close()
        self.backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.path.name!r}, backend={self.backend.name!r}, n_ctx={self.n_ctx})"
