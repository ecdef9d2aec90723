"""The observers :func:`fxnorm.prepare_recalibration` puts in place of normalization layers, and what they gather.

An observer normalizes its input the way the norm does in training mode (with the statistics of
the batch) and records those statistics; it never touches the norm's own buffers. Everything a
norm's observers gather lives in one :class:`NormTarget`; :func:`fxnorm.finish_recalibration` writes it back.

Batch norms on a CPU with contiguous input reduce each batch to per-(sample, channel) sums and sums
of squares (two fast contiguous reductions; squares about the batch mean for channels whose mean is
large against their spread, see :meth:`NormObserver._planes`), pool them in float64 and normalize with
one eval-mode batch-norm pass, written over the input when it is a fresh conv/linear output nothing
else reads. Such a producer is called with its bias minus the observer's :attr:`NormObserver.shift`
(the last batch mean, :class:`fxnorm.calibration.graph_rewrite.ShiftedProducer`), so the sums are centred; the
observer adds the shift back to the mean it records. Elsewhere (CUDA, channels-last...) one ``torch.batch_norm``
call in training mode (cuDNN on GPUs) with ``momentum=1`` writes the batch mean and the unbiased
batch variance into a row of a small scratch table instead of the norm's buffers. Either way the
per-batch statistics wait in that table; every :data:`ROWS` batches (and at the end) it is checked
for NaN/Inf and folded into float64 totals with the exact pooled formula
(:class:`fxnorm.calibration.moments.ChannelMoments`), so the forward pays no per-batch synchronization.
Half/bfloat16 inputs are normalized with float32 statistics.

Instance norms with running statistics normalize each instance by itself, and their population
statistics are pooled per channel over every element (:meth:`ChannelMoments.update`).

Example:
    >>> import torch, torch.nn as nn
    >>> bn = nn.BatchNorm2d(3)
    >>> target = NormTarget.for_module("bn", bn)
    >>> obs = NormObserver(target, Session(), module=bn)
    >>> _ = obs(torch.randn(4, 3, 2, 2) * 2 + 1)
    >>> target.flush(); target.count, bn.running_mean.tolist()   # the norm itself is untouched
    (16, [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import CalibrationError, NonFiniteStatistics
from .fast_path import CANCEL, centred_variance, normalize_in_place, output_hooked
from .moments import ChannelMoments

__all__ = ["ROWS", "Session", "NormTarget", "NormObserver"]

#: Batches whose statistics wait in a target's scratch table before they are merged in float64.
ROWS = 8
_MAX_LISTED = 8


@dataclass(eq=False)
class Session:
    """State shared by the observers of one prepared model (batch counter, failure)."""

    batch: int = -1  #: index of the forward in flight (or the last one)
    num_batches: int = 0  #: forwards through the prepared model
    num_samples: int = 0  #: first-dimension sizes of their inputs, summed
    failed: str | None = None  #: why the gathered statistics cannot be used (set on a failed forward)
    next_order: int = 0

    def order(self) -> int:
        self.next_order += 1
        return self.next_order - 1


def _listed(channels: list[int]) -> str:
    return ", ".join(map(str, channels[:_MAX_LISTED])) + (", ..." if len(channels) > _MAX_LISTED else "")


@dataclass(eq=False)
class NormTarget:
    """One norm whose statistics are being recalibrated, and everything gathered for it."""

    name: str  #: qualified name in the user's model
    kind: str  #: BatchNorm2d, SyncBatchNorm, InstanceNorm2d, batch_norm (functional) ...
    module: nn.Module | None  #: the user's module owning the buffers (None for bare functional buffers)
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    instance: bool = False  #: per-instance normalization (InstanceNorm)
    order: int = -1  #: when it was first reached (for naming the first failing layer)
    calls: int = 0  #: calls seen (one per site per forward)
    updates: int = 0  #: calls whose statistics were used
    skipped: int = 0  #: calls with one value per channel (normalized with the old statistics, not counted)
    moments: ChannelMoments = field(init=False)
    _rows: Tensor | None = field(default=None, init=False, repr=False)
    _sums: tuple[Tensor, ...] | None = field(default=None, init=False, repr=False)
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
        return cls(name, kind, module, module.running_mean, module.running_var,
                   nbt if isinstance(nbt, Tensor) else None, instance=kind.lower().startswith("instance"))

    @property
    def label(self) -> str:
        """The name for messages (the root module has the empty name)."""
        return self.name or f"<{type(self.module).__name__ if self.module is not None else 'model'}>"

    @property
    def num_channels(self) -> int:
        return int(self.running_mean.numel())

    @property
    def count(self) -> int:
        """Elements per channel merged so far (call :meth:`flush` first to include pending rows)."""
        return self.moments.count

    # -- batch-norm fast path ----------------------------------------------------------------
    def slot(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The scratch row ``(2, C)`` for the next batch's statistics, and its mean and variance views."""
        rows = self._rows
        if rows is None or rows.device != device or rows.dtype != dtype:
            self.flush()
            with torch.inference_mode(False):  # a normal tensor: updatable in and out of inference mode
                rows = self._rows = torch.zeros(ROWS, 2, self.num_channels, device=device, dtype=dtype)
                self._views = [(row, *row.unbind(0)) for row in rows.unbind(0)]  # made once: views cost time
        elif len(self._counts) == ROWS:
            self.flush()
        return self._views[len(self._counts)]

    def plane_sums(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """A reusable ``(2, batch, C)`` buffer for per-(sample, channel) sums and sums of squares, its
        two halves, and a reusable ``(2, C)`` buffer in ``dtype`` (statistics for the normalization)."""
        sums = self._sums
        if sums is None or sums[0].shape[1] != batch or sums[0].device != device or sums[0].dtype != dtype:
            with torch.inference_mode(False):
                both = torch.empty(2, batch, self.num_channels, device=device, dtype=dtype)
                stats = torch.empty(2, self.num_channels, device=device, dtype=dtype)
                sums = self._sums = (both, *both.unbind(0), stats, *stats.unbind(0))
        return sums

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
        assert self._rows is not None
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
        if not k:
            return
        bad = self.first_bad()
        if bad is not None:
            raise self.bad_error(bad)
        rows = self._rows
        assert rows is not None
        dev = self.moments.device
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

    # -- instance-norm path -----------------------------------------------------------------
    def update_instances(self, x: Tensor, batch: int) -> None:
        """Pool every element of ``x`` (N, C, ...) per channel."""
        try:
            self.moments.update(x)
        except CalibrationError as err:
            kind = NonFiniteStatistics if "NaN/Inf" in str(err) else CalibrationError
            raise kind(f"batch {batch}: norm '{self.label}': {err}") from None
        self.updates += 1


def _float_params(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class NormObserver(nn.Module):
    """Stands in for a norm during calibration: normalizes with batch statistics and records them.

    ``module`` is the norm it replaces (its weight, bias and eps are read at every call), or None for
    a functional ``batch_norm``/``instance_norm`` call site, whose arguments it receives unchanged.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> obs = NormObserver(NormTarget.for_module("bn", bn), Session(), module=bn)
        >>> x = torch.randn(8, 2)
        >>> torch.allclose(obs(x), bn(x), atol=1e-6)     # the same output as training mode
        True
    """

    def __init__(self, target: NormTarget, session: Session, module: nn.Module | None = None) -> None:
        super().__init__()
        # not registered as submodules: the prepared model must not own (or move, or save) them twice
        self.__dict__["target"] = target
        self.__dict__["session"] = session
        self.__dict__["norm"] = module
        #: set by :func:`fxnorm.prepare_recalibration` when the input is a fresh conv/linear output that nothing else
        #: reads: the normalized output is then written over it (see :meth:`_may_overwrite`)
        self.overwrite_input = False
        self.__dict__["producer"] = None  # the module that made the input (its hooks are checked)
        #: per-channel constant the producer subtracted from this call's input (see
        #: :class:`fxnorm.calibration.graph_rewrite.ShiftedProducer`): the last batch mean, so sums are well centred
        self.__dict__["shift"] = None
        self.shifted = False  # whether the input in flight was shifted (set by the producer, per call)
        self.shiftable = False  # whether the producer can shift (a ShiftedProducer feeds this observer)
        self.__dict__["_empty"] = None  # size-0 outputs for the in-place kernel's unused saved statistics

    def extra_repr(self) -> str:
        return f"{self.target.name!r} ({self.target.kind})"

    def norm_input(self, input: Tensor) -> Tensor:
        """What the norm itself would receive for ``input`` (the call in flight): ``input`` plus the
        shift its producer subtracted, if any. For inspection (e.g. from a forward pre-hook)."""
        if not self.shifted or self.shift is None:
            return input
        return input + self.shift.view(-1, *([1] * (input.dim() - 2))).to(input.dtype)

    def forward(self, input: Tensor, **kwargs: Any) -> Tensor:
        target, session = self.target, self.session
        if target.calls == 0:
            target.order = session.order()
        target.calls += 1
        norm = self.norm
        if norm is not None:
            weight, bias, eps = norm.weight, norm.bias, norm.eps
            mean, var = target.running_mean, target.running_var
        else:
            values = kwargs  # a functional call site: its arguments by F.batch_norm name
            weight, bias, eps = values.get("weight"), values.get("bias"), float(values.get("eps", 1e-5))
            mean, var = values.get("running_mean", target.running_mean), values.get("running_var", target.running_var)
        if target.instance:
            return self._instance(input, weight, bias, eps, mean, var)
        channels = target.num_channels
        n = input.numel() // channels if input.dim() >= 2 else 0
        shift = self.shift if self.shifted else None
        self.shifted = False
        if n <= 1:  # one value per channel: training mode cannot normalize it (PyTorch raises)
            target.skipped += 1
            return F.batch_norm(input, mean if shift is None else mean - shift, var, weight, bias, False, 0.0, eps)
        dtype = _float_params(input.dtype)
        weight, bias = _cast(weight, dtype), _cast(bias, dtype)
        planes = input.device.type == "cpu" and input.is_contiguous()
        if planes:
            out = self._planes(input, weight, bias, eps, n, dtype)
        else:
            _, row_mean, row_var = target.slot(input.device, dtype)
            out = torch.batch_norm(input, weight, bias, row_mean, row_var, True, 1.0, eps,
                                   torch.backends.cudnn.enabled)
        if shift is not None or planes and self.shiftable and input.dtype in (torch.float32, torch.float64):
            _, row_mean, _ = target.slot(input.device, torch.float64 if planes else dtype)
            if shift is None:  # the next batches are shifted by the last batch mean
                with torch.inference_mode(False):
                    self.__dict__["shift"] = row_mean.to(input.dtype, copy=True)
            else:  # statistics of input + shift
                shift.copy_(row_mean.add_(shift))
        target.commit(n, session.batch, unbiased=not planes)
        return out

    def _planes(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, n: int,
                acc: torch.dtype) -> Tensor:
        """CPU, contiguous: per-(sample, channel) sums and sums of squares (two fast contiguous
        reductions into a reused buffer) pooled in float64, then one eval-mode normalization pass,
        written over the input when nothing else reads it (:attr:`overwrite_input`). Cheaper than the
        CPU training kernel, and few small operations per call.

        Uncentred float32 squares cancel: their variance error is about 1e-7 * (1 + mean^2 / var). The
        channels whose mean exceeds sqrt(3) standard deviations get their squares taken about the batch
        mean (a copy of those channels, or of all when they are more than a quarter, made in cache-sized
        chunks), which keeps the error near 1e-7."""
        target = self.target
        planes = (input.detach() if input.requires_grad else input).view(input.shape[0], target.num_channels, -1)
        both, sums, squares, stats, stat_mean, stat_var = target.plane_sums(planes.shape[0], input.device, acc)
        torch.sum(planes, -1, dtype=acc, out=sums)
        torch.linalg.vector_norm(planes, 2, -1, dtype=acc, out=squares).square_()
        row, mean, var = target.slot(input.device, torch.float64)
        torch.sum(both, 1, dtype=torch.float64, out=row).div_(n)  # mean, mean of squares
        limit = var * (1 / (1 + CANCEL))
        var.addcmul_(mean, mean, value=-1)  # mean of squares - mean^2
        bad = var < limit  # mean^2 > CANCEL * var
        if bool(bad.any()):  # cancellation: squares about the mean for these channels
            channels = bad.nonzero().squeeze(1)
            if 4 * channels.numel() <= target.num_channels:
                var.index_put_((channels,), centred_variance(planes.index_select(1, channels), mean[channels], n, acc,
                                                              writable=True))
            else:
                var.copy_(centred_variance(planes, mean, n, acc))
        stats.copy_(row)
        if self.overwrite_input and self._may_overwrite(input):
            empty = self._empty
            if empty is None or empty.dtype != acc or empty.device != input.device:
                with torch.inference_mode(False):
                    empty = self.__dict__["_empty"] = input.new_empty(0, dtype=acc)
            return normalize_in_place(input, weight, bias, stat_mean, stat_var, eps, empty)
        return torch.batch_norm(input, weight, bias, stat_mean, stat_var, False, 0.0, eps, False)

    def _may_overwrite(self, input: Tensor) -> bool:
        """The input can take the output: no autograd, a float dtype the kernel writes exactly, and no
        forward hook that could have kept a reference to the producer's output."""
        return (not input.requires_grad and input.dtype in (torch.float32, torch.float64)
                and not output_hooked(self.producer))

    def _instance(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                  mean: Tensor, var: Tensor) -> Tensor:
        target = self.target
        norm = self.norm
        unbatched = norm is not None and hasattr(norm, "_get_no_batch_dim") and input.dim() == norm._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        if x.dim() < 3 or math.prod(x.shape[2:]) <= 1:  # one value per instance and channel
            target.skipped += 1
            out = F.instance_norm(x, mean, var, weight, bias, False, 0.0, eps)
        else:
            target.update_instances(x, self.session.batch)
            out = F.instance_norm(x, None, None, weight, bias, True, 0.0, eps)
        return out.squeeze(0) if unbatched else out
