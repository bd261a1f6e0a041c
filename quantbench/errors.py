"""User-facing errors: one line that says what went wrong and what to do."""
from __future__ import annotations


class QuantbenchError(Exception):
    """An error caused by input the user can fix; the CLI prints it as one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(QuantbenchError):
    """A method, grid or format configuration that cannot work."""


class ModelLoadError(QuantbenchError):
    """A source that is not a loadable model."""


class FormatError(QuantbenchError):
    """An artifact that is missing, corrupted or not of the expected format."""


class HubError(QuantbenchError):
    """A Hugging Face Hub call that failed (no token, refused, unreachable); never shows the
    token."""


class EvalError(QuantbenchError):
    """An evaluation that has no valid result: a model whose log-probabilities, perplexity or
    KL divergence are NaN or infinite on some window (never reported as a number)."""
