"""edgeai: quantize, export and run language models on small machines.

Heavy modules (numpy, converters, runtimes) are imported lazily so that `edgeai --help` is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeai.errors import EdgeAIError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgeai.api import load as load
    from edgeai.api import plan as plan
    from edgeai.converters.convert import convert as convert
    from edgeai.model import Chunk as Chunk
    from edgeai.model import Model as Model

__all__ = ["Chunk", "EdgeAIError", "Model", "__version__", "convert", "load", "plan"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from edgeai.converters.convert import convert

        return convert
    if name in ("load", "plan"):
        from edgeai import api

        return getattr(api, name)
    if name in ("Model", "Chunk"):
        from edgeai import model

        return getattr(model, name)
    raise AttributeError(f"module 'edgeai' has no attribute {name!r}")
