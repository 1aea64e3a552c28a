"""The one place Python reaches the C++ core (``edgeai._native``).

Everything else imports from here, so a missing or stale build fails with one clear message.
"""

from __future__ import annotations

from edgeai.errors import EdgeAIError

try:
    from edgeai import _native
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise EdgeAIError(
        "the native extension edgeai._native is not built or does not import; run the README's "
        "set-up command (`make run`, or `make install`), which builds and installs it"
    ) from exc

native = _native


def kv_types(value: str | None):
    """A KV cache type as the engine takes it (`native.KVTypes`): `value` is the name users write,
    "f16", "q8_0", "q4_0" or keys/values such as "q8_0/q4_0" (None: f16), checked with an OptionError
    naming the choices (`runtimes.base.kv_cache_types`)."""
    from edgeai.runtimes.base import kv_cache_types

    k, v = kv_cache_types(value)
    return native.KVTypes(native.KVType[k.upper()], native.KVType[v.upper()])
