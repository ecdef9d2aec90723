"""fxnorm: inspect, reset, recalibrate and fold the normalization layers of PyTorch models with torch.fx.

Example:
    >>> import torchvision, fxnorm
    >>> model = torchvision.models.resnet18().eval()
    >>> print(fxnorm.format_summary(fxnorm.find_norms(model)))
    20 norms (BatchNorm2d: 20); 20 foldable, 0 not foldable; 0 untraced parts
"""

from .calibration.recalibration import CalibrationReport, LayerStats, convert, prepare, recalibrate, reset
from .folding.apply import ChannelAffine, FoldedNorm, FoldReport, SkippedNorm, fold, fold_report
from .errors import CalibrationError, DataError, FoldError, FxNormError, ModelLoadError, TraceError
from .inspection.render import format_summary, format_table, format_untraced, report_dict, summarize
from .inspection.sites import NormSite, find_norms
from .graph.tracing import TraceReport, UntracedPart, trace, trace_report

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
    "find_norms",
    "NormSite",
    "format_table",
    "format_summary",
    "format_untraced",
    "summarize",
    "report_dict",
    "fold",
    "fold_report",
    "FoldReport",
    "FoldedNorm",
    "SkippedNorm",
    "ChannelAffine",
    "reset",
    "prepare",
    "convert",
    "recalibrate",
    "CalibrationReport",
    "LayerStats",
]
__version__ = "0.1.0"
