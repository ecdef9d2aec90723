"""The recalibration fast path on CPUs: per-channel statistics of contiguous ``(N, C, L)`` batches,
eval-mode normalization written in place, producers called with a shifted bias
(:class:`ShiftedProducer`) and residual adds written into a fresh observer output (:func:`add_into`),
with the hook checks that decide when writing in place is safe.

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

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module_mod

__all__ = [
    "CANCEL", "CHUNK", "sum_squares", "centred_variance", "normalize_in_place", "output_hooked", "hooked",
    "autocast_enabled", "ShiftedProducer", "add_into",
]

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


def output_hooked(module: nn.Module | None) -> bool:
    """Whether a forward hook may see (and keep) ``module``'s output: its own forward hooks, or
    global ones (which see every module's output; ``module`` None: only those).

    Example:
        >>> conv = nn.Conv2d(1, 1, 1)
        >>> before = output_hooked(conv)
        >>> handle = conv.register_forward_hook(lambda m, args, out: None)
        >>> before, output_hooked(conv)
        (False, True)
    """
    own = module is not None and bool(module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None))
    return own or bool(getattr(_module_mod, "_global_forward_hooks", None))


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones) that must see its real call."""
    pre = (module._forward_pre_hooks, getattr(_module_mod, "_global_forward_pre_hooks", None))
    return output_hooked(module) or any(pre)


def autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # older torch: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


class ShiftedProducer(nn.Module):
    """Calls a conv/linear whose output only a batch-norm observer reads with its bias minus the
    observer's ``shift`` (the previous batch's mean of that norm's input), so the observer's sums are
    taken about a point near the mean (no float32 cancellation, no recentring pass). The observer
    normalizes the shifted input with its own statistics, which gives the same output, and adds the
    shift back to the mean it records. The shift changes the norm's input only by float32/float64
    rounding of values near the mean. The first batch, a producer with hooks, and reduced-precision
    or autocast runs are not shifted.

    Example:
        >>> from fxnorm.calibration.observers import NormObserver, NormTarget, Session
        >>> conv, bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)
        >>> obs = NormObserver(NormTarget.for_module("bn", bn), Session(), module=bn)
        >>> call = ShiftedProducer(conv, obs)
        >>> x = torch.randn(2, 1, 3, 3)
        >>> torch.equal(call(x), conv(x)), obs.shifted             # no shift before the first batch
        (True, False)
        >>> obs.__dict__["shift"] = torch.tensor([1.0, -2.0])
        >>> torch.allclose(call(x), conv(x) - torch.tensor([1.0, -2.0]).view(1, -1, 1, 1)), obs.shifted
        (True, True)
    """

    def __init__(self, producer: nn.Module, observer: Any) -> None:
        super().__init__()
        self.__dict__["producer"] = producer  # the user's module: not registered a second time
        self.__dict__["observer"] = observer

    def extra_repr(self) -> str:
        return f"{type(self.producer).__name__}, bias shifted for {self.observer.target.name!r}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        producer, observer = self.producer, self.observer
        weight, shift = producer.weight, observer.shift
        # channels must be dim 1 of the output: batched conv input, 2-d linear input
        batched = input.dim() == (2 if isinstance(producer, nn.Linear) else weight.dim())
        if shift is None or not batched or shift.dtype != weight.dtype or shift.device != weight.device \
                or hooked(producer) or autocast_enabled(weight.device.type):
            observer.shifted = False
            return producer(input)
        bias = -shift if producer.bias is None else producer.bias - shift
        observer.shifted = True
        if isinstance(producer, nn.Linear):
            return F.linear(input, weight, bias)
        return producer._conv_forward(input, weight, bias)


def add_into(fresh: Any, other: Any) -> Any:
    """``fresh + other``, computed in place in ``fresh`` when that gives the same result.

    ``fresh`` is an observer's output that nothing else reads: tracing turns ``out += identity``
    into an out-of-place ``add``, and the extra allocation is measurable on CPU.
    """
    if (isinstance(fresh, torch.Tensor) and isinstance(other, torch.Tensor) and fresh.shape == other.shape
            and fresh.dtype == other.dtype and fresh.device == other.device and not fresh.requires_grad
            and not other.requires_grad):
        return fresh.add_(other)
    return fresh + other
