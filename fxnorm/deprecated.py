"""The fxnorm 0.1 names that 0.2 replaced, kept for one release; each call warns.

- ``fold_report(folded)`` and ``trace_report(traced)``: use ``fxnorm.report_of(result, FoldReport)``
  and ``fxnorm.report_of(result, TraceReport)``.
- ``prepare(model)`` and ``convert(prepared, report=False)``: use :func:`fxnorm.prepare_recalibration`
  and :func:`fxnorm.finish_recalibration` (the report comes from :func:`fxnorm.report_of`). ``prepare``
  still returns something to run the batches through (a :class:`PreparedModel`, which calls the
  model itself inside the new session), and ``convert`` finishes that session.

Example:
    >>> import warnings, torch.nn as nn, fxnorm
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     fxnorm.fold_report(fxnorm.fold(nn.Sequential(nn.Linear(2, 2)))).folded
    []
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .calibration.recalibration import finish_recalibration, prepare_recalibration
from .calibration.report import CalibrationReport
from .calibration.selection import Select
from .calibration.session import RecalibrationSession
from .folding.planner import plan_folds
from .folding.report import FoldReport
from .graph.tracing import TraceReport, traced_report
from .reports import report_of

__all__ = ["fold_report", "trace_report", "prepare", "convert", "PreparedModel", "FoldPlan", "plan_norm"]


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


class PreparedModel(nn.Module):
    """What the deprecated ``prepare`` returns: calling it runs the model itself (whose session
    gathers the statistics); ``convert`` finishes the session."""

    def __init__(self, session: RecalibrationSession) -> None:
        super().__init__()
        self.__dict__["session"] = session  # not a submodule: the model is the user's, not ours

    @property
    def recalibration(self) -> RecalibrationSession:
        """The session ``prepare`` opened."""
        session: RecalibrationSession = self.__dict__["session"]
        return session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.recalibration.model(*args, **kwargs)


def prepare(model: nn.Module, *, select: Select = None) -> PreparedModel:
    """Deprecated: :func:`fxnorm.prepare_recalibration` (run the batches through the model itself)."""
    _warn("prepare", "fxnorm.prepare_recalibration")
    return PreparedModel(prepare_recalibration(model, select=select))


def convert(prepared: PreparedModel | RecalibrationSession, *, report: bool = False,
            all_reduce: bool | None = None) -> Any:
    """Deprecated: :func:`fxnorm.finish_recalibration` (and ``fxnorm.report_of(model, CalibrationReport)``
    instead of ``report=True``)."""
    _warn("convert", "fxnorm.finish_recalibration")
    session = prepared.recalibration if isinstance(prepared, PreparedModel) else prepared
    model = finish_recalibration(session, all_reduce=all_reduce)
    return (model, report_of(model, CalibrationReport)) if report else model


@dataclass
class FoldPlan:
    """Deprecated (fxnorm 0.1's ``fxnorm.plan.FoldPlan``): where one norm folds (``mode``, ``target``
    node) or why not (``reason``)."""

    mode: str | None
    target: fx.Node | None = None
    reason: str | None = None


def plan_norm(gm: fx.GraphModule, node: fx.Node, sites: Any = None) -> FoldPlan:
    """Deprecated: :func:`fxnorm.find_norms` (or ``fxnorm.folding.planner.plan_folds``), which decide
    for the whole model at once; this asks the planner about one node of ``gm``."""
    _warn("plan.plan_norm", "fxnorm.find_norms")
    for d in plan_folds(gm, gm).decisions:
        if d.call.node.name == node.name:
            target = None
            if d.site is not None:
                target = next((n for n in gm.graph.nodes if n.name == d.site[1]), None)
            return FoldPlan(d.mode, target, d.reason)
    return FoldPlan(None, reason="not a normalization layer")
