"""Per-channel statistics of contiguous ``(N, C, L)`` batches on a CPU, and the in-place eval-mode
normalization: the tensor maths behind the observers' CPU fast path (no modules, no graphs).

Float32 sums of squares cancel when a channel's mean is large against its spread: their variance
error is about ``1e-7 * (1 + mean^2 / var)``. :func:`centred_variance` takes the squares about the
mean instead, a cache-sized chunk at a time (or in place in a scratch copy).

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

__all__ = ["CANCEL", "CHUNK", "sum_squares", "centred_variance", "normalize_in_place"]

#: squares are taken about the mean for channels with mean^2 > CANCEL * var
CANCEL = 3.0
#: elements per centred chunk (2 MB of float32: cache-resident, few parallel regions)
CHUNK = 1 << 19


def sum_squares(planes: Tensor, acc: torch.dtype) -> Tensor:
    """Per-channel sum of squares of ``planes`` (N, C, L): per-plane norms in ``acc``, summed in float64.

    Example:
        >>> sum_squares(torch.full((2, 1, 3), 2.0), torch.float32).tolist()
        [24.0]
    """
    return torch.linalg.vector_norm(planes, 2, -1, dtype=acc).square().sum(0, dtype=torch.float64)


def centred_variance(planes: Tensor, mean: Tensor, n: int, acc: torch.dtype, *, writable: bool = False) -> Tensor:
    """Per-channel biased variance of ``planes`` from squares about ``mean`` rounded to ``acc``.

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
        squares = sum(sum_squares(chunk - view, acc) for chunk in planes.split(step))
    return (squares / n - delta.square()).clamp_min_(0)


def normalize_in_place(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                        eps: float, empty: Tensor | None = None) -> Tensor:
    """Eval-mode batch norm written over ``x`` itself (half the memory traffic of a new output).
    ``empty``: a size-0 tensor for the unused saved statistics (made when not given).

    Example:
        >>> x = torch.randn(2, 3, 4)
        >>> expected = torch.batch_norm(x, None, None, torch.ones(3), torch.full((3,), 4.0), False, 0.0, 0.0, False)
        >>> out = normalize_in_place(x, None, None, torch.ones(3), torch.full((3,), 4.0), 0.0)
        >>> out is x, torch.equal(x, expected)
        (True, True)
    """
    empty = x.new_empty(0) if empty is None else empty
    return torch.ops.aten.native_batch_norm.out(x, weight, bias, mean, var, False, 0.0, eps,
                                                out=x, save_mean=empty, save_invstd=empty)[0]
