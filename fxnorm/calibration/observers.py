"""What recalibration gathers for each norm, and how an intercepted norm call is answered.

Every chosen norm has one :class:`NormTarget` (its buffers and everything gathered for it). When the
model calls ``batch_norm`` or ``instance_norm`` with a target's running buffers (see
:mod:`fxnorm.calibration.interception`), :func:`observe_batch_norm` or :func:`observe_instance_norm`
answers the call: it normalizes the input the way the norm does in training mode (with the
statistics of the batch) and records those statistics; it never touches the norm's own buffers.

Batch norms on a CPU with contiguous input are reduced to per-(sample, channel) sums and sums of
squares and normalized with one eval-mode pass, small ones in float64 at once
(:mod:`fxnorm.calibration.fast_path`). Elsewhere (CUDA, large channels-last batches...) one
``torch.batch_norm`` call in training mode (cuDNN on GPUs) with
``momentum=1`` writes the batch mean and the unbiased batch variance into a row of a small scratch
table instead of the norm's buffers. Either way the per-batch statistics wait in that table; every
:data:`ROWS` batches (and at the end) it is checked for NaN/Inf and folded into float64 totals with
the exact pooled formula (:class:`fxnorm.calibration.moments.ChannelMoments`), so the forward pays
no per-batch synchronization. Half/bfloat16 inputs are normalized with float32 statistics.

Instance norms with running statistics normalize each instance by itself, and their population
statistics are pooled per channel over every element (:meth:`ChannelMoments.update`).

Example:
    >>> import torch, torch.nn as nn
    >>> bn = nn.BatchNorm2d(3)
    >>> target, tally = NormTarget.for_module("bn", bn), Tally()
    >>> out = observe_batch_norm(target, tally, torch.randn(4, 3, 2, 2) * 2 + 1, bn.weight, bn.bias, bn.eps)
    >>> target.flush(); target.count, bn.running_mean.tolist()   # the norm itself is untouched
    (16, [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import CalibrationError, NonFiniteStatistics
from .fast_path import SMALL, PlaneScratch, plane_statistics, small_statistics
from .moments import ChannelMoments

__all__ = ["ROWS", "Tally", "NormTarget", "observe_batch_norm", "observe_instance_norm"]

#: Batches whose statistics wait in a target's scratch table before they are merged in float64.
ROWS = 8
_MAX_LISTED = 8


@dataclass(eq=False)
class Tally:
    """What one recalibration session counts across its norms (batches, samples, failure)."""

    batch: int = -1  #: index of the forward in flight (or the last one)
    num_batches: int = 0  #: forwards through the model
    num_samples: int = 0  #: first-dimension sizes of their inputs, summed
    largest: int = 0  #: the largest of those sizes
    failed: str | None = None  #: why the gathered statistics cannot be used (set on a failed forward)
    next_order: int = 0

    def order(self) -> int:
        """The next rank in the order norms are first reached."""
        self.next_order += 1
        return self.next_order - 1


def _listed(channels: list[int]) -> str:
    return ", ".join(map(str, channels[:_MAX_LISTED])) + (", ..." if len(channels) > _MAX_LISTED else "")


@dataclass(eq=False)
class NormTarget:
    """One norm whose statistics are being recalibrated, and everything gathered for it."""

    name: str  #: qualified name in the user's model
    kind: str  #: BatchNorm2d, SyncBatchNorm, InstanceNorm2d ...
    module: nn.Module  #: the user's module owning the buffers
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    instance: bool = False  #: per-instance normalization (InstanceNorm)
    order: int = -1  #: when it was first reached (for naming the first failing layer)
    calls: int = 0  #: norm calls intercepted (a norm called twice per forward counts twice)
    updates: int = 0  #: calls whose statistics were used
    skipped: int = 0  #: calls with one value per channel (normalized with the old statistics, not counted)
    module_calls: int = 0  #: calls of the norm module itself
    unsupported: str | None = None  #: why the module ran without a norm call fxnorm could intercept
    #: pool calls with one value per channel too (``order="sequential"``, where the output of a norm
    #: being recalibrated feeds no other norm being recalibrated)
    pool_single: bool = False
    moments: ChannelMoments = field(init=False)
    scratch: PlaneScratch = field(default_factory=PlaneScratch, init=False, repr=False)
    _rows: Tensor | None = field(default=None, init=False, repr=False)
    _views: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list, init=False, repr=False)
    _counts: list[int] = field(default_factory=list, init=False, repr=False)
    _batches: list[int] = field(default_factory=list, init=False, repr=False)
    _ddof: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        device = self.running_mean.device
        if device.type == "mps":  # no float64 there
            device = torch.device("cpu")
        self.moments = ChannelMoments(int(self.running_mean.numel()), device=device)

    @classmethod
    def for_module(cls, name: str, module: nn.Module, kind: str | None = None) -> NormTarget:
        """The target of a norm module with running statistics."""
        from ..graph.kinds import norm_kind

        kind = kind or norm_kind(module) or type(module).__name__
        nbt = getattr(module, "num_batches_tracked", None)
        mean, var = module.running_mean, module.running_var
        if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
            raise CalibrationError(f"norm '{name}' has no running statistics to recalibrate")
        return cls(name, kind, module, mean, var, nbt if isinstance(nbt, Tensor) else None,
                   instance=kind.lower().startswith("instance"))

    @property
    def label(self) -> str:
        """The name for messages (the root module has the empty name)."""
        return self.name or f"<{type(self.module).__name__}>"

    @property
    def num_channels(self) -> int:
        return int(self.running_mean.numel())

    @property
    def count(self) -> int:
        """Elements per channel merged so far (call :meth:`flush` first to include pending rows)."""
        return self.moments.count

    def slot(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The scratch row ``(2, C)`` for the next batch's statistics, and its mean and variance views."""
        rows = self._rows
        if rows is None or rows.device != device or rows.dtype != dtype:
            self.flush()
            with torch.inference_mode(False):  # a normal tensor: updatable in and out of inference mode
                rows = self._rows = torch.zeros(ROWS, 2, self.num_channels, device=device, dtype=dtype)
                self._views = [(row, row[0], row[1]) for row in rows.unbind(0)]  # made once: views cost time
        elif len(self._counts) == ROWS:
            self.flush()
        return self._views[len(self._counts)]

    def commit(self, n: int, batch: int, unbiased: bool) -> None:
        """Record that the last :meth:`slot` now holds the mean and variance (unbiased or biased) of
        ``n`` elements per channel."""
        self._counts.append(n)
        self._batches.append(batch)
        self._ddof.append(1 if unbiased else 0)
        self.updates += 1

    def first_bad(self) -> int | None:
        """Batch index of the first pending row with NaN/Inf statistics (None when all are finite)."""
        k = len(self._counts)
        if not k or self._rows is None:
            return None
        finite = torch.isfinite(self._rows[:k]).all(dim=2).all(dim=1)
        if bool(finite.all()):
            return None
        return self._batches[int((~finite).nonzero()[0, 0])]

    def bad_error(self, batch: int) -> NonFiniteStatistics:
        """The error for NaN/Inf statistics in ``batch`` (names the batch, the layer and channels)."""
        row = self._batches.index(batch)
        if self._rows is None:
            raise CalibrationError(f"norm '{self.label}' has no pending statistics")
        bad = ~torch.isfinite(self._rows[row]).all(dim=0)
        channels = bad.nonzero().flatten().tolist()
        return NonFiniteStatistics(
            f"batch {batch}: the input of norm '{self.label}' has NaN/Inf statistics in channel(s) "
            f"{_listed(channels)} ({len(channels)} of {self.num_channels}); check the data (and the layers "
            "before it). No statistics were written"
        )

    def flush(self) -> None:
        """Merge the pending scratch rows into the float64 totals (exact pooled formula)."""
        k = len(self._counts)
        if not k or self._rows is None:
            return
        bad = self.first_bad()
        if bad is not None:
            raise self.bad_error(bad)
        rows, dev = self._rows, self.moments.device
        means = rows[:k, 0].to(dev, torch.float64)
        variances = rows[:k, 1].to(dev, torch.float64)
        n = torch.tensor(self._counts, dtype=torch.float64, device=dev).unsqueeze(1)
        ddof = torch.tensor(self._ddof, dtype=torch.float64, device=dev).unsqueeze(1)
        total = sum(self._counts)
        mean = (n * means).sum(0) / total
        m2 = ((n - ddof) * variances).sum(0) + (n * (means - mean).square()).sum(0)
        self.discard()
        self.moments.merge(total, mean, m2)

    def discard(self) -> None:
        """Drop pending rows (after a failed forward)."""
        self._counts.clear()
        self._batches.clear()
        self._ddof.clear()


def _float_params(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _reached(target: NormTarget, tally: Tally) -> None:
    if target.calls == 0:
        target.order = tally.order()
    target.calls += 1


def _pool(target: NormTarget, tally: Tally, input: Tensor) -> None:
    """Pool every element of ``input`` into the target's exact moments (one update); errors name the
    batch and the norm."""
    try:
        target.moments.update(input)
    except CalibrationError as err:
        kind = NonFiniteStatistics if "NaN/Inf" in str(err) else CalibrationError
        raise kind(f"batch {tally.batch}: norm '{target.label}': {err}") from None
    target.updates += 1


def observe_batch_norm(target: NormTarget, tally: Tally, input: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float) -> Tensor:
    """Answer a ``batch_norm`` call of ``target``: normalize ``input`` (N, C, ...) with its own batch
    statistics, as training mode does, and record them (the norm's buffers are not touched).

    A call with one value per channel cannot be normalized with batch statistics (PyTorch raises):
    it is normalized with the running statistics, counted in ``target.skipped`` and not pooled.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> x = torch.randn(8, 2)
        >>> out = observe_batch_norm(NormTarget.for_module("bn", bn), Tally(), x, bn.weight, bn.bias, bn.eps)
        >>> torch.allclose(out, bn.train()(x), atol=1e-6)     # the output of training mode
        True
    """
    _reached(target, tally)
    channels = target.num_channels
    n = input.numel() // channels if input.dim() >= 2 else 0
    if n <= 1:  # one value per channel: training mode cannot normalize it
        if n == 1 and target.pool_single and input.dim() >= 2:
            _pool(target, tally, input)
        else:
            target.skipped += 1
        return F.batch_norm(input, target.running_mean, target.running_var, weight, bias, False, 0.0, eps)
    dtype = _float_params(input.dtype)
    weight, bias = _cast(weight, dtype), _cast(bias, dtype)
    if input.device.type == "cpu" and (input.numel() < SMALL or input.is_contiguous()):
        row, _, _ = target.slot(input.device, torch.float64)
        small = input.numel() < SMALL
        if small:
            out = small_statistics(input, weight, bias, eps, row, dtype)
        else:
            out = plane_statistics(input, weight, bias, eps, row, dtype, target.scratch)
        target.commit(n, tally.batch, unbiased=small)
        return out
    _, row_mean, row_var = target.slot(input.device, dtype)
    out = torch.batch_norm(input, weight, bias, row_mean, row_var, True, 1.0, eps, torch.backends.cudnn.enabled)
    target.commit(n, tally.batch, unbiased=True)
    return out


def observe_instance_norm(target: NormTarget, tally: Tally, input: Tensor, weight: Tensor | None,
                          bias: Tensor | None, eps: float) -> Tensor:
    """Answer an ``instance_norm`` call of ``target``: normalize every instance by itself and pool
    every element of ``input`` (N, C, ...) per channel (exact, float64).

    Example:
        >>> norm = nn.InstanceNorm1d(2, track_running_stats=True)
        >>> target = NormTarget.for_module("in", norm)
        >>> _ = observe_instance_norm(target, Tally(), torch.randn(3, 2, 5), None, None, 1e-5)
        >>> target.count, target.updates
        (15, 1)
    """
    _reached(target, tally)
    if input.dim() < 3 or math.prod(input.shape[2:]) <= 1:  # one value per instance and channel
        target.skipped += 1
        return F.instance_norm(input, target.running_mean, target.running_var, weight, bias, False, 0.0, eps)
    _pool(target, tally, input)
    return F.instance_norm(input, None, None, weight, bias, True, 0.0, eps)
