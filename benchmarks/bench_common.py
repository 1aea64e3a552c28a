"""What the benchmarks share: the CPU's name for their reports, SmolLM2 converted to a type, and a KV
cache's size per position.

Benchmarks run as scripts (`.venv/bin/python benchmarks/NAME.py`), so this folder is on sys.path and
they import it as `bench_common`.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path.home() / ".cache" / "edgeai-bench"
EDGEAI = str(Path(sys.executable).parent / "edgeai")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def model_file(kind: str) -> Path:
    """The bundled SmolLM2 converted to `kind` (q4_0, q8_0, q4_k_m...) by `edgeai convert`, made once
    into ~/.cache/edgeai-bench."""
    path = BENCH / f"smollm2-{kind}.gguf"
    if not path.exists():
        BENCH.mkdir(parents=True, exist_ok=True)
        subprocess.run([EDGEAI, "convert", "-o", str(path), "--quant", kind, "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def kv_cache_sizes(path: Path, kind: str) -> tuple[int, int]:
    """The native engine's KV cache of type `kind` for the model at `path`, as the planner counts it:
    bytes per position, and the bytes that do not grow with the context (a 4-bit cache's f16 rows of
    the latest positions, native/src/model.hpp kExactRecent), per sequence slot."""
    from edgeai import _native
    from edgeai.gguf_header import read_header
    from edgeai.native_bridge import kv_types
    from edgeai.runtimes.native import engine_config

    config, kv = engine_config(read_header(path)), kv_types(kind)
    n = 1 << 16  # past any fixed ring
    per_position = _native.kv_bytes(config, n + 1, kv) - _native.kv_bytes(config, n, kv)
    return per_position, _native.kv_bytes(config, n, kv) - n * per_position
