"""The recalibration fast path on CPUs: the batch statistics of a contiguous ``(N, C, ...)`` batch
from per-(sample, channel) sums and sums of squares, then one eval-mode normalization pass. Below
:data:`SMALL` elements the fixed cost of those operations dominates: :func:`small_statistics` takes
the statistics in float64 with one training-mode kernel call instead.

Two contiguous reductions (a sum and a vector norm per plane, into buffers reused from call to call)
and an eval-mode ``batch_norm`` are cheaper than PyTorch's CPU training-mode kernel. Float32 sums of
squares cancel when a channel's mean is large against its spread: their variance error is about
``1e-7 * (1 + mean^2 / var)``. Channels whose mean exceeds ``sqrt(CANCEL)`` standard deviations get
their squares taken about the batch mean instead (:func:`centred_variance`, a cache-sized chunk at
a time, or in a scratch copy of just those channels), which keeps the error near 1e-7.

Example:
    >>> import torch
    >>> x = torch.randn(4, 3, 25) + 1000.0
    >>> mean = x.double().mean((0, 2))
    >>> var = centred_variance(x, mean, x.numel() // 3, torch.float32)
    >>> bool(((var - x.double().var((0, 2), unbiased=False)).abs() / var).max() < 1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CANCEL", "CHUNK", "SMALL", "PlaneScratch", "sum_squares", "centred_variance", "plane_statistics",
           "small_statistics"]

#: squares are taken about the mean for channels with mean^2 > CANCEL * var
CANCEL = 3.0
#: elements per centred chunk (2 MB of float32: cache-resident, few parallel regions)
CHUNK = 1 << 19
#: batches with fewer elements are reduced in float64 by one kernel call (:func:`small_statistics`)
SMALL = 1 << 14


class PlaneScratch:
    """Buffers one norm reuses from call to call: per-(sample, channel) sums and sums of squares
    ``(2, N, C)`` and the batch statistics ``(2, C)`` in the normalization's dtype.

    Example:
        >>> scratch = PlaneScratch()
        >>> both, sums, squares, stats, mean, var = scratch.get(4, 3, torch.device("cpu"), torch.float32)
        >>> tuple(both.shape), scratch.get(4, 3, torch.device("cpu"), torch.float32)[0] is both
        ((2, 4, 3), True)
    """

    def __init__(self) -> None:
        self._buffers: tuple[Tensor, ...] | None = None
        #: the last call had channels whose mean is far from zero: take the squares about the mean at once
        self.centre = False

    def get(self, batch: int, channels: int, device: torch.device,
            dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(sums and squares, sums, squares, statistics, mean, variance)`` for this batch size."""
        found = self._buffers
        if found is None or found[0].shape[1:] != (batch, channels) or found[0].device != device \
                or found[0].dtype != dtype:
            with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode
                both = torch.empty(2, batch, channels, device=device, dtype=dtype)
                stats = torch.empty(2, channels, device=device, dtype=dtype)
            found = self._buffers = (both, *both.unbind(0), stats, *stats.unbind(0))
        return found  # type: ignore[return-value]  # six tensors, as built above


def sum_squares(planes: Tensor, acc: torch.dtype) -> Tensor:
    """Per-channel sum of squares of ``planes`` (N, C, L): per-plane norms in ``acc``, summed in float64.

    Example:
        >>> sum_squares(torch.full((2, 1, 3), 2.0), torch.float32).tolist()
        [24.0]
    """
    return torch.linalg.vector_norm(planes, 2, -1, dtype=acc).square().sum(0, dtype=torch.float64)


def centred_variance(planes: Tensor, mean: Tensor, n: int, acc: torch.dtype, *, writable: bool = False) -> Tensor:
    """Per-channel biased variance of ``planes`` (N, C, L) from squares about ``mean`` rounded to ``acc``.

    ``writable``: ``planes`` is a scratch copy, centred in place. Otherwise the centred copy is made a
    few samples at a time (about :data:`CHUNK` elements), so it stays in cache and the peak memory
    stays near an eval forward's."""
    shift = mean.to(acc)
    delta = mean - shift.double()
    view = shift.view(1, -1, 1)
    if writable:
        squares = sum_squares(planes.sub_(view), acc)
    else:
        step = max(1, CHUNK // max(1, planes[0].numel()))
        squares = torch.zeros_like(mean)
        for chunk in planes.split(step):
            squares += sum_squares(chunk - view, acc)
    return (squares / n - delta.square()).clamp_min_(0)


def plane_statistics(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, row: Tensor,
                     acc: torch.dtype, scratch: PlaneScratch) -> Tensor:
    """Batch norm of a contiguous CPU ``input`` (N, C, ...) with its own batch statistics, which are
    written into ``row`` (float64 ``(2, C)``: mean, biased variance).

    ``acc``: the dtype of the sums and of the normalization (float32, or float64 for float64 input);
    ``weight``/``bias`` must be in it. The squares are summed uncentred, with the cancelling channels
    taken again about their mean, unless the previous call of this ``scratch`` had cancelling
    channels: then they are taken about the batch mean straight away (:attr:`PlaneScratch.centre`),
    which spares the uncentred pass where channel means stay far from zero.

    Example:
        >>> x = torch.randn(4, 3, 5, 5) * 3 + 2
        >>> row = torch.empty(2, 3, dtype=torch.float64)
        >>> out = plane_statistics(x, None, None, 1e-5, row, torch.float32, PlaneScratch())
        >>> expected = torch.batch_norm(x, None, None, None, None, True, 0.0, 1e-5, False)
        >>> torch.allclose(out, expected, atol=1e-5), torch.allclose(row[1], x.double().var((0, 2, 3), correction=0))
        (True, True)
    """
    channels = row.shape[1]
    planes = (input.detach() if input.requires_grad else input).view(input.shape[0], channels, -1)
    n = planes.shape[0] * planes.shape[2]
    both, sums, squares, stats, stat_mean, stat_var = scratch.get(planes.shape[0], channels, input.device, acc)
    mean, var = row.unbind(0)
    torch.sum(planes, -1, dtype=acc, out=sums)
    if scratch.centre:
        torch.sum(sums, 0, dtype=torch.float64, out=mean).div_(n)
        var.copy_(centred_variance(planes, mean, n, acc))
        scratch.centre = bool((mean.square() > var * CANCEL).any())
    else:
        torch.linalg.vector_norm(planes, 2, -1, dtype=acc, out=squares).square_()
        torch.sum(both, 1, dtype=torch.float64, out=row).div_(n)  # mean, mean of squares
        limit = var * (1 / (1 + CANCEL))
        var.addcmul_(mean, mean, value=-1)  # mean of squares - mean^2
        bad = var < limit  # mean^2 > CANCEL * var: cancellation, squares about the mean for these channels
        if bool(bad.any()):
            chosen = bad.nonzero().squeeze(1)
            scratch.centre = True
            if 4 * chosen.numel() <= channels:
                var.index_put_((chosen,), centred_variance(planes.index_select(1, chosen), mean[chosen], n, acc,
                                                           writable=True))
            else:
                var.copy_(centred_variance(planes, mean, n, acc))
    stats.copy_(row)
    return torch.batch_norm(input, weight, bias, stat_mean, stat_var, False, 0.0, eps, False)


def small_statistics(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, row: Tensor,
                     acc: torch.dtype) -> Tensor:
    """Batch norm of a small CPU ``input`` (N, C, ...) with its own batch statistics, taken in float64
    (exact at any offset) by one training-mode kernel call whose ``momentum=1`` writes the batch mean
    and the *unbiased* batch variance into ``row`` (float64 ``(2, C)``); normalized in ``acc``. Two
    kernel calls instead of a dozen small operations.

    Example:
        >>> x = torch.randn(6, 2) + 1e4
        >>> row = torch.zeros(2, 2, dtype=torch.float64)
        >>> _ = small_statistics(x, None, None, 1e-5, row, torch.float32)
        >>> torch.allclose(row[1], x.double().var(0), rtol=1e-12)
        True
    """
    mean, var = row.unbind(0)
    torch.batch_norm(input.detach().to(torch.float64), None, None, mean, var, True, 1.0, 0.0, False)
    n = input.numel() // row.shape[1]
    return torch.batch_norm(input, weight, bias, mean.to(acc), var.to(acc) * ((n - 1) / n), False, 0.0, eps, False)
