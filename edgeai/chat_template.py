"""Chat templates (jinja2) run sandboxed and bounded.

A model's chat template is code that came with the file. jinja2's `ImmutableSandboxedEnvironment`
keeps it away from Python's internals and from changing the messages, but not from the machine's
memory and time: `{{ 'x' * 300000000 }}` or two nested loops of 100,000 ran to 8.7 GB. Here every
value a template builds, everything it outputs, its loops and its wall time are bounded, and each
bound is checked before the operation that would cross it (a single C-level string operation
cannot be stopped once started):

- strings, lists and the rendered text: at most `MAX_CHARS` characters (items);
- numbers handed to a function or filter (widths, counts): at most `MAX_NUMBER`;
- loop iterations in one rendering: at most `MAX_ITERATIONS`; wall time: `MAX_SECONDS`.

Legitimate templates stay far below them (a conversation filling a million-token context renders
to about 4 M characters). A template crossing one, touching an unsafe attribute, or calling its own
`raise_exception(...)` raises `ChatTemplateError` naming the model; transformers and llama.cpp
also stop on `raise_exception`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeai.errors import ChatTemplateError

MAX_CHARS = 8 * 2**20  # characters of any string or of the output, items of any list
MAX_NUMBER = 100_000  # jinja2's own bound on range(); widths, counts and indents stay far below it
MAX_ITERATIONS = 1_000_000  # loop iterations per rendering, all loops together
MAX_SECONDS = 5.0  # wall time per rendering
MAX_INT_BITS = 2**16  # integers a template computes (x ** y, x * y)

_LOOP_FILTER = "edgeai_bounded_loop"  # wraps every {% for %} iterable (see `compile_template`)
_SIZED = (str, list, tuple, dict, set, frozenset)
# widths and precisions in %-formats and str.format specs: "%9999d", "{:>9999}"
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


class _Limit(Exception):
    """A bound was crossed; the message says which (turned into ChatTemplateError by `render`)."""


class _Raised(Exception):
    """The template called raise_exception(message)."""


class _BoundedCodeGenerator(CodeGenerator):
    """Routes every piece of output and every `~` concatenation through the environment's counters."""

    def _output_const_repr(self, group):
        return f"environment.emitted({super()._output_const_repr(group)})"

    def _output_child_pre(self, node, frame, finalize):
        self.write("environment.emitted(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node, frame, finalize):
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    def visit_Concat(self, node, frame):
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


def _weight(value: Any) -> int:
    """Characters (items) a value holds, one level deep: what an operation on it can multiply."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, _SIZED):
        items = value.values() if isinstance(value, dict) else value
        return len(value) + sum(len(v) for v in items if isinstance(v, _SIZED))
    return len(value) if isinstance(value, range) else 0


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """`tojson` as transformers gives it to chat templates: json.dumps, plain text. (jinja2's own
    escapes <, >, & and ' for HTML and returns Markup, which escapes the template text it is added to:
    gpt-oss's `"<|channel|>..." + message.content|tojson` came out as `&lt;|channel|&gt;...`.)"""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with bounds on sizes, numbers, loops and time (module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self._render = threading.local()
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = self._loop
        self.globals.pop("lipsum", None)  # n paragraphs of filler text: an amplifier no chat template needs

        def raise_exception(message: Any = "") -> None:
            raise _Raised(str(message))

        self.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))

    # -- per-rendering counters ------------------------------------------------------------------
    def start(self) -> None:
        r = self._render
        r.deadline, r.chars, r.iterations = time.monotonic() + MAX_SECONDS, 0, 0

    def tick(self) -> None:
        """Called on every loop iteration, call, filter and operator: the wall-time bound."""
        deadline = getattr(self._render, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise _Limit(f"ran longer than {MAX_SECONDS:g} s")

    def emitted(self, text: Any) -> Any:
        """Count output (to the result, a macro or a {% set %} block) against MAX_CHARS."""
        r = self._render
        if isinstance(text, str):
            r.chars = getattr(r, "chars", 0) + len(text)
        if getattr(r, "chars", 0) > MAX_CHARS:
            raise _Limit(f"writes more than {MAX_CHARS:,} characters")
        return text

    def sized(self, value: Any) -> Any:
        """`value` if it holds at most MAX_CHARS characters (items)."""
        self.tick()
        if isinstance(value, _SIZED) and len(value) > MAX_CHARS:
            raise _Limit(f"builds a value of {len(value):,} characters (items), more than {MAX_CHARS:,}")
        return value

    def _loop(self, iterable: Any):
        r = self._render
        for item in iterable:
            r.iterations = getattr(r, "iterations", 0) + 1
            if r.iterations > MAX_ITERATIONS:
                raise _Limit(f"runs more than {MAX_ITERATIONS:,} loop iterations")
            self.tick()
            yield item

    # -- checks before an operation --------------------------------------------------------------
    def _check_arguments(self, what: str, args: tuple, kwargs: dict) -> None:
        values = [*args, *kwargs.values()]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_NUMBER:
                raise _Limit(f"passes {v:,} to {what}, more than the {MAX_NUMBER:,} a width or count may be")
        # an operation multiplies at most its two largest arguments' sizes (join: items x separator,
        # replace: length x replacement, indent: lines x prefix); refuse before it runs
        sizes = sorted((_weight(v) for v in values), reverse=True)[:2]
        if sizes and sizes[0] > MAX_CHARS:
            raise _Limit(f"calls {what} on a value holding {sizes[0]:,} characters (items), more than {MAX_CHARS:,}")
        if len(sizes) == 2 and sizes[1] > 1 and sizes[0] * sizes[1] > MAX_CHARS:
            raise _Limit(f"calls {what} on values of {sizes[0]:,} and {sizes[1]:,} characters (items), whose "
                         f"result could exceed {MAX_CHARS:,}")

    @staticmethod
    def _check_format(fmt: str, specs: re.Pattern) -> None:
        for m in specs.finditer(fmt):
            for number in re.findall(r"\d+", m.group(0)):
                if int(number) > MAX_NUMBER:
                    raise _Limit(f"formats with a width or precision of {int(number):,}, more than {MAX_NUMBER:,}")

    def _bounded(self, name: str, f):
        @functools.wraps(f)  # keeps jinja2's pass_context / pass_environment marks
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            if name == "join" and len(args) > 1 and not isinstance(args[1], _SIZED):
                args = (args[0], list(self._loop(args[1])), *args[2:])  # its size, before joining
            self._check_arguments(f"the filter {name!r}", args, kwargs)
            if name == "format" and args and isinstance(args[0], str):
                self._check_format(args[0], _PERCENT_SPEC)
            if name == "sum" and len(args) > 1 and not isinstance(kwargs.get("start", args[3] if len(args) > 3 else 0),
                                                                  (int, float)):
                # adding sequences copies the sum so far at every step: the work grows with the square
                if _weight(args[1]) * len(args[1]) > MAX_CHARS:
                    raise _Limit(f"sums {len(args[1]):,} sequences, copying more than {MAX_CHARS:,} items")
            if name == "tojson" and isinstance(kwargs.get("indent", args[2] if len(args) > 2 else None), int):
                indent = kwargs.get("indent", args[2] if len(args) > 2 else 0)
                if indent * _weight(args[0]) > MAX_CHARS:  # every item gets the indent
                    raise _Limit(f"indents {_weight(args[0]):,} items by {indent:,} in tojson")
            return self.sized(f(*args, **kwargs))

        return bounded

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's signature
        """A call from the template (functions, macros, methods), bounded like a filter."""
        __self.tick()
        name = getattr(__obj, "__name__", type(__obj).__name__)
        bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        call_args = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars", "caller")}
        if isinstance(bound_to, str) and name == "join" and args and not isinstance(args[0], _SIZED):
            args = (list(__self._loop(args[0])), *args[1:])  # its size, before joining
        __self._check_arguments(f"{name}()", (bound_to, *args), call_args)
        if isinstance(bound_to, str) and name in ("format", "format_map"):
            __self._check_format(bound_to, _FORMAT_SPEC)
        if isinstance(bound_to, str) and name == "expandtabs":
            tabsize = (args or (kwargs.get("tabsize", 8),))[0]
            if isinstance(tabsize, int) and bound_to.count("\t") * tabsize > MAX_CHARS:
                raise _Limit(f"expands {bound_to.count(chr(9)):,} tabs to {tabsize:,} columns")
        return __self.sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        """`*`, `+`, `%` and `**`, refused before they build something past the bounds."""
        self.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Limit(f"multiplies integers past {MAX_INT_BITS:,} bits")
            seq, n = (left, right) if isinstance(left, _SIZED) else (right, left)
            if isinstance(seq, _SIZED) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                raise _Limit(f"repeats a value of {len(seq):,} characters (items) {n:,} times, "
                             f"more than {MAX_CHARS:,} in all")
        elif operator == "+":
            if isinstance(left, _SIZED) and isinstance(right, _SIZED) and len(left) + len(right) > MAX_CHARS:
                raise _Limit(f"joins values of {len(left):,} and {len(right):,} characters (items), more than "
                             f"{MAX_CHARS:,}")
        elif operator == "**":
            if ints and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
                raise _Limit(f"raises {left} to the power {right:,}, an integer past {MAX_INT_BITS:,} bits")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, _PERCENT_SPEC)
            args = right if isinstance(right, tuple) else (right,)
            self._check_arguments("the % operator", (left, *args), {})
        return self.sized(super().call_binop(context, operator, left, right))

    def unsafe_undefined(self, obj: Any, attribute: str):
        """Refuse at once: the sandbox's default is an undefined value that prints as nothing."""
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def compile_template(env: BoundedEnvironment, source: str):
    """`source` compiled in `env`, every {% for %} iterable wrapped in the loop counter."""
    tree = env.parse(source)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
    tree.set_environment(env)
    return env.from_string(tree)


def render(template, variables: dict, model_name: str) -> str:
    """Render a template compiled by `compile_template`. Bounds crossed, unsafe attributes and the
    template's own raise_exception(...) raise ChatTemplateError naming `model_name`'s template;
    other failures propagate as they are."""
    env: BoundedEnvironment = template.environment
    env.start()
    try:
        return template.render(**variables)
    except _Raised as exc:
        raise ChatTemplateError(f"the chat template of {model_name} refused this conversation: {exc}") from None
    except _Limit as exc:
        raise ChatTemplateError(
            f"the chat template of {model_name} {exc} (edgeai's bound for chat templates); it is broken or "
            "hostile: fix the template in the model's tokenizer settings, or prompt with generate() instead"
        ) from None
    except SecurityError as exc:
        raise ChatTemplateError(f"the chat template of {model_name} was stopped by the sandbox: {exc}; "
                                "a chat template may not reach Python's internals or change its input") from None
    except (RecursionError, MemoryError) as exc:
        raise ChatTemplateError(f"the chat template of {model_name} failed: {type(exc).__name__} "
                                "(runaway recursion or size); fix the template") from None
    finally:
        env._render.deadline = None
