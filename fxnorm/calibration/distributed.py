"""Recalibrating across the processes of ``torch.distributed``: the statistics gathered on every
rank are merged exactly (counts, sums and centred sums of squares all-reduced).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxnorm.calibration.observers import NormTarget
    >>> all_reduce_targets  # doctest: +ELLIPSIS
    <function all_reduce_targets at ...>
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .observers import NormTarget

__all__ = ["all_reduce_targets"]


def all_reduce_targets(targets: list[NormTarget]) -> None:
    for t in targets:
        t.moments.all_reduce()
    device = targets[0].moments.device
    counts = torch.tensor([[t.calls, t.updates, t.skipped] for t in targets], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    for t, (calls, updates, skipped) in zip(targets, counts.round().long().tolist()):
        t.calls, t.updates, t.skipped = calls, updates, skipped
