"""Render inspection data: a tabulate table, a summary line and a JSON-ready report.

Example:
    >>> import torchvision, fxnorm
    >>> model = torchvision.models.resnet18().eval()
    >>> sites = fxnorm.find_norms(model)
    >>> print(fxnorm.format_summary(sites))
    20 norms (BatchNorm2d: 20); 20 foldable, 0 not foldable; 0 untraced parts
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from .sites import NormSite
from ..graph.tracing import UntracedPart

__all__ = ["summarize", "format_summary", "format_table", "format_untraced", "report_dict"]


def summarize(sites: Sequence[NormSite], untraced: Sequence[UntracedPart] = ()) -> dict[str, Any]:
    """Counts by kind, foldable and not foldable, and the number of untraced parts.

    Example:
        >>> summarize([])["total"]
        0
    """
    kinds = Counter(s.kind for s in sites)
    foldable = sum(1 for s in sites if s.fold)
    return {
        "total": len(sites),
        "by_kind": dict(sorted(kinds.items())),
        "foldable": foldable,
        "not_foldable": len(sites) - foldable,
        "untraced_parts": len(untraced),
    }


def format_summary(sites: Sequence[NormSite], untraced: Sequence[UntracedPart] = ()) -> str:
    """One line: ``N norms (kind: n, ...); F foldable, K not foldable; U untraced parts``.

    Example:
        >>> format_summary([])
        '0 norms (none); 0 foldable, 0 not foldable; 0 untraced parts'
    """
    s = summarize(sites, untraced)
    kinds = ", ".join(f"{k}: {v}" for k, v in s["by_kind"].items()) or "none"
    return (f"{s['total']} norms ({kinds}); {s['foldable']} foldable, {s['not_foldable']} not foldable; "
            f"{s['untraced_parts']} untraced parts")


def _status(site: NormSite) -> str:
    if site.fold:
        return f"{site.fold} {site.fold_into}"
    return f"no: {site.reason}"


def format_table(sites: Sequence[NormSite], tablefmt: str = "simple", *, max_reason: int = 90) -> str:
    """A table of norm sites (name, kind, features, producer, fold status, health).

    Example:
        >>> import torch.nn as nn, fxnorm
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
        >>> print(format_table(fxnorm.find_norms(m), tablefmt="plain").splitlines()[1])
             1  BatchNorm2d           4  _0 (Conv2d)  into_producer 0  statistics never updated
    """
    rows = []
    for s in sites:
        status = _status(s)
        if len(status) > max_reason:
            status = status[: max_reason - 1] + "…"
        producer = f"{s.producer} ({s.producer_type})" if s.producer else "-"
        rows.append([s.name, s.kind, s.num_features, producer, status, "; ".join(s.health) or "ok"])
    headers = ["norm", "kind", "features", "producer", "fold", "health"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


def format_untraced(untraced: Sequence[UntracedPart], tablefmt: str = "simple") -> str:
    """A table of the parts that stayed eager and why.

    Example:
        >>> print(format_untraced([UntracedPart("", "Net", "TraceError: boom")], tablefmt="plain"))
        part     type    reason
        <model>  Net     TraceError: boom
    """
    rows = [[u.name or "<model>", u.type, u.reason] for u in untraced]
    return tabulate(rows, headers=["part", "type", "reason"], tablefmt=tablefmt)


def report_dict(model_name: str, sites: Sequence[NormSite], untraced: Sequence[UntracedPart] = ()) -> dict[str, Any]:
    """The JSON object ``fxnorm inspect --format json`` prints.

    Example:
        >>> sorted(report_dict("m", []))
        ['model', 'norms', 'summary', 'untraced']
    """
    return {
        "model": model_name,
        "norms": [s.to_dict() for s in sites],
        "untraced": [{"name": u.name, "type": u.type, "reason": u.reason} for u in untraced],
        "summary": summarize(sites, untraced),
    }
