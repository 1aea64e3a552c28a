"""Which backends exist, where they live, and which one runs a given artifact.

Backends are imported lazily, on first use: a backend whose module is missing or does not import
(an engine not built, a package not installed) is simply unavailable, and says why.

Every backend class has the constructor
`Cls(path, *, n_ctx=None, threads=None, memory_budget=None, kv_cache=None, header=None)` and a
classmethod `can_run(path, header=None) -> str | None` (None: it can, else the reason it cannot).
`header` is the GGUF header read once per load (`header_of`), so that choosing a backend and loading
it parse the file once.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from edgeai.errors import BackendError, CheckpointError, OptionError

log = logging.getLogger(__name__)

# name -> "module:Class"; the order is the order `auto` tries them in
BACKENDS: dict[str, str] = {
    "native": "edgeai.runtimes.native:NativeBackend",
    "llama.cpp": "edgeai.runtimes.llamacpp:LlamaCppBackend",
    "onnxruntime": "edgeai.runtimes.onnxrt:OnnxBackend",
}
AUTO = "auto"


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend: its class, or why it cannot be imported."""

    name: str
    cls: type | None
    unavailable: str | None  # the import error, when cls is None


_cache: dict[str, BackendInfo] = {}


def backend_info(name: str) -> BackendInfo:
    """Import the backend `name` (once); an unknown name is an OptionError listing the known ones."""
    if name not in BACKENDS:
        raise OptionError(f"unknown backend {name!r}; choose one of {AUTO}, {', '.join(BACKENDS)}")
    if name not in _cache:
        module_name, _, cls_name = BACKENDS[name].partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            _cache[name] = BackendInfo(name, cls, None)
        except Exception as exc:  # ImportError, or an engine failing at import: the backend is unavailable
            log.info("backend %s is unavailable: %s", name, exc)
            _cache[name] = BackendInfo(name, None, f"not available ({type(exc).__name__}: {exc})")
    return _cache[name]


def header_of(path: Path):
    """The parsed header (`edgeai.gguf_header.GGUFHeader`) of a GGUF file our reader accepts, else
    None (a folder, another format, or a file the reader refuses: each backend then says why). A
    vocabulary llama.cpp would abort the process on is refused here (TokenizerError)."""
    from edgeai.errors import CheckpointError, TokenizerError
    from edgeai.gguf_header import read_header

    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
    try:
        return read_header(path)
    except TokenizerError:
        raise
    except CheckpointError:
        return None


def reasons(path: Path, header=None) -> dict[str, str | None]:
    """For each registered backend: None if it can run `path`, else why not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        info = backend_info(name)
        out[name] = info.unavailable if info.cls is None else info.cls.can_run(path, header)
    return out


def _describe(path: Path) -> str:
    """What is at `path`, for an error saying it is not a model."""
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())[:6]
        return f"a folder holding {', '.join(entries) if entries else 'nothing'}" + (" ..." if len(entries) == 6 else "")
    with open(path, "rb") as f:
        head = f.read(8)
    return f"a {path.stat().st_size:,}-byte file starting with {head!r}"


def resolve(path: Path, backend: str = AUTO, header=None) -> type:
    """The backend class to run `path` with: `backend` itself (checked), or for `auto` the first
    registered backend that can run it (native, then llama.cpp for GGUF, then onnxruntime).
    header: `header_of(path)` when the caller has it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a .gguf file or an ONNX folder (model.onnx inside)")
    if backend != AUTO:
        info = backend_info(backend)
        why = info.unavailable if info.cls is None else info.cls.can_run(path, header)
        if why is None:
            return info.cls
        able = [n for n, r in reasons(path, header).items() if r is None]
        hint = f"; it can run with --backend {' or '.join(able)}" if able else ""
        raise BackendError(f"backend {backend} cannot run {path}: {why}{hint}")
    found = reasons(path, header)
    for name, why in found.items():
        if why is None:
            return backend_info(name).cls
    detail = "; ".join(f"{n}: {r}" for n, r in found.items())
    raise CheckpointError(f"{path} is not a model edgeai can run: it is {_describe(path)} ({detail})")
