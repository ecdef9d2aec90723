"""The one exception hierarchy of fxnorm: every exception fxnorm defines lives here.

Every error fxnorm raises on user input is a :class:`FxNormError`, so callers can catch them all
with one ``except``. Messages name the layer or node and say what to do about it.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> try:
    ...     fxnorm.fold("not a model")
    ... except fxnorm.FxNormError as err:
    ...     print(err)
    fxnorm.fold expects an nn.Module, got str
"""

from __future__ import annotations

__all__ = [
    "FxNormError",
    "TraceError",
    "FoldError",
    "CalibrationError",
    "DataError",
    "NonFiniteStatistics",
    "ModelLoadError",
    "UnknownModelError",
    "UnsafeFileError",
    "UsageError",
    "OutputError",
    "MissingExtraError",
    "CalibrationWarning",
    "StopForward",
]


class FxNormError(Exception):
    """Base class of every error raised by fxnorm."""


class TraceError(FxNormError):
    """A model (or a part of it) could not be traced and nothing could be done about it."""


class FoldError(FxNormError):
    """A requested fold is impossible or would change the model's output."""


class CalibrationError(FxNormError):
    """Resetting or recalibrating normalization statistics failed; the model was left unchanged."""


class DataError(FxNormError):
    """Calibration data could not be read or is unusable (empty, NaN/Inf, wrong shape)."""


class NonFiniteStatistics(CalibrationError, DataError):
    """NaN/Inf statistics (usually NaN/Inf in a calibration batch): both a calibration and a data error."""


class ModelLoadError(FxNormError):
    """A model specification (CLI ``MODEL`` argument, weights file) could not be loaded."""


class UnknownModelError(ModelLoadError):
    """``MODEL`` is not one of the accepted forms, or names nothing (the CLI exits with status 2)."""


class UnsafeFileError(ModelLoadError):
    """A ``MODEL`` file needs a class outside fxnorm's allow-list of safe classes to be unpickled.

    Unpickling it could run any code the file holds, so the CLI refuses it unless the user passes
    ``--trust-file``; the message names the class and the safe alternatives.
    """


class UsageError(FxNormError):
    """A bad command-line argument found after parsing (the CLI exits with status 2)."""


class OutputError(FxNormError):
    """An output file of the CLI could not be written; no output of the run was left behind."""


class MissingExtraError(FxNormError, ImportError):
    """An optional dependency (an extra such as ``fxnorm[onnx]`` or ``fxnorm[quant]``) is not installed.

    Also an ``ImportError``, so code that guards an optional import keeps working; the message names
    the missing package and the ``pip install`` command that adds it.
    """


class CalibrationWarning(UserWarning):
    """Recalibration succeeded, but its statistics may not be what inference needs (for instance
    batches of fewer than 8 samples; the message says what to do). A warning, not an error: filter it
    with ``warnings.simplefilter("ignore", fxnorm.CalibrationWarning)``."""


class StopForward(BaseException):
    """Internal: raised by fxnorm's own hooks to end a calibration forward once everything its pass
    runs for was gathered (``order="sequential"``); the forward counts as complete and fxnorm catches
    it. A ``BaseException``, so that a model's ``except Exception`` does not catch it."""
