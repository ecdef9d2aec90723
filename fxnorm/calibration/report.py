"""What a recalibration did: :class:`CalibrationReport` and its per-layer :class:`LayerStats`.

Example:
    >>> report = CalibrationReport(layers=[LayerStats("bn1", "BatchNorm2d", 4096, 4, 0.5, 0.1)],
    ...                            unreached=["fc_bn"], skipped_batches={}, num_batches=4, num_samples=32)
    >>> report.to_dict()["layers"][0]["name"], [s.name for s in report.moved_most(1)]
    ('bn1', ['bn1'])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import CalibrationError, FxNormError
from ..reports import Report

__all__ = ["LayerStats", "CalibrationReport", "ResetReport", "layer_stats"]


@dataclass
class LayerStats:
    """How the statistics of one norm changed."""

    name: str  #: qualified name of the norm in the model
    kind: str  #: BatchNorm2d, SyncBatchNorm, InstanceNorm2d ... (a subclass reports the kind of its base)
    count: int  #: elements per channel the new statistics were computed from
    batches: int  #: calls whose statistics were pooled (a norm called twice per forward counts twice)
    mean_shift: float  #: max over channels of |new mean - old mean| / sqrt(old var + eps)
    var_ratio: float  #: max over channels of |log((new var + eps) / (old var + eps))|

    @property
    def moved(self) -> float:
        """One figure for sorting: the larger of ``mean_shift`` and ``var_ratio``."""
        return max(self.mean_shift, self.var_ratio)


@dataclass
class CalibrationReport(Report):
    """The outcome of :func:`fxnorm.recalibrate` / :func:`fxnorm.finish_recalibration`."""

    missing_error: ClassVar[type[FxNormError]] = CalibrationError
    made_by: ClassVar[str] = "fxnorm.recalibrate (or fxnorm.finish_recalibration)"

    layers: list[LayerStats]  #: the norms whose statistics were written, in the order they were reached
    unreached: list[str]  #: selected norms the forward never called (left untouched)
    skipped_batches: dict[str, int]  #: calls a norm could not use (one value per channel), by norm
    num_batches: int  #: forwards run through the model
    num_samples: int  #: their batch sizes (first dimension of the input), summed
    unusable: list[str] = field(default_factory=list)  #: reached, but every call was skipped (left untouched)
    #: norm modules that ran without a batch_norm/instance_norm call fxnorm could catch, with why
    unsupported: dict[str, str] = field(default_factory=dict)
    passes: int = 1  #: passes over the data (``order="sequential"``: one per level)
    #: ``order="sequential"``: the norms of every level, level by level (empty for the joint order)
    levels: list[list[str]] = field(default_factory=list)

    def moved_most(self, k: int = 10) -> list[LayerStats]:
        """The ``k`` layers whose statistics moved most (for a "what changed" table).

        Example:
            >>> r = CalibrationReport([LayerStats("a", "BatchNorm2d", 8, 1, 0.1, 0.0),
            ...                        LayerStats("b", "BatchNorm2d", 8, 1, 2.0, 0.3)], [], {}, 1, 2)
            >>> [s.name for s in r.moved_most(1)]
            ['b']
        """
        return sorted(self.layers, key=lambda s: s.moved, reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass
class ResetReport(Report):
    """The outcome of :func:`fxnorm.reset`."""

    missing_error: ClassVar[type[FxNormError]] = CalibrationError
    made_by: ClassVar[str] = "fxnorm.reset"

    names: list[str]  #: qualified names of the norms whose statistics were reset

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def layer_stats(name: str, kind: str, count: int, batches: int, old_mean: torch.Tensor, old_var: torch.Tensor,
                new_mean: torch.Tensor, new_var: torch.Tensor, eps: float) -> LayerStats:
    """Summarize how a norm's statistics moved (computed in float64; NaN-free for finite inputs).

    Example:
        >>> s = layer_stats("bn", "BatchNorm1d", 10, 1, torch.zeros(2), torch.ones(2),
        ...                 torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), 0.0)
        >>> s.mean_shift, round(s.var_ratio, 4)
        (2.0, 1.3863)
    """
    old_mean, old_var = old_mean.detach().double().cpu(), old_var.detach().double().cpu()
    new_mean, new_var = new_mean.detach().double().cpu(), new_var.detach().double().cpu()
    scale = (old_var.clamp_min(0) + eps).sqrt()
    shift = ((new_mean - old_mean).abs() / scale).max().item()
    ratio = ((new_var.clamp_min(0) + eps) / (old_var.clamp_min(0) + eps)).log().abs().max().item()
    clean = [x if math.isfinite(x) else float("inf") for x in (shift, ratio)]
    return LayerStats(name, kind, count, batches, clean[0], clean[1])
