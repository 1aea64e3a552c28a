"""`edgeai chat` driven in a pseudo-terminal as a person uses it, and `edgeai run` / `edgeai bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

import edgeai
from edgeai.cli import app

EDGEAI = str(Path(sys.executable).parent / "edgeai")
runner = CliRunner()


@pytest.fixture
def chat(tmp_path):
    """`edgeai chat` on the bundled SmolLM2 in a pty; HOME is a temporary folder (input history).
    The screen checks expect llama.cpp's greedy answer: on this Q4_1 model two correct engines can
    part at a near-tie (see tests/runtimes/test_native_engine.py), so the backend is pinned."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb", "COLUMNS": "120"}
    child = pexpect.spawn(EDGEAI, ["chat", "--backend", "llama.cpp", "--ctx", "512", "--threads", "1", "--system", "You are a helpful assistant."],
                          env=env, encoding="utf-8", timeout=180, cwd=str(tmp_path), dimensions=(50, 200))
    child.expect("you> ")
    yield child
    child.close(force=True)


def ask(child, line: str) -> str:
    """Type a line, wait for the next prompt, return what the screen showed in between."""
    child.sendline(line)
    child.expect("you> ")
    return child.before


def saved(child, path: Path) -> dict:
    assert "saved" in ask(child, f"/save {path}")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_a_conversation(chat, tmp_path):
    assert "/reset" in ask(chat, "/help") and "/load FILE" in chat.before
    assert "temperature = 0.0" in ask(chat, "/set temp 0")
    assert "max_tokens = 24" in ask(chat, "/set max_tokens 24")
    assert "error:" in ask(chat, "/set temp hot") and "not a number" in chat.before
    assert "Paris" in ask(chat, "What is the capital of France?")
    stats = ask(chat, "/stats")
    for expected in ("decode", "tok/s", "first token after", "resident", "of 512 positions", "llama.cpp, 1 thread"):
        assert expected in stats, expected

    # multi-line input: a trailing backslash, and a triple-quoted block
    chat.sendline("Say hello\\")
    chat.expect(r"\.\.\.> ")
    ask(chat, "in French.")
    chat.sendline('"""')
    chat.expect(r"\.\.\.> ")
    chat.sendline("Line one")
    chat.expect(r"\.\.\.> ")
    chat.sendline("Line two")
    chat.expect(r"\.\.\.> ")
    ask(chat, '"""')
    conv = saved(chat, tmp_path / "c.json")
    users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
    assert users == ["What is the capital of France?", "Say hello\nin French.", "Line one\nLine two"]
    assert conv["system"] == "You are a helpful assistant." and len(conv["messages"]) == 6

    # Ctrl-C stops the answer; the conversation keeps the question and the part answered
    ask(chat, "/set max_tokens 400")
    chat.sendline("Write a long story about a dragon who learns to read.")
    chat.expect("read\\.\r\n")
    chat.expect(r"\w+\W+\w+\W+\w+\W+\w+")  # the answer is being written
    chat.sendintr()
    chat.expect("stopped")
    chat.expect("you> ")
    conv = saved(chat, tmp_path / "c2.json")
    assert len(conv["messages"]) == 8 and conv["messages"][-1]["role"] == "assistant"
    assert 0 < len(conv["messages"][-1]["content"]) and conv["messages"][-2]["content"].endswith("learns to read.")

    # a bad /load is an error, and the conversation is untouched
    (tmp_path / "bad.json").write_text('{"format": "edgeai-chat/1", "messages": [{"role": "user"}]}')
    out = ask(chat, f"/load {tmp_path / 'bad.json'}")
    assert "error:" in out and "message 0" in out
    assert "error:" in ask(chat, f"/load {tmp_path / 'nope.json'}") and "does not exist" in chat.before
    assert len(saved(chat, tmp_path / "c3.json")["messages"]) == 8

    # a conversation longer than the context loses its oldest turns, with a notice
    ask(chat, "/set max_tokens 4")
    ask(chat, "Repeat: " + "apple banana cherry " * 70)
    out = ask(chat, "Repeat: " + "river mountain forest " * 70)
    assert "context full (512 tokens): dropped the" in out and "oldest messages" in out
    conv = saved(chat, tmp_path / "c4.json")
    assert conv["messages"][0]["role"] == "user" and conv["messages"][-2]["content"].startswith("Repeat: river")
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] * (len(conv["messages"]) // 2)

    # /load restores a saved conversation; /reset forgets it
    assert "loaded 6 messages" in ask(chat, f"/load {tmp_path / 'c.json'}")
    assert "conversation cleared" in ask(chat, "/reset")
    assert saved(chat, tmp_path / "c5.json")["messages"] == []

    # Ctrl-C on the input line clears it; Ctrl-D leaves
    chat.sendintr()
    chat.expect("Ctrl-D or /exit leaves")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert "capital of France" in (tmp_path / ".local" / "state" / "edgeai" / "chat_history").read_text()


def test_run_prints_the_generation(tiny_chat_gguf, monkeypatch):
    """`run` answers the prompt as the user's turn in the model's chat template (as ollama run,
    llama-cli and mlx_lm.generate do); --raw completes it as plain text; an empty answer says why."""
    with edgeai.load(tiny_chat_gguf, n_ctx=256, threads=1) as m:
        assert not m.plain_chat  # the tiny model has a ChatML template
        expected = m.chat([{"role": "user", "content": "Hello world"}], max_tokens=6, temperature=0)
        expected_raw = m.generate("Hello world", max_tokens=6, temperature=0)
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Hello world", "-n", "6", "--temp", "0", "--json",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["text"] == expected and out["generated_tokens"] == 6 and out["finish_reason"] == "length"
    assert out["prompt_format"] == "chat template"
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Hello world", "-n", "6", "--temp", "0", "-t", "1"])
    assert result.exit_code == 0 and result.output == expected + "\n"
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Hello world", "-n", "6", "--temp", "0", "-t", "1",
                                 "--raw", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["text"] == expected_raw and out["prompt_format"] == "raw"
    import dataclasses

    from edgeai.model import FinishReason, Model

    real_chat = Model.chat

    def ends_at_once(self, messages, **kwargs):  # the bundled instruct model's first token can be its end of turn
        last = list(real_chat(self, messages, **{**kwargs, "max_tokens": 1}))[-1]
        yield dataclasses.replace(last, text="", finish_reason=FinishReason.STOP)

    monkeypatch.setattr(Model, "chat", ends_at_once)
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Tell me a story.", "-t", "1"])
    assert result.exit_code == 0 and "(no text: the model ended at once, finish reason 'stop'; --raw" in result.output
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Hello", "--device", "pi9"])
    assert result.exit_code == 1 and "unknown device 'pi9'" in result.output
    result = runner.invoke(app, ["run", str(tiny_chat_gguf), "Hello", "--memory-budget", "lots"])
    assert result.exit_code == 1 and "memory budget 'lots' is not a size" in result.output


def test_bench_compares_backends_on_one_file(tiny_chat_gguf):
    result = runner.invoke(app, ["bench", str(tiny_chat_gguf), "--backend", "llama.cpp", "--backend", "llama.cpp",
                                 "-t", "1", "--prompt-tokens", "32", "--gen-tokens", "8", "--repeats", "2",
                                 "--memory-budget", "1GiB", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = out["results"]
    assert out["roofline"]["decode_tps"] > 0 and out["roofline"]["bytes_per_token"] > 0
    assert [r["backend"] for r in rows] == ["llama.cpp", "llama.cpp"]
    for r in rows:
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and 0 < r["ttft_s"] < 60
        assert r["peak_rss_bytes"] > r["load_rss_bytes"] > 0 and r["threads"] == 1 and r["runs"] == 2
    assert rows[0]["ratio_vs_first"]["decode"] == 1.0
    assert rows[1]["ratio_vs_first"]["decode"] == pytest.approx(rows[1]["decode_tps"] / rows[0]["decode_tps"])
    result = runner.invoke(app, ["bench", str(tiny_chat_gguf), "--backend", "onnxruntime"])
    assert result.exit_code == 1 and "cannot run" in result.output
    result = runner.invoke(app, ["bench", str(tiny_chat_gguf), "--memory-budget", "12 parsecs"])
    assert result.exit_code == 1 and "unknown unit 'parsecs'" in result.output


def test_a_refusing_chat_template_keeps_the_conversation(tiny_chat_gguf):
    """A template's raise_exception(...) is shown as an error; the turn is dropped, the session goes on."""
    import io

    from rich.console import Console

    from edgeai.model import Model
    from edgeai.cli.repl import Repl

    with edgeai.load(tiny_chat_gguf, backend="native", n_ctx=256, threads=1) as m:
        m.backend.chat_template = ("{% if messages[-1]['content'] == 'forbidden' %}{{ raise_exception('not that') }}"
                                   "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
        out = io.StringIO()
        repl = Repl(Model(m.backend), console=Console(file=out, width=200))
        repl.session.options["max_tokens"] = 2
        repl.turn("forbidden")
        assert "error:" in out.getvalue() and "refused this conversation: not that" in out.getvalue()
        assert repl.session.messages == []
        repl.turn("hello")
        assert [x["role"] for x in repl.session.messages] == ["user", "assistant"]
