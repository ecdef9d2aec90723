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

import warnings
from collections.abc import Sequence

import torch

from ..errors import CalibrationError, CalibrationWarning, DataError, FxNormError, NonFiniteStatistics
from .distributed import Vote, all_reduce_targets, vote
from .observers import NormTarget
from .report import CalibrationReport
from .session import RecalibrationSession

__all__ = ["NO_BATCH", "SMALL_BATCH", "first_failure", "local_checks", "gather", "new_statistics",
           "write_statistics", "warn_small_batches", "unsupported_reason", "build_report"]


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


def local_checks(session: RecalibrationSession, *, need_batches: bool = True,
                 targets: Sequence[NormTarget] | None = None) -> None:
    """What must hold on this process before anything is merged (raises the first problem).
    ``need_batches=False``: a process without batches is fine (a distributed run pools the others')."""
    session.end_interrupted()
    tally = session.tally
    if tally.failed:
        raise CalibrationError(f"{tally.failed}: the statistics gathered since prepare_recalibration() are incomplete "
                               "and were not written; the model is unchanged (call fxnorm.prepare_recalibration(model) "
                               "again)")
    if need_batches and tally.num_batches == 0:
        raise DataError(NO_BATCH)
    targets = session.targets if targets is None else targets
    for t in targets:
        if t.module.running_mean is not t.running_mean or t.module.running_var is not t.running_var:
            raise CalibrationError(f"the buffers of norm '{t.label}' were replaced after prepare_recalibration() "
                                   "(model.to()?): nothing was written; prepare again after moving the model")
    failure = first_failure(list(targets))
    if failure is not None:
        raise failure


def gather(session: RecalibrationSession, all_reduce: bool, targets: Sequence[NormTarget] | None = None) -> Vote | None:
    """Local checks, then (distributed) the vote, so that every rank fails together, then the merge of
    ``targets`` (default: all of the session's). Returns the vote (None when not distributed)."""
    targets = session.targets if targets is None else targets
    local: FxNormError | None = None
    try:
        local_checks(session, need_batches=not all_reduce, targets=targets)
    except FxNormError as err:
        local = err
    outcome = None
    if all_reduce:
        tally = session.tally
        outcome = vote(targets, local is not None, tally.num_batches, tally.num_samples, tally.largest)
        local = local or outcome.error()
    if local is not None:
        raise local
    for t in targets:
        t.flush()
    if all_reduce:
        all_reduce_targets(list(targets))
    return outcome


def new_statistics(session: RecalibrationSession) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The values to write, by target id, cast to the buffers' dtype and checked."""
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in session.targets:
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


def write_statistics(targets: Sequence[NormTarget], new: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the checked new statistics into the norms' buffers (nothing in it can fail)."""
    for t in targets:
        mean, var = new[id(t)]
        t.running_mean.copy_(mean)
        t.running_var.copy_(var)
        if t.num_batches_tracked is not None:
            t.num_batches_tracked.fill_(t.updates)


#: Batches below this many samples make a :class:`~fxnorm.errors.CalibrationWarning` of the joint order.
SMALL_BATCH = 8


def warn_small_batches(largest: int, norms: int, stacklevel: int = 2) -> None:
    """Warn when the largest calibration batch held fewer than :data:`SMALL_BATCH` samples (and more
    than one norm was recalibrated): the deeper norms' statistics are then off (see the message).
    ``stacklevel``: the frame the warning names, counted from this function's caller.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_small_batches(4, norms=3); warn_small_batches(32, norms=3)
        >>> [type(w.message).__name__ for w in caught]
        ['CalibrationWarning']
    """
    if 0 < largest < SMALL_BATCH and norms > 1:
        warnings.warn(CalibrationWarning(
            f"the calibration batches held at most {largest} sample(s): every norm normalized with the statistics "
            "of so few samples while the statistics were gathered, so a deeper norm received other inputs than it "
            f"gets at inference and its new statistics do not describe them. Use batches of {SMALL_BATCH} samples or "
            "more, or order=\"sequential\" (the CLI's --order sequential), which is exact at any batch size"),
            stacklevel=stacklevel + 1)


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
