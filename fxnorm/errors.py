"""The one exception hierarchy of fxnorm.

Every error fxnorm raises on user input is a :class:`FxNormError`, so callers
can catch them all with one ``except``. Messages name the layer or node and
say what to do about it.

Example:
    >>> import fxnorm
    >>> try:
    ...     fxnorm.fold(model_in_training_mode)          # doctest: +SKIP
    ... except fxnorm.FxNormError as err:
    ...     print(err)                                    # doctest: +SKIP
"""

from __future__ import annotations

__all__ = [
    "FxNormError",
    "TraceError",
    "FoldError",
    "CalibrationError",
    "ModelLoadError",
    "DataError",
    "MissingExtraError",
]


class FxNormError(Exception):
    """Base class of every error raised by fxnorm."""


class TraceError(FxNormError):
    """A model (or a part of it) could not be traced and nothing could be done about it."""


class FoldError(FxNormError):
    """A requested fold is impossible or would change the model's output."""


class CalibrationError(FxNormError):
    """Resetting or recalibrating normalization statistics failed; the model was left unchanged."""


class ModelLoadError(FxNormError):
    """A model specification (CLI ``MODEL`` argument, weights file) could not be loaded."""


class DataError(FxNormError):
    """Calibration data could not be read or is unusable (empty, NaN/Inf, wrong shape)."""


class MissingExtraError(FxNormError, ImportError):
    """An optional dependency (an extra such as ``fxnorm[onnx]`` or ``fxnorm[quant]``) is not installed.

    Also an ``ImportError``, so code that guards an optional import keeps working; the message names
    the missing package and the ``pip install`` command that adds it.
    """
