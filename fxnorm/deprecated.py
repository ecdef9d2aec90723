"""The fxnorm 0.1 names that 0.2 replaced, kept for one release; each call warns.

- ``fold_report(folded)`` and ``trace_report(traced)``: use ``fxnorm.report_of(result, FoldReport)``
  and ``fxnorm.report_of(result, TraceReport)``.
- ``prepare(model)`` and ``convert(prepared, report=False)``: use :func:`fxnorm.prepare_recalibration`
  and :func:`fxnorm.finish_recalibration` (the report comes from :func:`fxnorm.report_of`).

Example:
    >>> import warnings, torch.nn as nn, fxnorm
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     fxnorm.fold_report(fxnorm.fold(nn.Sequential(nn.Linear(2, 2)))).folded
    []
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn

from .calibration.recalibration import finish_recalibration, prepare_recalibration
from .calibration.report import CalibrationReport
from .calibration.selection import Select
from .folding.report import FoldReport
from .graph.tracing import TraceReport, traced_report
from .reports import report_of

__all__ = ["fold_report", "trace_report", "prepare", "convert"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"fxnorm.{old} is deprecated and will be removed in fxnorm 0.3; use {new}", DeprecationWarning,
                  stacklevel=3)


def fold_report(folded: nn.Module) -> FoldReport:
    """Deprecated: ``fxnorm.report_of(folded, fxnorm.FoldReport)``."""
    _warn("fold_report(folded)", "fxnorm.report_of(folded, fxnorm.FoldReport)")
    return report_of(folded, FoldReport)


def trace_report(traced: nn.Module) -> TraceReport:
    """Deprecated: ``fxnorm.report_of(traced, fxnorm.TraceReport)``."""
    _warn("trace_report(traced)", "fxnorm.report_of(traced, fxnorm.TraceReport)")
    return traced_report(traced)


def prepare(model: nn.Module, *, select: Select = None) -> nn.Module:
    """Deprecated: :func:`fxnorm.prepare_recalibration`."""
    _warn("prepare", "fxnorm.prepare_recalibration")
    return prepare_recalibration(model, select=select)


def convert(prepared: nn.Module, *, report: bool = False, all_reduce: bool | None = None) -> Any:
    """Deprecated: :func:`fxnorm.finish_recalibration` (and ``fxnorm.report_of(model, CalibrationReport)``
    instead of ``report=True``)."""
    _warn("convert", "fxnorm.finish_recalibration")
    model = finish_recalibration(prepared, all_reduce=all_reduce)
    return (model, report_of(model, CalibrationReport)) if report else model
