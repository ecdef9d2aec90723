"""fxnorm: inspect, reset, recalibrate and fold the normalization layers of PyTorch models with torch.fx."""

from .errors import CalibrationError, DataError, FoldError, FxNormError, ModelLoadError, TraceError
from .tracing import TraceReport, UntracedPart, trace, trace_report

__all__ = [
    "FxNormError",
    "TraceError",
    "FoldError",
    "CalibrationError",
    "ModelLoadError",
    "DataError",
    "trace",
    "trace_report",
    "TraceReport",
    "UntracedPart",
]
__version__ = "0.1.0"
