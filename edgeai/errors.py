"""The one error family users see. Every message names the file, tensor or option at fault and
says how to fix it; internal invariants use ``assert`` instead."""

from __future__ import annotations


class EdgeAIError(Exception):
    """Base class of every error edgeai raises for bad input or an unusable environment."""


class CheckpointError(EdgeAIError):
    """A source checkpoint is missing, incomplete, corrupt or of an unsupported kind."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture has no spec in ``edgeai.converters``."""


class TensorError(CheckpointError):
    """A tensor is missing, unexpected, of the wrong shape or of an unsupported dtype."""


class TokenizerError(CheckpointError):
    """The tokenizer files cannot be represented the way llama.cpp reads them."""


class OutputError(EdgeAIError):
    """The output path cannot be written (exists without --force, disk full, ...)."""


class OptionError(EdgeAIError):
    """An option has a value that cannot be used."""


class CalibrationError(EdgeAIError):
    """Calibration cannot run: the text is too short, the tokens are unusable, or the model has no architecture spec."""


class BackendError(EdgeAIError):
    """No backend can run an artifact, the one asked for cannot, or it is not installed."""


class ChatTemplateError(EdgeAIError):
    """A model's chat template refused the conversation (its own raise_exception), or was stopped for
    crossing a bound on time or size, or for reaching outside its sandbox."""


class ContextOverflowError(EdgeAIError):
    """A prompt (or a conversation) does not fit in the model's context window."""


class DeviceError(EdgeAIError):
    """An unknown device profile, or a profile file that cannot be read."""


class BudgetError(OptionError):
    """A model cannot run within the memory budget; ``minimum`` is the smallest budget that would work."""

    def __init__(self, message: str, minimum: int) -> None:
        super().__init__(message)
        self.minimum = minimum


class ModelBusyError(EdgeAIError):
    """A model's sequence is in use by another generation (another thread's, or a newer one that took
    it over): one generation at a time per model (`edgeai.turns`)."""
