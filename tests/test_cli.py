"""The `edgeai` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeai.cli import app
from helpers import TINY_ARCHS, make_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_tiny_checkpoint(root / "qwen3_moe", next(a for a in TINY_ARCHS if a.name == "qwen3_moe"))
    out = root / "m.gguf"
    result = runner.invoke(app, ["convert", str(folder), "-o", str(out), "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    return out


def test_inspect_shows_the_file(tiny_gguf):
    result = runner.invoke(app, ["inspect", str(tiny_gguf)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for expected in ("qwen3moe", "expert_count", "Q8_0", "F32", "bits per weight", "gpt2", "qwen2", "recipe",
                     "source_sha256", "model.safetensors:"):
        assert expected in result.output, expected


def test_convert_default_model_q8_0(tmp_path):
    """What `make run` does: the bundled SmolLM2 (a Q4_1 GGUF) re-encoded as Q8_0."""
    out = tmp_path / "smol.gguf"
    result = runner.invoke(app, ["convert", "-o", str(out), "--outtype", "q8_0", "--quiet"])
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    recipe = json.loads(GGUFReader(out).fields["edgeai.recipe"].contents())
    assert recipe["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and recipe["recipe"] == "q8_0"


def test_errors_are_one_clear_line(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code == 1
    assert "error:" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--outtype", "q9"])
    assert result.exit_code == 1 and "--outtype 'q9' is not supported" in result.output


def test_help_does_not_import_heavy_modules():
    code = "import sys, edgeai.cli; heavy = {'numpy', 'gguf', 'torch', 'llama_cpp'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_progress_bar_on_a_terminal_only(tmp_path, tiny_gguf):
    """On a terminal a rich progress bar shows bytes done; piped, or with --quiet, nothing."""
    import pexpect

    edgeai_bin = str(__import__("pathlib").Path(sys.executable).parent / "edgeai")
    child = pexpect.spawn(edgeai_bin, ["convert", str(tiny_gguf), "-o", str(tmp_path / "tty.gguf"), "--outtype", "f16"],
                          env={"COLUMNS": "120", "TERM": "xterm", "PATH": "/usr/bin:/bin"}, encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "converting to tty.gguf" in child.before and "kB" in child.before

    piped = subprocess.run([edgeai_bin, "convert", str(tiny_gguf), "-o", str(tmp_path / "pipe.gguf")],
                           capture_output=True, text=True, check=True)
    assert "converting" not in piped.stderr and "wrote" in piped.stdout


def test_library_progress_is_a_callback_and_draws_nothing(tmp_path, tiny_gguf, capfd):
    """convert reports (bytes done, bytes in all, what) to `progress=`; the library prints nothing
    (the bar above is the CLI's, edgeai/cli/progress.py)."""
    import edgeai

    calls = []
    edgeai.convert(tiny_gguf, tmp_path / "p.gguf", outtype="f16", progress=lambda *a: calls.append(a))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0 and calls[-1][2] == "converting to p.gguf"
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    out, err = capfd.readouterr()
    assert out == "" and "converting" not in err


def test_flags_are_named_as_the_keyword_arguments(tiny_gguf):
    """--temperature / --n-ctx / --n-prompt / --n-gen as the Python API's names; the old spellings stay."""
    outs = []
    for flags in (["--temperature", "0", "--n-ctx", "64"], ["--temp", "0", "--ctx", "64"]):
        result = runner.invoke(app, ["run", str(tiny_gguf), "hi", "-n", "3", "-t", "1", "--raw", "--json", *flags])
        assert result.exit_code == 0, result.output
        outs.append(json.loads(result.output)["text"])
    assert outs[0] == outs[1]
    result = runner.invoke(app, ["run", str(tiny_gguf), "hi", "--n-ctx", "0"])
    assert result.exit_code == 1 and "n_ctx" in result.output


# Flags about the terminal, not the work: no keyword argument stands behind them.
CLI_ONLY = {"json_output": "--json prints JSON instead of tables", "quiet": "convert --quiet draws no progress bar",
            "plan": "run --plan calls edgeai.plan (with run's own keywords) instead of running"}


def _called_library_function(command):
    """The function `command`'s callback imports under the command's own name (maybe renamed) and calls."""
    import ast
    import importlib
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(command.callback))).body[0]
    imported = {a.asname or a.name: (node.module, a.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for a in node.names}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    found = [imported[local] for local in called if local in imported and imported[local][1] == command.name]
    assert len(found) == 1, f"`edgeai {command.name}` calls no (or several) functions named {command.name}: {found}"
    module, name = found[0]
    return module, getattr(importlib.import_module(module), name)


def test_every_command_calls_the_public_function_of_its_name_with_its_flags_as_keywords():
    """Issue 21: `edgeai X --some-flag` is `X(..., some_flag=...)` of a public library function named
    X that returns data; the REPL (`chat`) is the one command whose function is terminal code, on a
    model `edgeai.load` loads with the other flags. Old spellings are hidden aliases (ALIASES)."""
    import inspect

    import typer.main

    import edgeai
    from edgeai.cli import ALIASES

    group = typer.main.get_command(app)
    assert set(group.commands) == {"convert", "inspect", "eval", "run", "chat", "serve", "bench", "devices", "fit"}
    flags = set()
    for name, command in group.commands.items():
        module, function = _called_library_function(command)
        assert function.__name__ == name and (function.__doc__ or "").strip(), (name, module)
        assert not any(part.startswith("_") for part in module.split(".")), module
        keywords = set(inspect.signature(function).parameters)
        if name == "chat":
            assert module == "edgeai.cli.repl"
            keywords |= set(inspect.signature(edgeai.load).parameters)
        else:
            assert not module.startswith("edgeai.cli"), f"`edgeai {name}` calls {module}.{name}: the library's, please"
        for param in command.params:
            long = [opt for opt in param.opts if opt.startswith("--")]
            if param.param_type_name == "option":
                assert len(long) == 1, f"`edgeai {name}` {long}: one flag name, old ones go to ALIASES (hidden)"
                flags |= set(long)
                if param.name in CLI_ONLY:
                    continue
                assert long[0] == "--" + param.name.replace("_", "-"), (name, long[0], param.name)
            assert param.name in keywords, f"`edgeai {name}` {long or param.name}: not a keyword of {module}.{name}"
    assert set(ALIASES.values()) <= flags and not set(ALIASES) & flags
    for name, hidden in (("run", "--temp "), ("run", "--ctx"), ("eval", "--chunks"), ("bench", "--gen-tokens")):
        shown = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert hidden not in shown and ALIASES[hidden.strip()] in shown, (name, hidden)


def test_devices_and_fit_return_what_the_commands_print():
    from edgeai.devices.report import devices
    from edgeai.fit import fit

    report = devices()
    assert report.machine is None and "pi5-8gb-nvme" in report.profiles
    listed = runner.invoke(app, ["devices", "--json"])
    assert listed.exit_code == 0 and [p["name"] for p in json.loads(listed.output)] == list(report.profiles)
    est = fit(None, "pi4-4gb", memory_budget="1GiB", n_ctx=256).estimates[0]
    shown = json.loads(runner.invoke(app, ["fit", "--device", "pi4-4gb", "--memory-budget", "1GiB", "--n-ctx", "256",
                                           "--json"]).output)
    assert shown["estimates"][0] == json.loads(json.dumps(est.to_json()))


def test_no_top_level_quant_or_runtimes_module():
    """Top-level folders are mapped into the edgeai namespace; nothing installs `quant` or `runtimes`."""
    code = "import importlib.util as u; print([m for m in ('quant', 'runtimes', 'converters', 'devices') if u.find_spec(m)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    assert out == "[]"


EDGEAI = str(Path(sys.executable).parent / "edgeai")


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def _convert_until_writing(out: Path, seconds: float = 0.0, written: int = 0) -> subprocess.Popen:
    """`edgeai convert` of the bundled SmolLM2 (145 MB of Q8_0; 1-7 s of writing, by the machine's
    load) to `out`, `seconds` after its temporary file appeared and holds at least `written` bytes (a
    point inside the write that does not depend on how fast this machine writes)."""
    old = set(_partials(out))
    proc = subprocess.Popen([EDGEAI, "convert", "-o", str(out), "--outtype", "q8_0", "--force", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as a service manager starts it: TERM and HUP at their defaults
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)])
    deadline = time.monotonic() + 60
    while not set(_partials(out)) - old:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.01)
    (partial,) = set(_partials(out)) - old
    while partial.stat().st_size < written:
        assert proc.poll() is None, "the conversion ended before it wrote the bytes awaited"
        assert time.monotonic() < deadline, "the conversion stopped writing"
        time.sleep(0.002)
    time.sleep(seconds)
    assert proc.poll() is None, "the conversion ended before the signal"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_are_as_clean_as_ctrl_c(tmp_path, sig):
    """They used to leave a .NAME.XXXX.partial file of tens of MB every time."""
    out = tmp_path / "o.gguf"
    proc = _convert_until_writing(out, 0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "interrupted: " in err and "o.gguf was not written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_conversion_leaves_no_output_and_the_next_run_cleans_up(tmp_path, tiny_gguf):
    """SIGKILL at any point: never a file at the output path (temporary + rename); the temporary a
    killed run leaves is removed by the next conversion to that output, another live writer's is not."""
    import fcntl

    out = tmp_path / "o.gguf"
    live = tmp_path / ".o.gguf.live-writer.partial"  # another process still writing: it holds the lock
    live.write_bytes(b"in progress")
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        for written in (0, 64 << 20):  # as it starts writing, and with 64 of its 145 MB written
            proc = _convert_until_writing(out, written=written)
            proc.kill()
            proc.wait()
            time.sleep(1.0)  # the next run removes leftovers older than a second (a writer locks its own at once)
            assert not out.exists()
            # this run's leftover only: the previous run's was removed when this one started writing
            assert len(_partials(out)) == 2 and live in _partials(out)
        time.sleep(1.0)  # leftovers younger than a second are left alone (a writer locks its file at once)
        import edgeai

        edgeai.convert(tiny_gguf, out)
        assert _partials(out) == [live] and live.read_bytes() == b"in progress"
        assert out.read_bytes()[:4] == b"GGUF"
    finally:
        os.close(lock)
