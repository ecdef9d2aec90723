"""Recalibrating across the processes of ``torch.distributed``: every rank gathers the statistics of
its own batches, then the ranks vote and merge them exactly.

The protocol keeps every rank in step, so that no failure leaves another rank waiting:

1. **The vote** (:func:`vote`, one ``all_gather`` of a small row per rank): whether the rank failed
   (its data raised, NaN/Inf, a forward raised, it could not even prepare), a fingerprint of the
   norms it recalibrates (names, kinds, channels: :func:`fingerprint`), and its batch and sample
   counts. A rank that fails at any point before merging casts a failing vote
   (:func:`fail_together`) at the place where the others vote, then raises its own error; every
   other rank raises a :class:`~fxnorm.errors.CalibrationError` naming the failed ranks. Ranks that
   chose different norms (another model, another ``select=``) all raise too. Nothing is written on
   any rank.
2. **The merge** (:func:`all_reduce_targets`), only after a unanimous vote: each norm's count, sum
   and centred sum of squares are all-reduced (:meth:`~fxnorm.calibration.moments.ChannelMoments.all_reduce`),
   and its call counters too, so every rank writes the same statistics: those of all ranks' data.

A rank without any batch (more ranks than batches) takes part with empty totals; the merge fails on
every rank only when no rank ran a batch.

Example:
    >>> import torch.nn as nn
    >>> from fxnorm.calibration.observers import NormTarget
    >>> a = [NormTarget.for_module("bn", nn.BatchNorm2d(4))]
    >>> b = [NormTarget.for_module("bn", nn.BatchNorm2d(8))]
    >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(b), running_distributed()
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CalibrationError, DataError, FxNormError
from .observers import NormTarget

__all__ = ["running_distributed", "resolve_all_reduce", "collective_device", "fingerprint", "Vote", "vote",
           "fail_together", "all_reduce_targets", "agreed_dependencies"]

def running_distributed() -> bool:
    """Whether ``torch.distributed`` is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_all_reduce(all_reduce: bool | None) -> bool:
    """``all_reduce`` as given, or (``None``) whether the run is distributed.

    Raises:
        CalibrationError: ``all_reduce=True`` without an initialized process group.
    """
    if all_reduce is None:
        return running_distributed()
    if all_reduce and not (dist.is_available() and dist.is_initialized()):
        raise CalibrationError("all_reduce=True needs torch.distributed to be initialized (init_process_group): "
                               "call it on every process first, or pass all_reduce=None; the model is unchanged")
    return bool(all_reduce)


def collective_device() -> torch.device:
    """Where the vote's tensors live: the current GPU for an NCCL-only process group, else the CPU."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fingerprint(targets: Sequence[NormTarget] | None) -> int:
    """A 48-bit digest of the norms recalibrated (name, kind, channels, in order): equal on every
    rank that recalibrates the same norms of the same model (exact in a float64)."""
    if not targets:
        return 0
    text = "|".join(f"{t.name}:{t.kind}:{t.num_channels}" for t in targets)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big") + 1


@dataclass(frozen=True)
class Vote:
    """What every rank said (indexed by rank), and the pooled counts."""

    failed: tuple[int, ...]  #: ranks that failed
    prints: tuple[int, ...]  #: each rank's :func:`fingerprint`
    norms: tuple[int, ...]  #: norms recalibrated by each rank
    batches: int  #: forwards run, summed over the ranks
    samples: int  #: samples in them, summed
    largest: int  #: the largest batch (samples) of any rank

    def error(self) -> FxNormError | None:
        """The error every rank that did not fail itself raises (None: merge)."""
        if self.failed:
            which = ", ".join(map(str, self.failed))
            return CalibrationError(f"process(es) {which} of {len(self.prints)} failed to recalibrate (the error "
                                    f"of process {self.failed[0]} says why): no process wrote any statistic")
        if len(set(self.prints)) > 1:
            counts = ", ".join(f"process {rank}: {n}" for rank, n in enumerate(self.norms))
            return CalibrationError(
                f"the processes recalibrate different norms ({counts} norm(s); the names, kinds or channel counts "
                "differ): every process must recalibrate the same model with the same select=; no process wrote "
                "any statistic")
        if self.batches == 0:
            return DataError("no process ran a calibration batch: nothing to write; the model is unchanged")
        return None


def vote(targets: Sequence[NormTarget] | None, failed: bool, batches: int = 0, samples: int = 0,
         largest: int = 0) -> Vote:
    """Every rank's row, gathered on every rank (one collective; every rank must call it once per merge)."""
    row = torch.tensor([float(failed), float(fingerprint(targets)), float(len(targets or ())), float(batches),
                        float(samples), float(largest)], dtype=torch.float64, device=collective_device())
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    table = [[round(v) for v in r.tolist()] for r in rows]
    return Vote(failed=tuple(rank for rank, r in enumerate(table) if r[0]), prints=tuple(r[1] for r in table),
                norms=tuple(r[2] for r in table), batches=sum(r[3] for r in table), samples=sum(r[4] for r in table),
                largest=max(r[5] for r in table))


def fail_together() -> None:
    """Cast this rank's failing vote, so that the others raise instead of waiting for it (the caller
    then raises its own error). A vote that cannot be cast (a broken process group) is given up."""
    with contextlib.suppress(Exception):
        vote(None, True)


def all_reduce_targets(targets: list[NormTarget]) -> None:
    """Replace every target's totals and counters by their sums over the ranks (after a unanimous vote)."""
    for t in targets:
        t.moments.all_reduce()
    device = targets[0].moments.device
    counts = torch.tensor([[t.calls, t.updates, t.skipped, t.module_calls] for t in targets], dtype=torch.float64,
                          device=device)
    dist.all_reduce(counts)
    for t, (calls, updates, skipped, module_calls) in zip(targets, counts.round().long().tolist()):
        t.calls, t.updates, t.skipped, t.module_calls = calls, updates, skipped, module_calls


def agreed_dependencies(targets: Sequence[NormTarget], depends_on: dict[str, set[str]],
                        all_reduce: bool) -> dict[str, set[str]]:
    """``depends_on`` (which norms feed each norm, by name), united over the ranks when ``all_reduce``
    (one collective; every rank then orders the norms in the same levels)."""
    if not all_reduce:
        return depends_on
    names = [t.name for t in targets]
    index = {name: i for i, name in enumerate(names)}
    edges = torch.zeros(len(names), len(names), dtype=torch.float64, device=collective_device())
    for name, deps in depends_on.items():
        for d in deps:
            if name in index and d in index:
                edges[index[name], index[d]] = 1.0
    dist.all_reduce(edges)
    return {name: {names[j] for j in edges[i].nonzero().flatten().tolist()} for i, name in enumerate(names)}
