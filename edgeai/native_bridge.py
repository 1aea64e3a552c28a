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
