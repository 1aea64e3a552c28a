"""`edgeai chat`: a terminal conversation with a model, a thin loop over `Model.chat(stream=True)`.

Input: readline line editing and history (saved between sessions); a line ending in a backslash
continues on the next line, and a line of three double quotes opens a block closed by another.
Ctrl-C stops the answer being written (the partial answer stays in the conversation) or clears the
line being typed; Ctrl-D leaves. A conversation that outgrows the context loses its oldest turns,
with a notice. Errors never lose the conversation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeai.budget import format_bytes
from edgeai.errors import EdgeAIError, OptionError
from edgeai.model import DEFAULT_MAX_TOKENS, SAMPLING_OPTIONS, Model, Timings, check_messages

PROMPT = "you> "
CONTINUE = "...> "
SAVE_FORMAT = "edgeai-chat/1"
ALIASES = {"temp": "temperature", "n": "max_tokens", "penalty": "repeat_penalty"}
OPTIONS = SAMPLING_OPTIONS + ("max_tokens",)

HELP = """\
/help              this text
/reset             forget the conversation (the system prompt stays)
/system [TEXT]     show or set the system prompt (/system - removes it)
/set [NAME VALUE]  show or set an option: temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens
/stats             speed of the last answer, memory, context use
/format [json|schema FILE|grammar FILE|regex RE|off]  constrain the answers (show it without an argument)
/think [on|off|low|medium|high|default]  thinking models: turn thinking on or off (gpt-oss: its effort)
/save FILE         write the conversation as JSON
/load FILE         read a conversation written by /save
/exit              leave (or Ctrl-D)
A line ending in \\ continues on the next line; \"\"\" starts and ends a multi-line block.
Ctrl-C stops an answer (what was written stays) or clears the line."""


def history_file() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "edgeai" / "chat_history"


def _parse_value(name: str, text: str) -> Any:
    if name == "seed" and text.lower() in ("none", "random", "-"):
        return None
    try:
        return int(text) if name in ("top_k", "repeat_last_n", "seed", "max_tokens") else float(text)
    except ValueError:
        raise OptionError(f"/set {name}: {text!r} is not a number") from None


def load_conversation(path: Path) -> tuple[str | None, list[dict[str, str]], dict[str, Any]]:
    """(system prompt, messages, options) from a file written by /save; OptionError says what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"{path} is not a saved conversation (JSON expected): {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise OptionError(f"{path} is not a conversation saved by /save (no \"format\": \"{SAVE_FORMAT}\")")
    messages = check_messages(data.get("messages"))
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise OptionError(f"{path}: \"system\" must be a string or null")
    options = data.get("options") or {}
    if not isinstance(options, dict) or set(options) - set(OPTIONS):
        raise OptionError(f"{path}: \"options\" may hold only {', '.join(OPTIONS)}")
    if any(m["role"] == "system" for m in messages):
        raise OptionError(f"{path}: system prompts go in \"system\", not in \"messages\"")
    return system, messages, options


@dataclass
class ChatSession:
    """A conversation: system prompt, turns, generation options, and the last answer's timings."""

    model: Model
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=lambda: {"max_tokens": DEFAULT_MAX_TOKENS})
    last: Timings | None = None
    constraint: dict[str, Any] = field(default_factory=dict)  # Model.chat's structured-output keywords (/format)
    format_label: str = "off"
    think: bool | str | None = None  # Model.chat's think= (/think); None: the template's default

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages


class Repl:
    """The read-eval-print loop over a `ChatSession`."""

    def __init__(self, model: Model, *, system: str | None = None, console: Console | None = None) -> None:
        self.session = ChatSession(model, system)
        self.console = console or Console(highlight=False)

    # -- input -----------------------------------------------------------------------------------
    def _setup_history(self) -> None:
        try:
            import readline
        except ImportError:  # Windows without pyreadline: no history, input() still works
            return
        path = history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                readline.read_history_file(path)
        except OSError:
            return
        readline.set_history_length(1000)
        import atexit

        atexit.register(lambda: _write_history(readline, path))

    def read(self) -> str:
        """One user input, possibly over several lines. Raises EOFError (Ctrl-D), KeyboardInterrupt."""
        line = input(PROMPT)
        if line.strip() == '"""':
            lines = []
            while (nxt := input(CONTINUE)).strip() != '"""':
                lines.append(nxt)
            return "\n".join(lines)
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(CONTINUE))
        return "\n".join(lines)

    # -- loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        model = self.session.model
        self._setup_history()
        self.console.print(f"[bold]{escape(model.path.name)}[/] on {model.backend.name}, context {model.n_ctx} tokens"
                           + (f", budget {format_bytes(model.memory_budget)}" if model.memory_budget else "")
                           + ". /help for commands, Ctrl-D to leave.")
        if model.plain_chat:
            self.console.print("[yellow]no usable chat template: using a plain 'role: text' one[/]")
        while True:
            try:
                text = self.read()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /exit leaves)[/]")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return
                continue
            self.turn(text)

    def turn(self, text: str) -> None:
        s = self.session
        s.messages.append({"role": "user", "content": text})
        max_tokens = int(s.options.get("max_tokens", DEFAULT_MAX_TOKENS))
        try:
            # a sliding or compacting cache (context_overflow=) keeps the whole conversation going itself
            if s.model.context.slides:
                kept, dropped = check_messages(s.conversation()), 0
            else:
                kept, dropped = s.model.fit_messages(s.conversation(), reserve=min(max_tokens, s.model.n_ctx // 2))
        except EdgeAIError as exc:  # the context is full, or the chat template refused the conversation
            s.messages.pop()
            self._error(exc)
            return
        if dropped:
            del s.messages[:dropped]  # system messages are never dropped, and they are not in s.messages
            notice = f"context full ({s.model.n_ctx} tokens): dropped the {dropped} oldest message{'s' if dropped > 1 else ''}"
            self.console.print(f"[yellow]{notice}[/]", soft_wrap=True)
        sampling = {k: v for k, v in s.options.items() if k != "max_tokens"}
        pieces: list[str] = []
        chunks = None
        try:
            chunks = s.model.chat(kept, stream=True, max_tokens=max_tokens, think=s.think, **sampling, **s.constraint)
            thinking = False
            for chunk in chunks:
                if chunk.reasoning:  # a thinking model's thinking: shown dim, apart, not kept in the conversation
                    thinking = True
                    self.console.print(chunk.reasoning, style="dim italic", end="", soft_wrap=True, markup=False, highlight=False)
                if chunk.text and thinking:
                    thinking = False
                    self.console.print()
                pieces.append(chunk.text)
                # soft_wrap: pieces are printed as they come, never re-wrapped mid-word
                self.console.print(chunk.text, style="cyan", end="", soft_wrap=True, markup=False, highlight=False)
                s.last = chunk.timings
                if chunk.finish_reason is not None and chunk.finish_reason.value != "stop":
                    self.console.print(f"\n[dim]\\[{chunk.finish_reason.value}][/]", end="")
                if chunk.incomplete:
                    self.console.print("\n[yellow]\\[incomplete: the answer does not match the /format yet][/]", end="")
            self.console.print()
        except KeyboardInterrupt:
            if chunks is not None:
                chunks.close()
            self.console.print("\n[yellow]\\[stopped][/]")
        except EdgeAIError as exc:
            self.console.print()
            self._error(exc)
        # kept even when empty or cut short: turns stay user/assistant pairs
        s.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _error(self, exc: BaseException) -> None:
        self.console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)

    # -- commands --------------------------------------------------------------------------------
    def command(self, text: str) -> str | None:
        name, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        s = self.session
        try:
            if name in ("exit", "quit"):
                return "exit"
            if name == "help":
                self.console.print(escape(HELP))
            elif name == "reset":
                s.messages.clear()
                s.model.reset()
                self.console.print("[dim]conversation cleared[/]")
            elif name == "system":
                if arg:
                    s.system = None if arg == "-" else arg
                self.console.print(f"[dim]system prompt: {escape(s.system or '(none)')}[/]")
            elif name == "set":
                self._set(arg)
            elif name == "stats":
                self._stats()
            elif name == "format":
                self._format(arg)
            elif name == "think":
                self._think(arg)
            elif name == "save":
                self._save(arg)
            elif name == "load":
                if not arg:
                    raise OptionError("/load needs a file name")
                s.system, s.messages, options = load_conversation(Path(arg).expanduser())
                s.options = {"max_tokens": DEFAULT_MAX_TOKENS, **options}
                self.console.print(f"[dim]loaded {len(s.messages)} messages from {escape(arg)}[/]")
            else:
                raise OptionError(f"unknown command /{name}; /help lists them")
        except EdgeAIError as exc:
            self._error(exc)
        return None

    def _set(self, arg: str) -> None:
        s = self.session
        if not arg:
            shown = {**{k: v for k, v in vars(s.model.sampling()).items()}, **s.options}
            self.console.print("  ".join(f"{k}={v}" for k, v in shown.items()))
            return
        name, _, value = arg.partition(" ")
        name = ALIASES.get(name, name)
        if name not in OPTIONS or not value.strip():
            raise OptionError(f"/set NAME VALUE with NAME one of temp, {', '.join(OPTIONS)}")
        new = {**s.options, name: _parse_value(name, value.strip())}
        s.model.sampling(**{k: v for k, v in new.items() if k != "max_tokens"})  # validates
        if new.get("max_tokens", 1) < 1:
            raise OptionError("max_tokens must be >= 1")
        s.options = new
        self.console.print(f"[dim]{name} = {new[name]}[/]")

    def _format(self, arg: str) -> None:
        """/format: json (any JSON object), schema FILE (a JSON Schema), grammar FILE (GBNF), regex RE,
        off. Checked here, so a bad schema is refused before the next turn."""
        from edgeai.constraints import constraint_from, read_constraint_file

        s = self.session
        kind, _, rest = arg.partition(" ")
        rest = rest.strip()
        if not kind:
            self.console.print(f"[dim]format: {escape(s.format_label)}[/]")
            return
        if kind == "off":
            new: dict[str, Any] = {}
        elif kind == "json":
            new = {"response_format": {"type": "json_object"}}
        elif kind in ("schema", "grammar") and rest:
            key = "json_schema" if kind == "schema" else "grammar"
            new = {key: read_constraint_file(Path(rest).expanduser(), key)}
        elif kind == "regex" and rest:
            new = {"regex": rest}
        else:
            raise OptionError("/format json | schema FILE | grammar FILE | regex RE | off")
        constraint_from(**new)  # validates
        s.constraint, s.format_label = new, arg
        self.console.print(f"[dim]format: {escape(arg)}[/]")

    def set_think(self, arg: str) -> None:
        """think= of the next turns from on, off, a level (gpt-oss's reasoning effort) or default (the
        template's); checked against the model's template here, so a wrong value is refused at once."""
        from edgeai.tools import REASONING_EFFORTS

        values = {"on": True, "off": False, "default": None, **{e: e for e in REASONING_EFFORTS}}
        if arg not in values:
            raise OptionError(f"think: {' | '.join(values)}, not {arg!r:.20}")
        if not self.session.model.thinks and values[arg] is not None:
            raise OptionError("this model's chat template has no thinking section")
        self.session.think = values[arg]

    def _think(self, arg: str) -> None:
        """/think [on|off|low|medium|high|default] (see set_think); shows the setting."""
        if arg:
            self.set_think(arg)
        shown = {True: "on", False: "off", None: "default"}.get(self.session.think, self.session.think)
        self.console.print(f"[dim]think: {shown}[/]")

    def _stats(self) -> None:
        import psutil

        s = self.session
        st = s.model.stats()
        table = Table(show_header=False, box=None)
        if s.last:
            t = s.last
            table.add_row("last answer", f"{t.generated_tokens} tokens, prompt {t.prompt_tokens} evaluated + "
                                         f"{t.cached_tokens} reused")
            table.add_row("speed", f"prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.1f} tok/s, "
                                   f"first token after {t.prompt_seconds * 1000:.0f} ms")
        rss = psutil.Process().memory_info().rss
        budget = s.model.memory_budget
        table.add_row("memory", f"{format_bytes(rss)} resident" + (f" of a {format_bytes(budget)} budget "
                                                                      f"({100 * rss / budget:.0f}%)" if budget else ""))
        table.add_row("weights", format_bytes(st.weights_bytes))
        table.add_row("context", f"{st.n_past} of {st.n_ctx} positions in the KV cache"
                      + (f" ({format_bytes(st.extra['kv_bytes'])}" + (f" {st.extra['kv_type']}" if "kv_type" in st.extra else "")
                         + " allocated)" if "kv_bytes" in st.extra else ""))
        ctx = st.extra.get("context")
        if ctx:
            table.add_row("overflow", f"{ctx['policy']}" + (f": {ctx['evicted']} positions evicted after the first "
                                                            f"{ctx['sink']} ({ctx['evicted_total']} in all, "
                                                            f"{ctx['evictions']} slides)" if ctx["evicted_total"] else "")
                          + (f": {ctx['folded']} tokens held in {ctx['compacted']} positions ({ctx['compacted_total']} "
                             f"dropped in all, {ctx['compactions']} compactions)" if ctx["compactions"] else ""))
        if "expert_cache_hit_rate" in st.extra:
            table.add_row("expert cache", f"{100 * st.extra['expert_cache_hit_rate']:.1f}% hits"
                          + (f", {st.extra['expert_cache']}" if "expert_cache" in st.extra else ""))
        if "speculative" in st.extra:
            sp = st.extra["speculative"]
            table.add_row("speculative", f"{sp['drafter']}: {100 * sp['acceptance_rate']:.0f}% of drafted tokens accepted, "
                                         f"{sp['mean_accepted_length']:.2f} per verification ({sp['verifications']} "
                                         f"verifications, {sp['plain_steps']} plain steps)")
        table.add_row("backend", f"{st.backend}, {st.threads} thread{'s' if st.threads > 1 else ''}")
        self.console.print(table)

    def _save(self, arg: str) -> None:
        from edgeai.paths import atomic_output

        if not arg:
            raise OptionError("/save needs a file name")
        path = Path(arg).expanduser()
        s = self.session
        data = {"format": SAVE_FORMAT, "model": s.model.path.name, "system": s.system, "messages": s.messages,
                "options": s.options}
        with atomic_output(path, force=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.console.print(f"[dim]saved {len(s.messages)} messages to {escape(str(path))}[/]")


def _write_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def chat(model: Model, *, system: str | None = None, options: dict[str, Any] | None = None,
         think: str | None = None) -> None:
    """Run the REPL on `model` until the user leaves. think: as /think (on, off, low, medium, high,
    default); a value the model cannot take is an OptionError before the REPL starts."""
    repl = Repl(model, system=system)
    if options:
        repl.session.options.update(options)
    if think is not None:
        repl.set_think(think)
    repl.run()
