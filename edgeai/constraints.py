"""Structured output: a grammar, JSON Schema or regex turned into the token mask of every step.

The grammar engine is llguidance (PyPI, no dependencies; Rust core). Chosen over the others that
exist because it is the only one that takes every input format users bring (llama.cpp GBNF,
JSON Schema, regex and Lark) from one engine, works from a vocabulary's token bytes (which the
GGUF gives, so no Hugging Face tokenizer is needed), computes a mask in tens of microseconds on a
49k vocabulary, and releases the GIL while it works. llama.cpp's own grammar sampler is the slow
path the issue names (it checks candidate tokens one by one); outlines-core takes no GBNF; xgrammar
pulls in torch and transformers.

Flow: `constraint_from(...)` checks the user's options and builds a `Constraint` (grammar text for
llguidance, not yet tied to a vocabulary); `Constraint.matcher(tokenizer)` validates it against the
vocabulary and returns a `Matcher`, the state of one generation: `mask()` gives the uint32 words
the backends' `step(tokens, mask)` takes (`runtimes.sampling.checked_mask`'s layout, which is
llguidance's), `consume(token)` advances it.

JSON is generated with a fixed separator style (`", "` and `": "`, as `json.dumps` writes) and no
other whitespace between tokens: a small model cannot ramble with spaces and newlines inside the
structure, and the user's schema is used as given (never simplified). For the same reason a JSON
number's digits come in runs of at most `JSON_DIGITS` (see there): a bound on the mask, not on the
schema.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeai.errors import OptionError

log = logging.getLogger(__name__)

# JSON whitespace: exactly one space after ',' and ':' and none elsewhere (bounded, see above).
# lenient=False: a schema keyword the engine does not implement is refused by name, not ignored.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}

# JSON numbers: at most this many digits in a row (an integral part, a fraction, an exponent: a token
# that also ends the run, such as "99,", can carry it one token past), the
# bound llama.cpp's JSON Schema grammars put on each part. A float64 keeps 15-17 significant digits,
# so a longer run adds nothing a JSON reader keeps, and without a bound a small model that starts
# repeating a digit fills max_tokens inside one number ("33.19888...", which JSON's grammar allows as
# it allows endless whitespace; llguidance has no option for it). It bounds the mask, never the
# schema: where the grammar allows nothing but more digits (a const, a range that needs them), they
# stay allowed.
JSON_DIGITS = 16


class ConstraintError(OptionError):
    """A grammar, schema or regex that cannot be used: the message names the option, the position
    or rule at fault (as the grammar engine reports it), and what to change."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `kind`: "grammar" (GBNF), "lark", "json_schema", "regex" or
    "json_object"; `source`: the user's text (a schema as JSON text); `grammar`: llguidance's form."""

    kind: str
    source: str
    grammar: str

    def matcher(self, tokenizer: Any, *, eog_ids: Sequence[int] = ()) -> Matcher:
        """A fresh `Matcher` over `tokenizer` (an llguidance LLTokenizer, from the backend's
        `constraint_tokenizer()`); ConstraintError if the grammar does not compile for it."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self.grammar, tokenizer)
        if error:
            raise ConstraintError(f"the {_OPTION[self.kind]} cannot be used: {_clean(error)}")
        digits = _digit_tokens(tokenizer) if self.kind in ("json_schema", "json_object") else None
        return Matcher(llguidance.LLMatcher(tokenizer, self.grammar, log_level=0), tokenizer.vocab_size, eog_ids, digits,
                       tokenizer)


# the user-facing option of each kind, for messages
_OPTION = {"grammar": "grammar (GBNF)", "lark": "grammar (Lark)", "json_schema": "json_schema",
           "regex": "regex", "json_object": "response_format json_object"}


def _clean(error: str) -> str:
    """llguidance's message on one line, without its trailing source excerpt's blank lines."""
    return " | ".join(line.rstrip() for line in error.strip().splitlines() if line.strip())


def _grammar_text(option: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConstraintError(f"{option} must be non-empty text, got {value!r:.60}")
    return value


def _schema_text(option: str, schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise ConstraintError(f"{option} must be a JSON Schema (a dict), got {type(schema).__name__}")
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"{option} cannot be written as JSON: {exc}") from None


def json_schema_constraint(schema: Any, *, option: str = "json_schema") -> Constraint:
    """A Constraint for JSON that validates against `schema` (a dict or its JSON text)."""
    import llguidance

    text = _schema_text(option, schema)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    return _checked(Constraint("json_schema", text, grammar), option)


def lark_constraint(lark: str, *, kind: str = "lark") -> Constraint:
    """A Constraint from a Lark grammar in llguidance's dialect (used for tool calls)."""
    import llguidance

    return _checked(Constraint(kind, lark, llguidance.LLMatcher.grammar_from_lark(lark)), _OPTION[kind])


def _checked(c: Constraint, option: str) -> Constraint:
    """`c` if its grammar compiles (without a vocabulary: syntax, rules, schema keywords), else a
    ConstraintError naming `option` and the engine's message (position and rule)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(c.grammar)
    if error:
        raise ConstraintError(f"{option} cannot be used: {_clean(error)}")
    return c


def constraint_from(*, grammar: str | None = None, json_schema: Any = None, regex: str | None = None,
                    response_format: Mapping | None = None) -> Constraint | None:
    """The one Constraint the options ask for (None when none is given), checked before any token
    is generated. At most one of them; `response_format` is OpenAI's: {"type": "text"},
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}, ...}}."""
    import llguidance

    given = [n for n, v in (("grammar", grammar), ("json_schema", json_schema), ("regex", regex),
                            ("response_format", response_format)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one of grammar, json_schema, regex, response_format (got {', '.join(given)})")
    if grammar is not None:
        text = _grammar_text("grammar", grammar)
        try:
            lark = llguidance.gbnf_to_lark.any_to_lark(text)
        except Exception as exc:  # its parser raises plain Exceptions naming the rule or position
            raise ConstraintError(f"grammar (GBNF) cannot be used: {exc}") from None
        return _checked(Constraint("grammar", text, llguidance.LLMatcher.grammar_from_lark(lark)), "grammar (GBNF)")
    if json_schema is not None:
        return json_schema_constraint(json_schema)
    if regex is not None:
        text = _grammar_text("regex", regex)
        return _checked(Constraint("regex", text, llguidance.LLMatcher.grammar_from_regex(text)), "regex")
    if response_format is not None:
        return _response_format(response_format)
    return None


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise ConstraintError(f"response_format must be a dict with a 'type', got {rf!r:.80}")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        c = json_schema_constraint({"type": "object"}, option="response_format")
        return Constraint("json_object", c.source, c.grammar)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ConstraintError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return json_schema_constraint(spec["schema"], option="response_format json_schema")
    raise ConstraintError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def read_constraint_file(path, kind: str) -> Any:
    """A schema (kind "json_schema": parsed JSON) or grammar ("grammar": text) from a file, with a
    ConstraintError naming the file when it cannot be read."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstraintError(f"cannot read the {kind} file {path}: {exc}") from None
    if kind != "json_schema":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"the JSON Schema file {path} is not valid JSON: {exc}") from None


class DigitTokens:
    """Of one vocabulary, the tokens that are nothing but ASCII digits, by length (`JSON_DIGITS`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer  # kept: its bytes decode the tokens a matcher consumes
        n = tokenizer.vocab_size
        lengths = np.zeros(n, np.int32)
        for t in range(n):
            b = tokenizer.decode_bytes([t])
            if b.isdigit():  # bytes.isdigit: ASCII digits only, False for b""
                lengths[t] = len(b)
        self._lengths = lengths
        self._longer: dict[int, np.ndarray | None] = {}

    def longer_than(self, k: int) -> np.ndarray | None:
        """Mask words [ceil(n_vocab / 32)] of the digit tokens longer than k (None: there are none)."""
        if k not in self._longer:
            from edgeai.runtimes.sampling import mask_words

            bits = self._lengths > k
            self._longer[k] = mask_words(bits) if bits.any() else None
        return self._longer[k]


# id(tokenizer) -> its table, the last few vocabularies (about 0.2 s to make for 49k tokens; a table
# keeps its tokenizer alive, so an id stays its tokenizer's while it is here)
_digit_tables: dict[int, DigitTokens] = {}
DIGIT_TABLES = 4


def _digit_tokens(tokenizer: Any) -> DigitTokens:
    table = _digit_tables.pop(id(tokenizer), None) or DigitTokens(tokenizer)
    _digit_tables[id(tokenizer)] = table  # most recently used last
    while len(_digit_tables) > DIGIT_TABLES:
        del _digit_tables[next(iter(_digit_tables))]
    return table


def _scan_json(state: tuple[bool, bool, int], text: bytes) -> tuple[bool, bool, int]:
    """(in a string, after a backslash in it, digits in a row outside strings) after `text`."""
    in_string, escaped, run = state
    for b in text:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # closing quote
                in_string = False
        elif b == 0x22:
            in_string, run = True, 0
        elif 0x30 <= b <= 0x39:
            run += 1
        else:
            run = 0
    return in_string, escaped, run


class Matcher:
    """One generation's grammar state. `mask()` -> the tokens allowed next, as uint32 words;
    `consume(token)` after each token is appended. End-of-generation tokens are allowed exactly when
    the grammar is complete (`accepting`). digits: for JSON output, the vocabulary's digit tokens:
    runs of digits outside strings are then bounded by `JSON_DIGITS`."""

    def __init__(self, matcher: Any, n_vocab: int, eog_ids: Sequence[int], digits: DigitTokens | None = None,
                 tokenizer: Any = None) -> None:
        self._m = matcher
        # the token bytes `consume` reads (forced runs, JSON digit runs); None: `forces_nothing` asks every time
        self._tokenizer = tokenizer if tokenizer is not None else digits.tokenizer if digits is not None else None
        self._ff_left = b""  # bytes the grammar still forces, as far as known (see forces_nothing)
        self.n_vocab = n_vocab
        self._words = np.zeros((n_vocab + 31) // 32, np.uint32)
        self._words_ptr = self._words.ctypes.data  # (.ctypes makes an object per use: a microsecond or two)
        self._eog = np.asarray(sorted(int(t) for t in eog_ids if 0 <= int(t) < n_vocab), np.int64)
        self._digits = digits
        self._scan: tuple[bool, bool, int] = (False, False, 0)  # _scan_json's state of the output so far
        self._scans: list[tuple[bool, bool, int]] = []  # the state before each consumed token (rollback)
        self._raise_if_error()

    def copy(self) -> Matcher:
        """An independent matcher in this one's state (llguidance's deep copy: the compiled
        grammar and the lexer states built so far are shared, so a copy of a fresh matcher skips
        compiling the grammar again)."""
        other = Matcher(self._m.deep_copy(), self.n_vocab, self._eog, self._digits, self._tokenizer)
        other._scan, other._scans = self._scan, list(self._scans)
        return other

    def _raise_if_error(self) -> None:
        if self._m.is_error():
            raise ConstraintError(f"the constraint failed: {_clean(self._m.get_error())}")

    @property
    def accepting(self) -> bool:
        """The output so far is complete: it matches the whole grammar."""
        return self._m.is_accepting()

    @property
    def stopped(self) -> bool:
        """Nothing more may follow (the grammar is complete and cannot be extended)."""
        return self._m.is_stopped()

    def mask(self) -> np.ndarray:
        """The allowed next tokens, uint32 words [ceil(n_vocab / 32)] (a view reused by the next
        call: pass it to one step before asking again)."""
        self._m.unsafe_compute_mask_ptr(self._words_ptr, self._words.nbytes)  # GIL released inside
        self._raise_if_error()
        if self._eog.size and self._m.is_accepting():
            self._words[self._eog >> 5] |= (np.uint32(1) << (self._eog & 31).astype(np.uint32))
        if self._digits is not None and not self._scan[0]:
            # (a run the grammar made longer than the bound: no more digits as soon as it allows an end)
            over = self._digits.longer_than(max(0, JSON_DIGITS - self._scan[2]))
            if over is not None:
                kept = self._words & ~over
                if kept.any():  # else the grammar wants more digits: its word stands (see JSON_DIGITS)
                    self._words[:] = kept
        return self._words

    def forces_nothing(self) -> bool:
        """The grammar allows more than one next byte, so the next mask cannot allow one token only
        (llguidance's forced bytes, a few microseconds: no pass over the vocabulary). False does not
        mean a token is forced. `MaskAhead` is worth starting only where this holds. Inside a forced
        run no question is asked: the bytes left of the forced ones seen last are still forced."""
        if not self._ff_left:
            self._ff_left = self._m.compute_ff_bytes()
        return not self._ff_left

    def forced(self, mask: np.ndarray) -> int | None:
        """The one token `mask` allows, or None when it allows several."""
        nz = np.flatnonzero(mask)
        if nz.size != 1:
            return None
        word = int(mask[nz[0]])
        return int(nz[0]) * 32 + word.bit_length() - 1 if word & (word - 1) == 0 else None

    def consume(self, token: int) -> None:
        """Advance past `token` (which the last mask allowed)."""
        self._m.consume_token(int(token))
        self._raise_if_error()
        tok = self._tokenizer
        piece = tok.decode_bytes([int(token)]) if tok is not None and (self._ff_left or self._digits) else b""
        # a token made of forced bytes leaves the rest of them forced
        self._ff_left = self._ff_left[len(piece):] if piece and self._ff_left.startswith(piece) else b""
        if self._digits is not None:
            self._scans.append(self._scan)
            self._scan = _scan_json(self._scan, piece)

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed tokens (speculative decoding's rejected drafts)."""
        if n and not self._m.rollback(int(n)):
            raise ConstraintError(f"the constraint cannot roll back {n} tokens")
        if n:
            self._ff_left = b""
        self._raise_if_error()
        if self._digits is not None and n:
            self._scan = self._scans[-n]
            del self._scans[-n:]


_ahead_pool: ThreadPoolExecutor | None = None
_ahead_lock = threading.Lock()


class MaskAhead:
    """A matcher's next mask, computed on a worker thread while the caller's forward pass runs (the
    issue's "mask for step t+1 while step t's forward runs"; llguidance releases the GIL while it
    computes, the engine while it evaluates). The matcher belongs to the worker until `words()` or
    `settle()` returns. Started only where the mask cannot force a token (`Matcher.forces_nothing`):
    a forced token must be known before the step, to be evaluated with it in one batch."""

    def __init__(self, matcher: Matcher) -> None:
        global _ahead_pool
        with _ahead_lock:
            if _ahead_pool is None:  # one thread for every model: a mask takes tens of microseconds
                _ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeai-mask")
        self.matcher = matcher
        self._future: Future = _ahead_pool.submit(matcher.mask)

    def words(self) -> np.ndarray:
        """The mask (waits for it; a ConstraintError of the computation is raised here)."""
        return self._future.result()

    def settle(self) -> None:
        """Wait for the computation, whatever its outcome (the matcher is the caller's again)."""
        try:
            self._future.result()
        except Exception:  # noqa: BLE001 - raised to the caller of words(), when there is one
            pass
