"""One way to get the report of any fxnorm pass: :func:`report_of`.

:func:`fxnorm.fold`, :func:`fxnorm.trace`, :func:`fxnorm.recalibrate`, :func:`fxnorm.reset` and the
exporters return what the user asked for (a model, a program), always the same type. What the pass
did is recorded beside the result, never on it: the registry holds a weak reference to the result
(no attribute is added to anyone's model, and the entry goes away with the object). Each kind of
report is kept separately, so a model that was folded and then recalibrated has both.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> folded = fxnorm.fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
    >>> report = fxnorm.report_of(folded, fxnorm.FoldReport)
    >>> [(f.name, f.into) for f in report.folded]
    [('1', '0')]
    >>> fxnorm.report_of(folded) is report          # the latest report of any kind
    True
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, ClassVar, TypeVar, overload

from .errors import FxNormError

__all__ = ["Report", "record_report", "report_of"]


class Report:
    """Base class of fxnorm's reports (:class:`fxnorm.FoldReport`, :class:`fxnorm.CalibrationReport`,
    :class:`fxnorm.ResetReport`, :class:`fxnorm.TraceReport`): dataclasses with a JSON-ready
    :meth:`to_dict`."""

    #: what :func:`report_of` raises when no report of this type was recorded for an object
    missing_error: ClassVar[type[FxNormError]] = FxNormError
    #: the passes that make this report, for that error's message
    made_by: ClassVar[str] = "an fxnorm pass"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        raise NotImplementedError


R = TypeVar("R", bound=Report)


class _Entry:
    """The reports of one live object, by report type; the latest one last."""

    def __init__(self, ref: weakref.ref) -> None:
        self.ref = ref
        self.reports: dict[type, Report] = {}


_ENTRIES: dict[int, _Entry] = {}


def _forget_entry(key: int, ref: weakref.ref) -> None:
    """Weak-reference callback: the object is gone, so is its entry (unless the id was reused)."""
    entry = _ENTRIES.get(key)
    if entry is not None and entry.ref is ref:
        del _ENTRIES[key]


def record_report(result: object, report: Report) -> None:
    """Remember ``report`` as the latest report of its type for ``result`` (kept as long as
    ``result`` lives; ``result`` must support weak references, as every ``nn.Module`` does).

    Example:
        >>> import torch.nn as nn
        >>> from fxnorm.folding.report import FoldReport
        >>> m = nn.Linear(1, 1)
        >>> record_report(m, FoldReport())
        >>> report_of(m, FoldReport).folded
        []
    """
    key = id(result)
    entry = _ENTRIES.get(key)
    if entry is None or entry.ref() is not result:
        try:
            ref = weakref.ref(result, functools.partial(_forget_entry, key))
        except TypeError:
            raise FxNormError(f"cannot keep a report for a {type(result).__name__} (no weak references)") from None
        entry = _ENTRIES[key] = _Entry(ref)
    entry.reports.pop(type(report), None)  # re-inserted last: the latest of any kind
    entry.reports[type(report)] = report


@overload
def report_of(result: object) -> Report: ...


@overload
def report_of(result: object, kind: type[R]) -> R: ...


def report_of(result: object, kind: type[Report] | None = None) -> Report:
    """The report of the latest fxnorm pass that returned ``result`` (of type ``kind`` when given).

    Args:
        result: what :func:`fxnorm.fold`, :func:`fxnorm.trace`, :func:`fxnorm.recalibrate`,
            :func:`fxnorm.reset`, :func:`fxnorm.finish_recalibration` or an exporter returned.
        kind: the report type wanted (``fxnorm.FoldReport``...); typed, so ``report_of(m,
            FoldReport).folded`` type-checks. Without it: the latest report of any type.

    Raises:
        FxNormError: no fxnorm pass returned ``result``; with ``kind``, ``kind.missing_error``
            (:class:`fxnorm.FoldError` for a ``FoldReport``...) when none made a ``kind`` report.

    Example:
        >>> import torch, torch.nn as nn, fxnorm
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> _ = fxnorm.recalibrate(model, [torch.randn(2, 3, 4, 4)])
        >>> fxnorm.report_of(model, fxnorm.CalibrationReport).num_batches
        1
    """
    entry = _ENTRIES.get(id(result))
    reports = entry.reports if entry is not None and entry.ref() is result else {}
    if kind is None:
        if reports:
            return list(reports.values())[-1]
        raise FxNormError(f"no fxnorm pass returned this {type(result).__name__}: report_of() takes what "
                          "fxnorm.fold, trace, recalibrate, reset or an exporter returned")
    found = reports.get(kind)
    if found is None:
        for cls, report in reversed(list(reports.items())):
            if issubclass(cls, kind):
                return report
        made = f" (it has: {', '.join(t.__name__ for t in reports)})" if reports else ""
        raise kind.missing_error(f"no {kind.__name__} was recorded for this {type(result).__name__}{made}: pass "
                                 f"what {kind.made_by} returned")
    return found
