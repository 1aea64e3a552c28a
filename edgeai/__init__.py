"""edgeai: quantize, export and run language models on small machines.

Heavy modules (numpy, converters, runtimes) are imported lazily so that `edgeai --help` is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeai.errors import EdgeAIError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgeai.converters.convert import convert as convert

__all__ = ["EdgeAIError", "__version__", "convert"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from edgeai.converters.convert import convert

        return convert
    raise AttributeError(f"module 'edgeai' has no attribute {name!r}")
