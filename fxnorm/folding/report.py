"""What :func:`fxnorm.fold` did: which norms folded where, which were skipped and why, and which
parts of the model stayed untraced. Read it with ``fxnorm.report_of(folded, FoldReport)``.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> folded = fxnorm.fold(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    >>> report = fxnorm.report_of(folded, FoldReport)
    >>> [(f.name, f.mode, f.into) for f in report.folded], report.skipped
    ([('1', 'into_producer', '0')], [])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, get_args

from ..errors import FoldError, FxNormError
from ..reports import Report
from ..graph.tracing import UntracedPart

__all__ = ["FoldMode", "MODES", "Evidence", "FoldedNorm", "SkippedNorm", "MergedBranches", "FoldReport"]

#: How a norm left the model (:attr:`FoldedNorm.mode`).
FoldMode = Literal["into_producer", "into_consumer", "affine", "norm_affine_into_consumer"]
#: The values of :data:`FoldMode`.
MODES: tuple[FoldMode, ...] = get_args(FoldMode)
#: How a fold was shown to be exact (:attr:`FoldedNorm.evidence`).
Evidence = Literal["proven", "counted", "observed", "unverified"]


@dataclass
class FoldedNorm:
    """A norm that is gone from the folded model (or, for ``mode="affine"``, became a per-channel affine op)."""

    name: str  #: qualified name of the norm in the model (module path, or the node name for a bare functional call)
    kind: str  #: BatchNorm2d, FrozenBatchNorm2d, batch_norm (functional), LayerNorm, ...
    mode: FoldMode  #: "into_producer" | "into_consumer" | "affine" | "norm_affine_into_consumer"
    into: str  #: qualified name of the layer(s) it folded into (comma separated), or of the new affine module
    #: how the fold was shown exact: "proven" (the whole model is one graph), "counted" (traced part by part;
    #: the example run called and read the layers only where the graphs do), "observed" (the norm runs in
    #: untraced code; the example run showed it fed by the layer alone, and the folded model gave the same
    #: outputs on those inputs), "unverified" (part by part, no example inputs: eager code might call the
    #: layers). strict=True refuses "observed" and "unverified" folds.
    evidence: Evidence = "proven"


@dataclass
class SkippedNorm:
    """A norm left as it was, with the reason it could not fold."""

    name: str
    kind: str
    reason: str


@dataclass
class MergedBranches:
    """A sum of parallel conv branches (``fold(..., merge_branches=True)``): merged into the conv
    ``into`` (a child of ``block``), or not (``into`` empty) for ``reason``."""

    block: str  #: qualified name of the module whose forward sums the branches ("<model>": the root)
    branches: list[str]  #: the summands (child names, or the input's node name)
    into: str  #: the branch conv that now holds the merged kernel ("" when not merged)
    reason: str | None = None


@dataclass
class FoldReport(Report):
    """Everything :func:`fxnorm.fold` folded, skipped, and could not trace."""

    missing_error: ClassVar[type[FxNormError]] = FoldError
    made_by: ClassVar[str] = "fxnorm.fold (or fxnorm.export_folded)"

    folded: list[FoldedNorm] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    untraced: list[UntracedPart] = field(default_factory=list)
    #: modules whose own forward was rewritten (a functional batch norm in their code folded away)
    forwards: list[str] = field(default_factory=list)
    #: with ``merge_branches=True``: each sum of conv branches, merged or not (with the reason)
    merged: list[MergedBranches] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"folded": [...], "skipped": [...], "untraced": [...], "forwards": [...],
        "merged": [...], "counts": {...}}``.

        Example:
            >>> FoldReport().to_dict()["counts"]
            {'folded': 0, 'skipped': 0, 'untraced': 0}
        """
        return {
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "untraced": [asdict(u) for u in self.untraced],
            "forwards": list(self.forwards),
            "merged": [asdict(m) for m in self.merged],
            "counts": {"folded": len(self.folded), "skipped": len(self.skipped), "untraced": len(self.untraced)},
        }
