"""Exact pooled per-channel statistics for recalibrating batch-norm layers.

After fine-tuning, pruning, folding or weight averaging, a batch-norm layer's
running statistics (a moving average of batch statistics) no longer fit the
model; recalibrating them ("precise BN") measures the *population*: every
element of every calibration batch, per channel.

Why pooled:
    :class:`ChannelMoments` weights every element equally, so a batch with
    ``n_b`` elements per channel weighs ``n_b / n``, and the result is exactly
    the mean and variance of the concatenated data. Averaging per-batch
    statistics with equal weight, as ``torch.optim.swa_utils.update_bn`` does
    (``momentum=None``), is wrong twice over: the mean of the batch variances
    is only the *within*-batch variance and loses the spread of the batch
    means (law of total variance; large when data is unshuffled or batches
    differ), and a short last batch weighs as much as a full one.

Biased vs. unbiased:
    In training mode PyTorch normalizes with the *biased* batch variance
    ``M2 / n`` but stores the *unbiased* ``M2 / (n - 1)`` (i.e. times
    ``n / (n - 1)``) in ``running_var``. :meth:`ChannelMoments.variance`
    returns either; write ``variance(unbiased=True)`` into ``running_var``.

Numerics:
    Float64 totals (count, mean, centred sum of squares M2) are combined with
    Chan et al.'s parallel update, never as E[x^2] - E[x]^2, which cancels
    catastrophically when ``|mean| >> std``. Each batch is reduced by one
    ``torch.var_mean`` of ``x - shift`` (``shift``: the running mean, or a
    first-batch sample), so batch means are not limited by the float32
    resolution of a large offset; for half/bf16 the shift is also the cast.

Example:
    >>> import torch
    >>> from fxnorm.calibration.moments import ChannelMoments
    >>> est = ChannelMoments(3)
    >>> for batch in (torch.randn(8, 3, 4, 4), torch.randn(2, 3, 4, 4)):
    ...     batch_mean, batch_var = est.update(batch)
    >>> est.count, est.mean.dtype, est.variance(unbiased=True).shape
    (160, torch.float64, torch.Size([3]))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CalibrationError

__all__ = ["ChannelMoments", "pooled_moments"]

_MAX_LISTED = 8  # channels named in an error message


def _channel_axis(x: object, channel_dim: int) -> int:
    """Validate a batch and return ``channel_dim`` as a non-negative axis."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise CalibrationError(f"expected a floating-point tensor, got a {kind}")
    if x.dim() < 2:
        raise CalibrationError(f"expected a tensor with at least 2 dims, got shape {tuple(x.shape)}")
    if not -x.dim() <= channel_dim < x.dim():
        raise CalibrationError(f"channel_dim={channel_dim} is out of range for shape {tuple(x.shape)}")
    return channel_dim % x.dim()


class ChannelMoments:
    """Per-channel count, mean and centred sum of squares (M2) of every element seen.

    Accumulated in float64 and merged with Chan et al.'s parallel update
    (numerically stable; no E[x^2]-E[x]^2 cancellation). The count is the
    number of elements per channel (the same for all channels). Totals live on
    ``device`` (default CPU); batches may be on any device.

    Example:
        >>> est = ChannelMoments(2)
        >>> _ = est.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> _ = est.update(torch.tensor([[5.0, 50.0]]))
        >>> est.count, est.mean.tolist(), est.variance().tolist()
        (3, [3.0, 30.0], [2.6666666666666665, 266.6666666666667])
    """

    def __init__(self, num_channels: int, *, device: torch.device | str | None = None) -> None:
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise CalibrationError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.device = torch.device("cpu" if device is None else device)
        self._count = 0
        self._mean = torch.zeros(num_channels, dtype=torch.float64, device=self.device)
        self._m2 = torch.zeros_like(self._mean)

    @property
    def count(self) -> int:
        """Number of elements seen per channel."""
        return self._count

    @property
    def mean(self) -> Tensor:
        """Per-channel mean, float64 (a copy; zeros while ``count == 0``)."""
        return self._mean.clone()

    @property
    def m2(self) -> Tensor:
        """Per-channel centred sum of squares ``sum((x - mean)**2)``, float64 (a copy)."""
        return self._m2.clone()

    def variance(self, *, unbiased: bool = False) -> Tensor:
        """Per-channel variance ``M2 / n``, or ``M2 / (n - 1)`` if ``unbiased`` (for ``running_var``).

        Example:
            >>> est = ChannelMoments(1)
            >>> _ = est.update(torch.tensor([[0.0], [2.0]]))
            >>> est.variance().item(), est.variance(unbiased=True).item()
            (1.0, 2.0)
        """
        needed = 2 if unbiased else 1
        if self._count < needed:
            raise CalibrationError(f"{'unbiased ' if unbiased else ''}variance needs {needed}+ elements per "
                                   f"channel but {self._count} were seen; feed more calibration data")
        return self._m2 / (self._count - 1 if unbiased else self._count)

    def update(self, x: Tensor, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
        """Add every element of ``x`` to the totals; return the batch's ``(mean, biased var)``.

        ``x`` has ``num_channels`` at ``channel_dim`` and any other dims (e.g.
        ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` in any memory format,
        ``(N, C, D, H, W)``). Half/bf16 input is computed in float32, float64 in
        float64; the returned per-channel statistics are in that dtype, on
        ``x``'s device and detached, ready for normalizing the batch. Raises
        :class:`CalibrationError` (totals unchanged) on a wrong shape or channel
        count, an empty batch, or non-finite statistics.

        Example:
            >>> est = ChannelMoments(3)
            >>> mean, var = est.update(torch.ones(4, 3, 2, 2))
            >>> mean.tolist(), var.tolist(), est.count
            ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 16)
        """
        axis = _channel_axis(x, channel_dim)
        if x.shape[axis] != self.num_channels:
            raise CalibrationError(f"expected {self.num_channels} channels at dim {channel_dim}, "
                                   f"got shape {tuple(x.shape)}")
        n = x.numel() // self.num_channels
        if n == 0:
            raise CalibrationError(f"batch of shape {tuple(x.shape)} has no elements")
        x = x.detach()
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._count:
            shift = self._mean.to(device=x.device, dtype=dtype)
        else:  # one sample per channel: within the data's range, so x - shift is well scaled
            shift = x.movedim(axis, 0)[(slice(None),) + (0,) * (x.dim() - 1)].to(dtype)
        shape = [self.num_channels if d == axis else 1 for d in range(x.dim())]
        other = [d for d in range(x.dim()) if d != axis]
        var, mean = torch.var_mean(x - shift.view(shape), dim=other, correction=0)
        bad = ~(torch.isfinite(mean) & torch.isfinite(var))
        if bool(bad.any()):
            channels = bad.nonzero().flatten().tolist()
            listed = ", ".join(map(str, channels[:_MAX_LISTED])) + (", ..." if len(channels) > _MAX_LISTED else "")
            raise CalibrationError(f"batch mean/var of channel(s) {listed} ({len(channels)} of {self.num_channels}) "
                                   f"are NaN/Inf: the input has non-finite values (or values too large for "
                                   f"{dtype}); the statistics were left unchanged")
        mean64 = shift.to(torch.float64) + mean.to(torch.float64)
        self._merge(n, mean64.to(self.device), var.to(self.device, torch.float64) * n)
        return shift + mean, var

    def merge(self, count: int | Tensor, mean: Tensor, m2: Tensor) -> None:
        """Merge precomputed moments: ``count`` elements per channel with ``mean`` and ``m2``.

        Combines estimators or shards exactly. A ``Tensor`` count must hold one value.

        Example:
            >>> a, b = ChannelMoments(3), ChannelMoments(3)
            >>> _ = a.update(torch.randn(5, 3)); _ = b.update(torch.randn(7, 3))
            >>> a.merge(b.count, b.mean, b.m2); a.count
            12
        """
        if isinstance(count, Tensor):
            values = count.detach().flatten().unique()
            if values.numel() != 1:
                raise CalibrationError(f"count must hold a single value, got {count.tolist()}")
            count = values.item()
        if isinstance(count, float) and float(count).is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CalibrationError(f"count must be a non-negative integer, got {count!r}")
        vectors = []
        for name, value in (("mean", mean), ("m2", m2)):
            if not isinstance(value, Tensor) or value.numel() != self.num_channels:
                raise CalibrationError(f"{name} must be a tensor of {self.num_channels} values, got {value!r}")
            vectors.append(value.detach().reshape(-1).to(self.device, torch.float64))
        if not bool(torch.isfinite(torch.cat(vectors)).all() & (vectors[1] >= 0).all()):
            raise CalibrationError("merged mean/m2 must be finite and m2 non-negative")
        self._merge(count, *vectors)

    def _merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Chan et al.'s update with float64 ``mean`` and ``m2`` of ``n`` elements."""
        if n == 0:
            return
        total = self._count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta.square() * (self._count * n / total)
        self._count = total

    def all_reduce(self, group: Any = None) -> None:
        """Replace the local totals by the exact totals over all processes of ``group``.

        A no-op unless ``torch.distributed`` is available and initialized. Call it once, after the
        last update, on every rank (a second call would count the data again). Totals must be on a
        device the backend supports (CPU for gloo, CUDA for NCCL); counts travel as float64 (< 2**53).

        Example:
            >>> est = ChannelMoments(3); _ = est.update(torch.randn(4, 3))
            >>> est.all_reduce(); est.count  # no-op when not running distributed
            4
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        local = torch.cat([self._mean.new_tensor([float(self._count)]), self._mean * self._count])
        dist.all_reduce(local, group=group)
        total = round(local[0].item())
        if total == 0:
            return
        mean = local[1:] / total
        m2 = self._m2 + self._count * (self._mean - mean).square()
        dist.all_reduce(m2, group=group)
        self._count, self._mean, self._m2 = total, mean, m2


def pooled_moments(batches: Iterable[Tensor], channel_dim: int = 1) -> tuple[Tensor, Tensor, int]:
    """Pooled per-channel ``(mean, biased variance, count)`` of all ``batches``, float64.

    Totals stay on the first batch's device. Raises :class:`CalibrationError` if there is no usable batch.

    Example:
        >>> mean, var, n = pooled_moments([torch.zeros(3, 2), torch.full((1, 2), 4.0)])
        >>> mean.tolist(), var.tolist(), n
        ([1.0, 1.0], [3.0, 3.0], 4)
    """
    est: ChannelMoments | None = None
    for batch in batches:
        if est is None:
            est = ChannelMoments(batch.shape[_channel_axis(batch, channel_dim)], device=batch.device)
        est.update(batch, channel_dim)
    if est is None:
        raise CalibrationError("no calibration batches were given")
    return est.mean, est.variance(), est.count
