"""Reset and recalibrate the running statistics of normalization layers, on the user's own model.

- :func:`reset`: ``reset_running_stats()`` on the chosen norms (mean 0, var 1, count 0).
- :func:`prepare_recalibration`: a :class:`fxnorm.calibration.session.RecalibrationSession` whose hooks catch the
  ``batch_norm`` calls of the chosen norms (matched by the identity of their running buffers) while
  batches run through the model itself. Nothing is replaced, copied or traced, and nothing in the
  model changes until the statistics are written: the norms normalize with batch statistics, every
  other module runs in eval mode (flags set for each forward and put back after it, even when it raises).
- :func:`finish_recalibration`: write the pooled statistics into the norms' buffers, all or nothing, remove
  every hook and return the user's model (same object, type, ``state_dict`` keys).
- :func:`recalibrate`: the three in one call, under ``torch.inference_mode``.

The statistics are exact: the mean and the variance of every element each norm received, pooled
over all batches (a short batch weighs what it holds, the spread between batch means counts),
merged in float64; ``running_var`` is stored unbiased like PyTorch does; ``num_batches_tracked``
is set to the number of calls that were pooled. ``momentum``, ``eps`` and modes are never changed.
See ``docs/recalibration.md``.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    >>> data = [torch.randn(4, 3, 16, 16) for _ in range(3)]          # a DataLoader works the same
    >>> import fxnorm
    >>> model = recalibrate(model, data)
    >>> report = fxnorm.report_of(model, CalibrationReport)
    >>> len(report.layers), report.num_batches, report.num_samples, model[1].num_batches_tracked.item()
    (2, 3, 12, 3)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn as nn

from ..errors import CalibrationError, DataError
from ..reports import record_report, report_of
from .batches import batches_of, check_arguments, model_device, run_batches
from .report import CalibrationReport, ResetReport, layer_stats
from .observers import NormTarget
from .selection import Select, lazy_uninitialized, select_norms
from .sequential import DependencyTracker, EarlyStop, levels
from .session import RecalibrationSession, unwrap
from .distributed import agreed_dependencies, fail_together, resolve_all_reduce
from .writing import build_report, gather, local_checks, new_statistics, warn_small_batches, write_statistics

__all__ = ["Order", "reset", "prepare_recalibration", "finish_recalibration", "recalibrate"]

#: How :func:`recalibrate` orders the norms (see its ``order``).
Order = Literal["joint", "sequential"]


def reset(model: nn.Module, *, select: Select = None) -> nn.Module:
    """Reset the running statistics of the chosen norms with their own ``reset_running_stats()``:
    ``running_mean`` 0, ``running_var`` 1, ``num_batches_tracked`` 0 (in the buffers' dtype and device).

    Args:
        model: any module; changed in place and returned. ``fxnorm.report_of(model, ResetReport)``
            names the norms that were reset.
        select: which norms (see :mod:`fxnorm.calibration.selection`); all with running statistics by default.

    Raises:
        CalibrationError: no norm with running statistics, ``select`` matches none or is malformed
            (nothing is changed).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
        >>> _ = m[0].running_mean.fill_(3.0)
        >>> import fxnorm
        >>> m = reset(m, select="0")
        >>> fxnorm.report_of(m, ResetReport).names, m[0].running_mean.tolist()
        (['0'], [0.0, 0.0])
    """
    chosen = [(name, m) for name, m in select_norms(model, select) if not lazy_uninitialized(m)]
    with torch.no_grad():
        for _, module in chosen:
            module.reset_running_stats()  # type: ignore[operator]  # every statistics norm has it
    record_report(model, ResetReport([name for name, _ in chosen]))
    return model


def prepare_recalibration(model: nn.Module, *, select: Select = None) -> RecalibrationSession:
    """Start recalibrating ``model``: install the hooks that gather the statistics of its chosen norms.

    Run the calibration batches through ``model`` itself (under ``torch.inference_mode()`` to save
    memory), then call :func:`finish_recalibration`. Until then nothing in ``model`` changes and
    nothing of it is replaced: each forward runs every module in eval mode (dropout and stochastic
    depth off) while every chosen norm normalizes with the statistics of its batch, which are
    recorded; the flags are put back after each forward. Use the session as a context manager
    (``with fxnorm.prepare_recalibration(model) as session:``): leaving the block, even on an
    exception or an interrupt, removes every hook; leaving it without finishing writes nothing. Do
    not move ``model`` (``.to()``) before finishing.

    Args:
        model: any module with norms that keep running statistics (BatchNorm*, SyncBatchNorm,
            InstanceNorm with ``track_running_stats``), including subclasses with their own
            ``forward`` and functional ``batch_norm`` calls with a norm's buffers. A
            ``DistributedDataParallel``/``DataParallel`` wrapper is looked through.
        select: which norms (see :mod:`fxnorm.calibration.selection`); the others run in eval mode, untouched.

    Returns:
        The :class:`~fxnorm.calibration.session.RecalibrationSession` (``session.batch()`` runs code that
        does not call the model itself, such as ``model.forward_features(x)``, as one batch).

    Raises:
        CalibrationError: no norm to recalibrate, ``select`` matches none, a lazy norm is not
            initialized, a chosen norm is in another open session, or the model is compiled with
            ``torch.compile`` or scripted (the message says what to recalibrate instead).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> with prepare_recalibration(model) as session, torch.inference_mode():
        ...     _ = model(torch.randn(2, 3, 8, 8))                  # the model itself
        ...     model = finish_recalibration(session)
        >>> model[1].num_batches_tracked.item(), len(model._forward_hooks)
        (1, 0)
    """
    return RecalibrationSession.open(model, select)


def finish_recalibration(session: RecalibrationSession, *, all_reduce: bool | None = None) -> nn.Module:
    """Write the statistics gathered by a session of :func:`prepare_recalibration` into the model's
    norms, remove the session's hooks, and return the model.

    All or nothing: every value is computed and checked before the first buffer is written. A norm
    gets ``running_mean`` = pooled mean, ``running_var`` = pooled unbiased variance (in the buffers'
    dtype) and ``num_batches_tracked`` = calls pooled; norms never reached are left untouched.
    ``fxnorm.report_of(model, CalibrationReport)`` says what was done. It may be called after the
    session's ``with`` block ended. When it fails the session is closed, except when no batch was run
    yet (run batches and finish again).

    Args:
        session: what :func:`prepare_recalibration` returned, after the calibration batches ran.
        all_reduce: pool the statistics of every process of ``torch.distributed`` (every rank must
            call it). Default: when ``torch.distributed`` is initialized with more than one process.

    Raises:
        DataError: no batch was run.
        CalibrationError: a forward raised or was interrupted, NaN/Inf statistics (naming the batch
            and the norm), new statistics do not fit the buffers' dtype, no norm was reached, the
            buffers were replaced, or the session was finished already.

    Example:
        >>> import torch, torch.nn as nn
        >>> bn = nn.BatchNorm1d(1)
        >>> session = prepare_recalibration(bn)
        >>> _ = bn(torch.tensor([[1.0], [3.0]])); _ = bn(torch.tensor([[5.0], [7.0], [9.0]]))
        >>> import fxnorm
        >>> bn = finish_recalibration(session)   # pooled over 1, 3, 5, 7, 9
        >>> rep = fxnorm.report_of(bn, CalibrationReport)
        >>> bn.running_mean.tolist(), bn.running_var.tolist(), rep.layers[0].count
        ([5.0], [10.0], 5)
    """
    return finish(session, all_reduce=all_reduce, warn=True)


def finish(session: RecalibrationSession, *, all_reduce: bool | None, warn: bool, stacklevel: int = 3) -> nn.Module:
    """:func:`finish_recalibration`; ``warn``: a :class:`~fxnorm.errors.CalibrationWarning` for small
    batches, naming the frame ``stacklevel`` above this one."""
    if not isinstance(session, RecalibrationSession):
        raise CalibrationError(f"{type(session).__name__} was not made by fxnorm.prepare_recalibration: call "
                               "session = fxnorm.prepare_recalibration(model), run the calibration batches through "
                               "the model and pass the session")
    if session.finished:
        raise CalibrationError("this session was finished already: call fxnorm.prepare_recalibration(model) again")
    all_reduce = resolve_all_reduce(all_reduce)
    try:
        with torch.no_grad():
            if not all_reduce:
                local_checks(session)  # a failure here leaves the session usable (run batches, finish again)
            outcome = gather(session, all_reduce)
            if outcome is not None:  # the report holds the totals of every process
                tally = session.tally
                tally.num_batches, tally.num_samples, tally.largest = outcome.batches, outcome.samples, outcome.largest
            new = new_statistics(session)
            order = sorted((t for t in session.targets if id(t) in new), key=lambda t: t.order)
            layers = [layer_stats(t.name, t.kind, t.count, t.updates, t.running_mean, t.running_var, *new[id(t)],
                                  float(getattr(t.module, "eps", 1e-5))) for t in order]
            write_statistics(order, new)  # nothing in it can fail
    except BaseException as err:
        if all_reduce or not (isinstance(err, DataError) and session.tally.num_batches == 0
                              and not session.tally.failed):
            # voted, merged, all-reduced or failed already: these statistics cannot be used again
            session.tally.failed = session.tally.failed or f"finish_recalibration() failed ({type(err).__name__})"
            session.close()
        raise  # no batch yet: the session stays open (run batches, finish again)
    session.finished = True
    session.close()
    record_report(session.result, build_report(session, layers, new))
    if warn:
        warn_small_batches(session.tally.largest, len(layers), stacklevel=stacklevel)
    return session.result


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = False,
    select: Select = None,
    all_reduce: bool | None = None,
    order: Order = "joint",
) -> nn.Module:
    """Recompute the running statistics of ``model``'s norms from ``data``, in place, exactly.

    :func:`prepare_recalibration`, run every batch under ``torch.inference_mode()``, :func:`finish_recalibration`. If anything
    fails (empty data, a batch the model rejects, NaN/Inf, an interrupt) the model is exactly as
    before: statistics, modes, momentum.

    Args:
        model: the model; its buffers are updated and the same object is returned.
        data: an iterable of batches (a DataLoader, a list...), or one tensor/dict taken as a single
            batch. A batch is a tensor (``model(batch)``), a tuple/list whose first item is the
            input (``model(batch[0])``, e.g. ``(images, labels)``), or a dict of keyword inputs.
        num_batches: stop after this many batches (default: all of ``data``).
        device: move each batch there (default: the device of the model's first parameter/buffer).
            The model itself is not moved.
        forward: ``forward(model, batch)`` for anything else (called with the model itself, wrappers such as
            ``DistributedDataParallel`` taken off); everything it runs counts as one calibration batch.
        progress: show a tqdm progress bar.
        select: which norms (see :mod:`fxnorm.calibration.selection`); the others run in eval mode, untouched.
        all_reduce: see :func:`finish_recalibration` (default: when running distributed).
        order: ``"joint"``: one pass over ``data``, every chosen norm normalizing with its batch's
            statistics while they are gathered (a :class:`~fxnorm.errors.CalibrationWarning` when every batch
            held fewer than 8 samples: the deeper norms then see other inputs than at inference).
            ``"sequential"``: level by level (a norm's level is one more than the deepest norm feeding
            it), one pass over ``data`` per level, the norms of earlier levels already in eval mode with
            their new statistics: every norm gets the statistics of exactly what it receives at
            inference, at any batch size. ``data`` must then be iterable again (a list, a DataLoader).

    Raises:
        DataError: no batch, a batch of an unknown kind, the data iterator raised, NaN/Inf input.
        CalibrationError: the model raised (the cause is chained), nothing to recalibrate, ...

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.BatchNorm1d(3)).train()
        >>> data = [(torch.randn(8, 4), torch.zeros(8)) for _ in range(4)]   # (input, label) batches
        >>> model = recalibrate(model, data)
        >>> model.training, model[2].num_batches_tracked.item()   # mode kept; dropout was off
        (True, 4)
    """
    all_reduce = resolve_all_reduce(all_reduce)
    run = _Pass(model, data, num_batches, device, forward, progress, all_reduce)
    if order == "sequential":
        return _sequential(run, select)
    if order != "joint":
        run.fail_together()
        raise CalibrationError(f"order must be 'joint' or 'sequential', got {order!r}; the model is unchanged")
    return run(select, warn=True)


class _Pass:
    """One pass of :func:`recalibrate` over the data (its arguments kept for the next pass)."""

    def __init__(self, model: nn.Module, data: Any, num_batches: int | None, device: Any,
                 forward: Callable[[nn.Module, Any], Any] | None, progress: bool, all_reduce: bool) -> None:
        self.model, self.data, self.num_batches, self.device = model, data, num_batches, device
        self.forward, self.progress, self.all_reduce = forward, progress, all_reduce
        self.passes, self.sequential, self.forwards = 0, False, 0  # forwards: of this process's last pass
        self.tracker: DependencyTracker | None = None  #: the first sequential pass's (which norm feeds which)
        self.targets: list[NormTarget] = []  #: the last pass's norms

    def fail_together(self) -> None:
        if self.all_reduce:
            fail_together()

    def __call__(self, select: Select, warn: bool, track: bool = False, stop: dict[str, int] | None = None) -> nn.Module:
        """Prepare, run every batch (inside a :class:`DependencyTracker` when ``track``; each forward
        ended early by an :class:`EarlyStop` when ``stop`` gives every norm's calls), finish; a failure
        before the vote is told to the other processes."""
        session: RecalibrationSession | None = None
        self.passes += 1
        try:
            check_arguments(self.num_batches, self.forward)
            target_device = torch.device(self.device) if self.device is not None else model_device(self.model)
            batches = batches_of(self.data)
            total = self.num_batches
            if total is None and hasattr(self.data, "__len__") and not isinstance(self.data, (torch.Tensor, dict)):
                total = len(self.data)
            session = prepare_recalibration(self.model, select=select)
            for t in session.targets:
                t.pool_single = self.sequential
            self.targets = session.targets
            self.tracker = DependencyTracker(session.targets, session.tally) if track else None
            stopper = EarlyStop(session.targets, stop, session.tally) if stop else None
            with self.tracker or contextlib.nullcontext(), stopper or contextlib.nullcontext():
                count = self.forwards = run_batches(session, batches, self.num_batches, target_device, self.forward, self.progress,
                                     total)
            if count == 0 and not self.all_reduce:  # distributed: a process may have no batch (the vote checks)
                raise DataError("the calibration data yielded no batch: nothing to compute; the model is unchanged")
        except BaseException as err:
            if session is not None:
                session.close()
            if isinstance(err, Exception):
                self.fail_together()  # the other processes raise too instead of waiting for this one
            raise
        with session:
            return finish(session, all_reduce=self.all_reduce, warn=warn, stacklevel=4)


def _sequential(run: _Pass, select: Select) -> nn.Module:
    """``order="sequential"``: a first pass of every chosen norm that also finds their levels (its
    statistics are right for the first level), then one pass per further level; every buffer is put
    back when any pass fails."""
    if isinstance(run.data, Iterator):
        run.fail_together()
        raise DataError("order='sequential' runs the data once per level: pass data that can be iterated again (a "
                        "list, a DataLoader), not an iterator or generator; the model is unchanged")
    run.sequential = True
    try:
        saved = {name: (m, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
                 for name, m in select_norms(unwrap(run.model), select)}
    except Exception:
        run.fail_together()
        raise
    try:
        result = run(select, warn=False, track=True)
        first = report_of(result, CalibrationReport)
        depends_on = run.tracker.depends_on if run.tracker is not None else {}
        found = levels(run.targets, agreed_dependencies(run.targets, depends_on, run.all_reduce))
        calls = run.tracker.calls_per_forward(run.forwards) if run.tracker is not None else {}
        for level in found[1:]:
            ids = {id(t.module) for t in level}
            stop = {t.name: calls[t.name] for t in level if t.name in calls}
            run(lambda name, module: id(module) in ids, warn=False, stop=stop if len(stop) == len(level) else None)
    except BaseException:
        with torch.no_grad():
            for module, buffers in saved.values():
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)
        raise
    layers = []
    for s in first.layers:  # moved: from the statistics before the first pass to the final ones
        module, old = saved[s.name]
        layers.append(layer_stats(s.name, s.kind, s.count, s.batches, old["running_mean"], old["running_var"],
                                  getattr(module, "running_mean"), getattr(module, "running_var"),
                                  float(getattr(module, "eps", 1e-5))))
    record_report(result, dataclasses.replace(first, layers=layers, passes=run.passes,
                                              levels=[[t.name for t in level] for level in found]))
    return result
