"""What :func:`fxnorm.fold` did: which norms folded where, which were skipped and why, and which
parts of the model stayed untraced. The report is attached to the folded model and read back with
:func:`fold_report`.

Example:
    >>> import torch.nn as nn
    >>> from fxnorm import fold
    >>> folded = fold(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    >>> report = fold_report(folded)
    >>> [(f.name, f.mode, f.into) for f in report.folded], report.skipped
    ([('1', 'into_producer', '0')], [])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..errors import FoldError
from ..graph.tracing import UntracedPart

__all__ = ["FoldedNorm", "SkippedNorm", "FoldReport", "fold_report", "attach_report"]

_ATTR = "_fxnorm_fold_report"
_PRESERVED = "_user_preserved_attributes"  # GraphModule.__deepcopy__ puts these attributes back

#: The values of :attr:`FoldedNorm.mode`.
MODES = ("into_producer", "into_consumer", "affine", "norm_affine_into_consumer")


@dataclass
class FoldedNorm:
    """A norm that is gone from the folded model (or, for ``mode="affine"``, became a per-channel affine op)."""

    name: str  #: qualified name of the norm in the model (module path, or the node name for a bare functional call)
    kind: str  #: BatchNorm2d, FrozenBatchNorm2d, batch_norm (functional), LayerNorm, ...
    mode: str  #: "into_producer" | "into_consumer" | "affine" | "norm_affine_into_consumer"
    into: str  #: qualified name of the layer(s) it folded into (comma separated), or of the new affine module


@dataclass
class SkippedNorm:
    """A norm left as it was, with the reason it could not fold."""

    name: str
    kind: str
    reason: str


@dataclass
class FoldReport:
    """Everything :func:`fxnorm.fold` folded, skipped, and could not trace."""

    folded: list[FoldedNorm] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    untraced: list[UntracedPart] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"folded": [...], "skipped": [...], "untraced": [...], "counts": {...}}``.

        Example:
            >>> FoldReport().to_dict()["counts"]
            {'folded': 0, 'skipped': 0, 'untraced': 0}
        """
        return {
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "untraced": [asdict(u) for u in self.untraced],
            "counts": {"folded": len(self.folded), "skipped": len(self.skipped), "untraced": len(self.untraced)},
        }


def attach_report(module: nn.Module, report: FoldReport) -> None:
    """Attach ``report`` to a folded module (read back with :func:`fold_report`; it survives
    ``copy.deepcopy``, GraphModules included)."""
    object.__setattr__(module, _ATTR, report)
    meta = getattr(module, "meta", None)
    if isinstance(module, fx.GraphModule) and isinstance(meta, dict):
        meta.setdefault(_PRESERVED, {})[_ATTR] = report


def fold_report(folded: nn.Module) -> FoldReport:
    """The :class:`FoldReport` of a module returned by :func:`fxnorm.fold`.

    Raises:
        FoldError: ``folded`` did not come from :func:`fxnorm.fold`.

    Example:
        >>> import torch.nn as nn
        >>> from fxnorm import fold
        >>> fold_report(fold(nn.Sequential(nn.Linear(2, 2)))).folded
        []
    """
    report = getattr(folded, _ATTR, None)
    if not isinstance(report, FoldReport):
        raise FoldError(
            f"{type(folded).__name__} did not come from fxnorm.folding.apply(): call fxnorm.fold(model) and pass its result"
        )
    return report
