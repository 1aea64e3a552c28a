"""`Model`: generation on top of one backend, layered `step -> stream -> generate / chat`.

The backend (`runtimes.base.Backend`) evaluates tokens and samples; this module adds what every
engine shares: sampling options, incremental UTF-8 decoding, stop strings, max tokens, the
chat template (jinja2, sandboxed), prompt-prefix reuse of the KV cache, and context limits.
"""

from __future__ import annotations

import codecs
import enum
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeai.errors import ContextOverflowError, OptionError
from edgeai.runtimes.base import Backend, BackendStats, Sampling

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
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
    text held back because it may begin a stop string. The last chunk has a `finish_reason`."""

    text: str
    token: int | None  # None on a closing chunk that carries no token (context full)
    finish_reason: FinishReason | None
    timings: Timings


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as `[{"role": ..., "content": ...}]`; an OptionError names the first bad one."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise OptionError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OptionError(f"message {i} must be a dict with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise OptionError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class Model:
    """A loaded model: `generate`, `stream`, `chat`, `tokenize`, `detokenize`. Use it as a context
    manager, or call `close()` to free the engine's memory."""

    def __init__(self, backend: Backend, *, device: Any = None, memory_budget: int | None = None) -> None:
        self.backend = backend
        self.path: Path = backend.path
        self.device = device
        self.memory_budget = memory_budget
        self._template, self._plain = _compile_template(backend.chat_template, self.path.name)
        self._template_failed = False
        specials = backend.tokenize("", add_special=True)
        self._bos_prefix = [t for t in specials[:1] if t == backend.bos_id]
        self._cache_suspect = False  # an interrupted step may have left the cache out of step with history

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
        return self.backend.step(tokens)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.backend.truncate(0)

    def stats(self) -> BackendStats:
        return self.backend.stats()

    @staticmethod
    def sampling(**options: Any) -> Sampling:
        """`Sampling` from keyword options; an unknown name is an OptionError listing the known ones."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise OptionError(f"unknown sampling option {unknown[0]!r}; use {', '.join(SAMPLING_OPTIONS)}")
        return Sampling(**options)

    # -- generation ------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
               stop: Sequence[str] | str | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Generate from `prompt` (text, or token ids used as they are), one `Chunk` per token.

        The KV cache keeps its longest prefix shared with the prompt (only the rest is evaluated).
        Stops at an end-of-generation token, a stop string (not included in the text), after
        `max_tokens` (a whole number >= 1; larger than the room left in the context is fine: the
        context filling up ends the generation too, with finish_reason "context"), or when the
        context is full. Sampling options: see `runtimes.base.Sampling`.
        """
        from edgeai.options import checked_int

        params = self.sampling(**sampling)
        # no upper bound: generation also stops when the context is full (finish_reason "context")
        checked_int("max_tokens", max_tokens, minimum=1, why="the most tokens to generate; generation also stops "
                    "at a full context")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise OptionError("the prompt is empty (no tokens); give some text")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
                                       "(with room for the answer); shorten it or load the model with a larger n_ctx")
        return self._stream(tokens, max_tokens, stops, params)

    def _stream(self, tokens: list[int], max_tokens: int, stops: list[str], params: Sampling) -> Iterator[Chunk]:
        be = self.backend
        if self._cache_suspect:
            be.truncate(0)
        # reuse the cached prefix, but evaluate at least one token: its logits give the first sample
        cached = min(_common_prefix(be.history, tokens), len(tokens) - 1)
        be.truncate(cached)
        be.set_sampling(params)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = _StopStrings(stops)
        pending = tokens[cached:]
        prev_piece = be.detokenize(tokens[-1:])
        n_gen, prompt_s, decode_s = 0, 0.0, 0.0

        def timings() -> Timings:
            return Timings(len(tokens) - cached, cached, n_gen, prompt_s, decode_s)

        self._cache_suspect = True
        try:
            while True:
                if be.n_past + len(pending) > be.n_ctx:
                    yield Chunk(stopper.flush() + utf8.decode(b"", final=True), None, FinishReason.CONTEXT, timings())
                    break
                t0 = time.perf_counter()
                tok = be.step(pending)
                if n_gen == 0:
                    prompt_s = time.perf_counter() - t0
                else:
                    decode_s += time.perf_counter() - t0
                n_gen += 1
                if tok in be.eog_ids:
                    yield Chunk(stopper.flush() + utf8.decode(b"", final=True), tok, FinishReason.STOP, timings())
                    break
                # the piece of `tok` after the previous token (detokenizers may strip a sequence's first space)
                pair = be.detokenize([pending[-1], tok])
                piece = pair[len(prev_piece):] if pair.startswith(prev_piece) else be.detokenize([tok])
                prev_piece = be.detokenize([tok])
                text, hit = stopper.feed(utf8.decode(piece))
                if hit:
                    yield Chunk(text, tok, FinishReason.STOP, timings())
                    break
                if n_gen >= max_tokens:
                    yield Chunk(text + stopper.flush() + utf8.decode(b"", final=True), tok, FinishReason.LENGTH, timings())
                    break
                yield Chunk(text, tok, None, timings())
                pending = [tok]
            self._cache_suspect = False
        except GeneratorExit:  # the consumer stopped at a yield: the cache matches the history
            self._cache_suspect = False
            raise

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 stop: Sequence[str] | str | None = None, **sampling: Any) -> str:
        """The text generated from `prompt` (see `stream`)."""
        return "".join(c.text for c in self.stream(prompt, max_tokens=max_tokens, stop=stop, **sampling))

    # -- chat ------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The conversation as text through the artifact's chat template; if the template is missing
        or fails (a bug in it), a plain 'role: text' template (with a warning, once).

        Raises ChatTemplateError, for this call only, when the template refuses the conversation
        (its own raise_exception(...), e.g. "no system messages") or is stopped by the sandbox's
        bounds on time and size (`edgeai.chat_template`); the template stays in use.
        """
        from edgeai.chat_template import render
        from edgeai.errors import ChatTemplateError

        msgs = check_messages(messages)
        be = self.backend
        variables = dict(
            messages=msgs, add_generation_prompt=add_generation_prompt,
            bos_token=be.detokenize([be.bos_id]).decode("utf-8", "replace") if be.bos_id is not None else "",
            eos_token=be.detokenize([be.eos_id]).decode("utf-8", "replace") if be.eos_id is not None else "",
        )
        if self._template is not None and not self._template_failed:
            try:
                return render(self._template, variables, self.path.name)
            except ChatTemplateError:
                raise
            except Exception as exc:
                log.warning("the chat template of %s failed to render (%s); using a plain 'role: text' template",
                            self.path.name, exc)
                self._template_failed = True
        return render(self._plain, variables, self.path.name)

    @property
    def plain_chat(self) -> bool:
        """True when chats use the plain fallback template."""
        return self._template is None or self._template_failed

    def chat_tokens(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (special tokens parsed, BOS added once if the artifact wants it)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        tokens = self.tokenize(text, add_special=False, parse_special=True)
        if self._bos_prefix and tokens[:1] != self._bos_prefix:
            tokens = self._bos_prefix + tokens
        return tokens

    def fit_messages(self, messages: Sequence[Mapping[str, str]], *, reserve: int) -> tuple[list[dict[str, str]], int]:
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

    def chat(self, messages: Sequence[Mapping[str, str]], *, stream: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS,
             stop: Sequence[str] | str | None = None, **sampling: Any) -> str | Iterator[Chunk]:
        """The assistant's answer to `messages` ([{"role", "content"}, ...]): a string, or with
        `stream=True` an iterator of `Chunk`. Consecutive turns reuse the cached conversation."""
        tokens = self.chat_tokens(messages)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if self.plain_chat:
            stops += PLAIN_STOPS
        chunks = self.stream(tokens, max_tokens=max_tokens, stop=stops, **sampling)
        return chunks if stream else "".join(c.text for c in chunks)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engine's memory; the model is unusable afterwards. Idempotent."""
        self.backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.path.name!r}, backend={self.backend.name!r}, n_ctx={self.n_ctx})"
