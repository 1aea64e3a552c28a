"""The import graph of edgeai's own modules, read from the source with `ast` (nothing is imported).

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`, because each is
a place where one room names another. Run it to see the graph and what breaks the intended
direction (the test suite runs the same check, tests/test_layout.py):

    python3 tests/import_graph.py          # violations and cycles (exit 1 if any)
    python3 tests/import_graph.py --edges  # every edge, "importer -> imported"

The source folders map to the installed names as pyproject.toml's wheel.packages says:
converters/ -> edgeai.converters, quant/ -> edgeai.quant, runtimes/ -> edgeai.runtimes,
devices/ -> edgeai.devices, edgeai/ -> edgeai.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"edgeai": "edgeai", "converters": "edgeai.converters", "quant": "edgeai.quant",
           "runtimes": "edgeai.runtimes", "devices": "edgeai.devices"}

# (importer prefix, imported prefix, why it is not allowed)
RULES = (
    ("edgeai.quant", "edgeai.converters.convert", "quant is a lower layer than the conversion pipeline"),
    ("edgeai.runtimes", "edgeai.converters", "the run side never needs the conversion side"),
    ("edgeai.runtimes", "edgeai.api", "runtimes are what the API is built on"),
    ("edgeai.converters", "edgeai.api", "converters are what the API is built on"),
    ("edgeai.quant", "edgeai.api", "quant is what the API is built on"),
    ("edgeai.devices", "edgeai.api", "devices are what the API is built on"),
    *(("edgeai.runtimes", f"edgeai.{m}", "runtimes are what generation is built on")
      for m in ("model", "speculative", "batch", "context", "constraints", "tools", "scheduler", "server")),
)


def modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the package."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "edgeai" and parts and parts[0] in {"converters", "quant", "runtimes", "devices"}:
                continue  # not a source folder of its own
            out[".".join([package, *parts])] = path
    out["edgeai._native"] = ROOT / "native"  # the compiled core: a leaf (it imports nothing of ours)
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies inside (a from-import may name an attribute)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        if mod == "edgeai._native":
            continue
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    pkg = mod if is_package else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                hit = _resolve(t, known)
                if hit and hit != mod:
                    graph[mod].add(hit)
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Edges that go against RULES, as sentences."""
    out = []
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            for a, b, why in RULES:
                if (src == a or src.startswith(a + ".")) and (dst == b or dst.startswith(b + ".")):
                    out.append(f"{src} imports {dst}: {why}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    graph = edges()
    if "--edges" in argv:
        for src in sorted(graph):
            for dst in sorted(graph[src]):
                print(f"{src} -> {dst}")
        return 0
    bad, loops = violations(graph), cycles(graph)
    for line in bad:
        print("against the direction:", line)
    for group in loops:
        print("cycle:", " <-> ".join(group))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports; "
          f"{len(bad)} against the direction, {len(loops)} cycles")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
