"""edgeai: quantize, export and run language models on small machines.

Heavy modules (numpy, converters, runtimes) are imported lazily so that `edgeai --help` is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeai.errors import EdgeAIError
from edgeai.version import __version__


def _source_tree_search_path() -> None:
    """Imported from a checkout (Python started in the repository root, a notebook beside the
    README), this folder is the source tree's edgeai/, whose subpackages are its sibling folders
    (pyproject.toml's wheel.packages maps converters/ to edgeai.converters, ...). The package's
    search path then takes those folders, and the installed package's folder after them for the
    compiled core (edgeai._native); without an installed core, `edgeai.native_bridge` says to run the
    README's set-up command."""
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    if not ((root / "pyproject.toml").is_file() and (root / "runtimes" / "__init__.py").is_file()):
        return  # the installed package: its subpackages are inside it
    __path__.append(str(root))
    for entry in sys.path:
        installed = Path(entry or ".").resolve() / "edgeai"
        if installed != here and (installed / "runtimes").is_dir():
            __path__.append(str(installed))
            break


_source_tree_search_path()

if TYPE_CHECKING:
    from edgeai.api import load as load
    from edgeai.api import plan as plan
    from edgeai.api import run as run
    from edgeai.converters.convert import convert as convert
    from edgeai.model import Chunk as Chunk
    from edgeai.model import Model as Model

__all__ = ["Chunk", "EdgeAIError", "Model", "__version__", "convert", "load", "plan", "run"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from edgeai.converters.convert import convert

        return convert
    if name in ("load", "plan", "run"):
        from edgeai import api

        return getattr(api, name)
    if name in ("Model", "Chunk"):
        from edgeai import model

        return getattr(model, name)
    raise AttributeError(f"module 'edgeai' has no attribute {name!r}")
