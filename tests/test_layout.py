"""The house: imports go one way (tests/import_graph.py), and the source tree imports as the
installed package does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from import_graph import cycles, edges, violations

ROOT = Path(__file__).resolve().parent.parent


def test_imports_go_one_way_and_never_in_a_circle():
    """Every import counts (module level, in functions, under TYPE_CHECKING): quant never imports the
    conversion pipeline, runtimes never import converters or the API, no cycles among the modules."""
    graph = edges()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the reader sees the package
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_graph_reader_sees_function_level_and_typing_imports(tmp_path):
    """The check cannot pass by missing imports: the known function-level ones are in the graph."""
    graph = edges()
    assert "edgeai.converters.convert" in graph["edgeai"]  # lazy, inside __getattr__
    assert "edgeai.api" in graph["edgeai.bench"]  # inside a function


def _python_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_python_started_in_the_repository_root_imports_the_whole_package(tiny_chat_gguf):
    """`python -c "import edgeai; edgeai.load()"` in a checkout: the source tree's edgeai/ finds its
    subpackages in the sibling folders and the compiled core in the installed package."""
    done = _python_in_root(
        "import edgeai, edgeai.runtimes.native as n, edgeai.quant.formats, edgeai.converters.convert\n"
        f"m = edgeai.load({str(tiny_chat_gguf)!r})\n"
        "print(n.__file__); print(m.generate('hi', max_tokens=2, temperature=0) is not None)")
    assert done.returncode == 0, done.stderr
    where, ran = done.stdout.split()
    assert Path(where) == ROOT / "runtimes" / "native.py" and ran == "True"


def test_without_the_compiled_core_the_error_says_to_run_the_setup_command():
    """-S: no site-packages, so no installed package and no compiled core to find."""
    done = _python_in_root("import edgeai.native_bridge", "-S")
    assert done.returncode != 0
    assert "run the README's set-up command (`make run`, or `make install`)" in done.stderr
