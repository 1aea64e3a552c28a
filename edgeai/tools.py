"""Tool calling and thinking sections for `Model.chat`: what the template is given, the grammar
that keeps a call valid, and how the answer's text is split back into OpenAI's fields.

Tool calls use one wire format, the Hermes/Qwen one most templates with a `tools` block teach:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several calls one after another, separated by a newline). A template that renders `tools` itself
gets the OpenAI tool list as its `tools` variable; for a template that knows no tools (SmolLM2's),
the generic format: the tools and this format described in a system message (`GENERIC_TOOLS_PROMPT`),
earlier calls written back into the assistant turns as the same text, tool results as
`<tool_response>` blocks in a `tool` turn. The arguments are constrained by each tool's own
`parameters` schema (used as given); with tool_choice "auto" an answer is either plain text or,
from its first character, tool calls.

Harmony templates (gpt-oss) have their own format, which their template renders and `HarmonySplit`
reads back: messages on channels, "analysis" the thinking, "final" the answer, and a call a
"commentary" message addressed `to=functions.NAME` whose body is the JSON arguments.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeai.constraints import JSON_OPTIONS, Constraint, ConstraintError, lark_constraint
from edgeai.errors import OptionError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# harmony (gpt-oss): a message is `<|start|>ROLE<|channel|>NAME[ to=RECIPIENT][ <|constrain|>TYPE]<|message|>BODY<|end|>`
H_START, H_CHANNEL, H_MESSAGE, H_END, H_CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>"
REASONING_EFFORTS = ("low", "medium", "high")  # harmony's `reasoning_effort` (ollama's think levels for gpt-oss)
TOOL_CHOICES = ("auto", "none", "required")

GENERIC_TOOLS_PROMPT = (
    "You can call these tools (JSON Schema of each one's arguments):\n{tools}\n\n"
    "To call a tool, answer with nothing but\n" + CALL_OPEN
    + '\n{{"name": <tool name>, "arguments": <arguments object>}}\n' + CALL_CLOSE
    + "\n(one block per call). A tool's result comes back in a <tool_response> block."
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


def check_tools(tools: Any) -> list[Tool]:
    """OpenAI-style tools ([{"type": "function", "function": {"name", "description", "parameters"}}])
    checked; an OptionError names the first bad one."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise OptionError("tools must be a non-empty list of {'type': 'function', 'function': {...}} dicts")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        if isinstance(t, Tool):  # checked already
            out.append(t)
            continue
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise OptionError(f"tool {i} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                              f"got {t!r:.80}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise OptionError(f"tool {i}'s name must be 1-64 letters, digits, '_', '.' or '-', got {name!r:.80}")
        if any(o.name == name for o in out):
            raise OptionError(f"two tools are named {name!r}; tool names must be unique")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise OptionError(f"the parameters of tool {name!r} must be a JSON Schema (a dict), got {params!r:.80}")
        out.append(Tool(name, str(fn.get("description", "")), dict(params)))
    return out


def check_tool_choice(tool_choice: Any, tools: list[Tool]) -> tuple[str, list[Tool]]:
    """(mode, the tools that may be called): mode "auto", "none" or "required"; OpenAI's
    {"type": "function", "function": {"name": ...}} is "required" with that one tool."""
    if tool_choice is None:
        return "auto", tools
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise OptionError(f"tool_choice {tool_choice!r} is not one of {', '.join(TOOL_CHOICES)} or "
                              "{'type': 'function', 'function': {'name': ...}}")
        return tool_choice, tools
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    chosen = [t for t in tools if t.name == name]
    if not chosen:
        raise OptionError(f"tool_choice names tool {name!r:.60}, which is not among tools "
                          f"({', '.join(t.name for t in tools)})")
    return "required", chosen


def openai_tools(tools: list[Tool]) -> list[dict]:
    """The list a template's `tools` variable expects (the OpenAI shape)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools]


def is_harmony(source: str | None) -> bool:
    """Whether a chat template writes OpenAI's harmony format (gpt-oss): channels and messages."""
    return bool(source) and H_CHANNEL in source and H_MESSAGE in source


def harmony_call_header(name: str) -> str:
    """The header that opens a call of tool `name`, as gpt-oss writes it (after `<|start|>assistant`)."""
    return f"{H_CHANNEL}commentary to=functions.{name} {H_CONSTRAIN}json{H_MESSAGE}"


def template_knows_tools(source: str | None) -> bool:
    """Whether a chat template renders the `tools` variable itself."""
    return bool(source) and re.search(r"\btools\b", source) is not None


def call_text(name: str, arguments: Any) -> str:
    """One call in the wire format (`arguments`: the arguments object)."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def _calls_of(message: Mapping) -> list[tuple[str, Any]]:
    """(name, arguments object) of each call an assistant message carries (OpenAI's JSON-string
    arguments parsed once here)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence):
        raise OptionError(f"tool_calls must be a list, got {calls!r:.60}")
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise OptionError(f"a tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}, got {c!r:.80}")
        out.append((fn["name"], _as_object(fn["name"], fn.get("arguments", {}))))
    return out


def messages_for_template(messages: list[dict], tools: list[Tool] | None, native: bool) -> list[dict]:
    """The conversation as the template should see it. native (the template knows tools): tool
    calls with their arguments as objects (templates write them with `tojson`). Otherwise the generic
    format: the tool list in the system message, calls and results as text."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        calls = _calls_of(m) if m["role"] == "assistant" else []
        if native:
            if calls:
                m["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
            if m.get("reasoning_content") and "thinking" not in m:
                m["thinking"] = m["reasoning_content"]  # the field harmony templates read a turn's thinking from
        else:
            m.pop("tool_calls", None)
            if calls:
                m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + [call_text(n, a) for n, a in calls])
            if m["role"] == "tool":
                m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools and not native:
        listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                       ensure_ascii=False) for t in tools)
        prompt = GENERIC_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _as_object(name: str, arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise OptionError(f"the arguments of an earlier call to {name!r} are not JSON: {exc}") from None
    return arguments


def _lark_literal(text: str, special: int | None) -> str:
    return f"<[{special}]>" if special is not None else json.dumps(text)


def tool_call_constraint(tools: list[Tool], mode: str, *, parallel: bool = False, open_id: int | None = None,
                         close_id: int | None = None) -> Constraint:
    """The grammar of an answer that calls `tools` (mode "required": calls and nothing else; "auto":
    plain text that does not start with a call, or calls). parallel: several calls in one answer
    (OpenAI's parallel_tool_calls), else exactly one (llama-server's default: a small model
    otherwise repeats its call until max_tokens). open_id/close_id: the
    markers' token ids where the vocabulary has them as special tokens (written `<[id]>`)."""
    call_schema = {
        "anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                   "required": ["name", "arguments"], "additionalProperties": False} for t in tools],
        "x-guidance": JSON_OPTIONS,
    }
    call = (f'{_lark_literal(CALL_OPEN, open_id)} "\\n" %json {json.dumps(call_schema)} '
            f'"\\n" {_lark_literal(CALL_CLOSE, close_id)}')
    lines = ['calls: call ("\\n" call)*' if parallel else "calls: call", f"call: {call}"]
    if mode == "required":
        lines.insert(0, "start: calls")
    else:
        # text whose first non-space characters are not a call's opening
        lines.insert(0, "start: calls | TEXT")
        lines.append(f"TEXT: /(?s:.+)/ & ~/[ \\t\\n]*{re.escape(CALL_OPEN)}(?s:.*)/")
    try:
        return lark_constraint("\n".join(lines), kind="lark")
    except ConstraintError as exc:
        raise ConstraintError(f"the tools' parameters cannot be used as a constraint: {exc}") from None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside tool calls, the calls as OpenAI `tool_calls` entries) of an answer. A block
    whose JSON does not parse stays in the text."""
    calls, rest, pos = [], [], 0
    for m in re.finditer(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), text, re.S):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        rest.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": "call_" + secrets.token_hex(8), "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}),
                                                                              ensure_ascii=False)}})
    rest.append(text[pos:])
    return "".join(rest).strip() if calls else text, calls


class ThinkSplit:
    """Streams an answer's text into (thinking, answer) parts: the thinking section is what lies
    between `<think>` and `</think>` at the start of the answer (or from the start when the prompt
    already opened it). `done` turns True once the answer part has begun."""

    def __init__(self, opened: bool) -> None:
        self.state = "inside" if opened else "start"
        self.buf = ""

    @property
    def done(self) -> bool:
        return self.state == "after"

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking text, answer text) that `text` adds; some may be held back until it is clear."""
        self.buf += text
        think, answer = "", ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buf = "inside", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return "", ""  # undecided: whitespace or a prefix of <think>
            else:
                self.state = "after"
        if self.state == "inside":
            i = self.buf.find(THINK_CLOSE)
            if i < 0:
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                think, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return think, ""
            think, self.buf = self.buf[:i], self.buf[i + len(THINK_CLOSE):].lstrip()
            self.state = "after"
        if self.state == "after":
            answer, self.buf = self.buf, ""
        return think, answer

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end: an unfinished thinking section stays thinking."""
        buf, self.buf = self.buf, ""
        return (buf, "") if self.state == "inside" else ("", buf)


class HarmonySplit:
    """Streams a harmony answer (gpt-oss; the prompt ends with `<|start|>assistant`) into (thinking,
    answer) parts, as ThinkSplit does for `<think>` sections. The answer is a run of messages, each a
    header `<|channel|>NAME[ to=RECIPIENT][ <|constrain|>TYPE]<|message|>` and a body ended by `<|end|>`
    (then `<|start|>assistant` and the next header) or by the end of generation (`<|return|>` and
    `<|call|>` are end-of-generation tokens, never text). Bodies on "analysis" are thinking; on
    "final", the answer; a message to `functions.NAME` is a call whose body is its JSON arguments
    (`calls`, not text) when NAME is one of `tools`; other commentary (a preamble to calls, a message
    to a tool not offered) is answer text. Headers are not text; output with no header at all (a model
    that does not write harmony) is the answer, given at the end.

    done: a final message or a call has begun (a constraint applies to its body). matcher_for(name):
    the `Matcher` for a call's arguments (None: unconstrained), taken when its body begins and kept
    as `matcher`. call: the prompt already opened a call of this tool (a named tool_choice)."""

    def __init__(self, matcher_for=None, call: str | None = None, tools=()) -> None:
        self.buf = ""
        self.in_body = False
        self.opened = False  # a message has begun
        self.kind = ""  # of the open body: "think", "answer" or "call"
        self.done = False
        self.calls: list[list[str]] = []  # [name, arguments text]
        self.matcher = None
        self._matcher_for = matcher_for
        self.tools = frozenset(tools) | ({call} if call is not None else set())
        self.carries_calls = bool(self.tools)  # tool calls come from here, not from the answer's text
        if call is not None:
            self._open(harmony_call_header(call))

    def _open(self, header: str) -> None:
        channel = re.search(re.escape(H_CHANNEL) + r"\s*([\w-]+)", header)
        to = re.search(r"\bto=functions\.([^\s<]+)", header)
        self.in_body = self.opened = True
        if to is not None and to.group(1) in self.tools:
            name = to.group(1)
            self.kind, self.done = "call", True
            self.calls.append([name, ""])
            if self._matcher_for is not None:
                self.matcher = self._matcher_for(name)
        elif channel is not None and channel.group(1) == "analysis":
            self.kind = "think"
        else:
            self.kind = "answer"
            self.done = self.done or (channel is not None and channel.group(1) == "final")

    def _body(self, text: str, think: list[str], answer: list[str]) -> None:
        if self.kind == "think":
            think.append(text)
        elif self.kind == "call":
            self.calls[-1][1] += text
        else:
            answer.append(text)

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking text, answer text) that `text` adds; a possible marker's start is held back."""
        self.buf += text
        think: list[str] = []
        answer: list[str] = []
        while True:
            if not self.in_body:
                i = self.buf.find(H_MESSAGE)
                if i < 0:
                    break  # the header goes on (headers are a few tokens)
                self._open(self.buf[:i])
                self.buf = self.buf[i + len(H_MESSAGE):]
            else:
                i = self.buf.find(H_END)
                if i < 0:
                    keep = _partial_suffix(self.buf, H_END)
                    self._body(self.buf[:len(self.buf) - keep], think, answer)
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                self._body(self.buf[:i], think, answer)
                self.buf, self.in_body = self.buf[i + len(H_END):], False
        return "".join(think), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end (an unfinished header is dropped: it is not text)."""
        think: list[str] = []
        answer: list[str] = []
        if self.in_body:
            self._body(self.buf, think, answer)
        elif not self.opened and H_CHANNEL not in self.buf:  # (a first header cut short is not text either)
            answer.append(self.buf)
        self.buf = ""
        return "".join(think), "".join(answer)

    def tool_calls(self) -> list[dict]:
        """The calls made, as OpenAI `tool_calls` entries (a call whose arguments are not a JSON
        object is left out)."""
        out = []
        for name, arguments in self.calls:
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError:
                continue
            if isinstance(args, dict):
                out.append({"id": "call_" + secrets.token_hex(8), "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
