"""fxnorm: inspect, reset, recalibrate and fold the normalization layers of PyTorch models with torch.fx.

Everything user-facing is importable from here; :func:`report_of` gives the report of any pass.

Example:
    >>> import torchvision, fxnorm
    >>> model = torchvision.models.resnet18().eval()
    >>> print(fxnorm.format_summary(fxnorm.find_norms(model)))
    20 norms (BatchNorm2d: 20); 20 foldable, 0 not foldable; 0 untraced parts
"""

from .startup import quiet_interrupts_of_the_command_line

quiet_interrupts_of_the_command_line()  # before torch is imported: see fxnorm.startup

from typing import Any

from .calibration.recalibration import finish_recalibration, prepare_recalibration, recalibrate, reset
from .calibration.report import CalibrationReport, LayerStats, ResetReport
from .calibration.selection import Select
from .calibration.session import RecalibrationSession
from .compat import install_aliases, resolve_renamed
from .errors import (
    CalibrationError,
    CalibrationWarning,
    DataError,
    FoldError,
    FxNormError,
    MissingExtraError,
    ModelLoadError,
    NonFiniteStatistics,
    TraceError,
)
from .export import export_folded, export_for_quantization, export_onnx
from .folding.apply import ChannelAffine, Standalone, fold
from .folding.report import FoldedNorm, FoldMode, FoldReport, MergedBranches, SkippedNorm
from .graph.tracing import LeafModules, LeafSpec, TraceReport, UntracedPart, trace
from .inspection.programs import batch_norm_nodes, count_batch_norm_ops, norms_with_affine
from .inspection.render import format_summary, format_table, format_untraced, report_dict, summarize
from .inspection.sites import NormSite, find_norms
from .reports import Report, report_of
from .version import __version__ as __version__

__all__ = [
    # errors
    "FxNormError",
    "TraceError",
    "FoldError",
    "CalibrationError",
    "DataError",
    "NonFiniteStatistics",
    "ModelLoadError",
    "MissingExtraError",
    "CalibrationWarning",
    # reports of every pass
    "report_of",
    "Report",
    # tracing
    "trace",
    "TraceReport",
    "UntracedPart",
    "LeafSpec",
    "LeafModules",
    # inspection
    "find_norms",
    "NormSite",
    "format_table",
    "format_summary",
    "format_untraced",
    "summarize",
    "report_dict",
    # folding
    "fold",
    "Standalone",
    "FoldReport",
    "FoldedNorm",
    "FoldMode",
    "SkippedNorm",
    "MergedBranches",
    "ChannelAffine",
    # reset and recalibration
    "reset",
    "ResetReport",
    "recalibrate",
    "prepare_recalibration",
    "finish_recalibration",
    "RecalibrationSession",
    "Select",
    "CalibrationReport",
    "LayerStats",
    # export
    "export_folded",
    "export_onnx",
    "export_for_quantization",
    "batch_norm_nodes",
    "count_batch_norm_ops",
    "norms_with_affine",
]

install_aliases()


def __getattr__(name: str) -> Any:
    """fxnorm 0.1 names (``prepare``, ``convert``, ``fold_report``, ``trace_report``): they still work
    for one release and warn (see :mod:`fxnorm.compat`)."""
    return resolve_renamed(__name__, name)
