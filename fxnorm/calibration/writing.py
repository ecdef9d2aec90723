"""What :func:`fxnorm.finish_recalibration` checks, merges and writes: the local checks (a failed
forward, no batch, NaN/Inf), the vote and the all-reduce of a distributed run, the new statistics in
the buffers' dtype, and the :class:`~fxnorm.calibration.report.CalibrationReport`.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxnorm.calibration.session import RecalibrationSession
    >>> bn = nn.BatchNorm1d(2)
    >>> with RecalibrationSession.open(bn) as session:
    ...     _ = bn(torch.randn(4, 2))
    >>> local_checks(session); gather(session, all_reduce=False)
    >>> [tuple(mean.shape) for mean, var in new_statistics(session).values()]
    [(2,)]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import CalibrationError, DataError, FxNormError, NonFiniteStatistics
from .distributed import all_reduce_targets
from .observers import NormTarget
from .report import CalibrationReport
from .session import RecalibrationSession

__all__ = ["NO_BATCH", "first_failure", "local_checks", "gather", "new_statistics",
           "unsupported_reason", "build_report"]


def first_failure(targets: list[NormTarget]) -> NonFiniteStatistics | None:
    """The NaN/Inf error of the earliest batch, and within it of the first norm reached."""
    found = [(bad, t.order, t) for t in targets if (bad := t.first_bad()) is not None]
    if not found:
        return None
    batch, _, target = min(found, key=lambda f: (f[0], f[1]))
    return target.bad_error(batch)


NO_BATCH = ("no batch was run through the model since prepare_recalibration(): nothing to write; the model is "
             "unchanged (a model compiled with torch.compile after prepare_recalibration, or a copy of the model, "
             "does not run fxnorm's hooks: run the batches through the model given to prepare_recalibration)")


def local_checks(session: RecalibrationSession) -> None:
    """What must hold on this process before anything is merged (raises the first problem)."""
    session.end_interrupted()
    tally = session.tally
    if tally.failed:
        raise CalibrationError(f"{tally.failed}: the statistics gathered since prepare_recalibration() are incomplete "
                               "and were not written; the model is unchanged (call fxnorm.prepare_recalibration(model) "
                               "again)")
    if tally.num_batches == 0:
        raise DataError(NO_BATCH)
    failure = first_failure(session.targets)
    if failure is not None:
        raise failure


def gather(session: RecalibrationSession, all_reduce: bool) -> None:
    """Local checks, then (distributed) a vote so that every rank fails together, then the merge."""
    local: FxNormError | None = None
    try:
        local_checks(session)
    except FxNormError as err:
        local = err
    if all_reduce:
        device = session.targets[0].moments.device
        votes = torch.tensor([1.0 if local is not None else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(votes)
        if local is None and votes.item() > 0:
            local = CalibrationError(f"{int(votes.item())} other process(es) failed to calibrate: nothing was written")
    if local is not None:
        raise local
    for t in session.targets:
        t.flush()
    if all_reduce:
        all_reduce_targets(session.targets)


def new_statistics(session: RecalibrationSession) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The values to write, by target id, cast to the buffers' dtype and checked."""
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in session.targets:
        if t.module.running_mean is not t.running_mean or t.module.running_var is not t.running_var:
            raise CalibrationError(f"the buffers of norm '{t.label}' were replaced after prepare_recalibration() "
                                   "(model.to()?): nothing was written; prepare again after moving the model")
        if t.updates == 0 or t.count < 2:
            continue
        mean = t.moments.mean.to(t.running_mean.device, t.running_mean.dtype)
        var = t.moments.variance(unbiased=True).to(t.running_var.device, t.running_var.dtype)
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            raise NonFiniteStatistics(
                f"norm '{t.label}': the recalibrated statistics do not fit in {t.running_var.dtype} (max |mean| "
                f"{t.moments.mean.abs().max().item():.4g}, max var {t.moments.variance().max().item():.4g}); "
                "nothing was written")
        new[id(t)] = (mean, var)
    if not new:
        raise CalibrationError(f"none of the {len(session.targets)} chosen norms was reached with usable data by the "
                               f"{session.tally.num_batches} batch(es) (check the forward and the batch sizes); "
                               "the model is unchanged")
    return new


def unsupported_reason(t: NormTarget) -> str:
    return (f"{type(t.module).__name__} ran {t.module_calls} time(s) without calling batch_norm/instance_norm with "
            "its own running_mean and running_var (its forward normalizes some other way, or with copies of the "
            "buffers): its statistics are left as they are")


def build_report(session: RecalibrationSession, layers: list, new: dict) -> CalibrationReport:
    targets, tally = session.targets, session.tally
    return CalibrationReport(
        layers=layers,
        unreached=[t.name for t in targets if t.calls == 0 and t.module_calls == 0],
        skipped_batches={t.name: t.skipped for t in targets if t.skipped},
        num_batches=tally.num_batches,
        num_samples=tally.num_samples,
        unusable=[t.name for t in targets if t.calls and id(t) not in new],
        unsupported={t.name: unsupported_reason(t) for t in targets if t.calls == 0 and t.module_calls},
    )
