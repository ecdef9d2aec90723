"""Helpers shared by the tests (``tests/`` is on ``sys.path``: ``from helpers import rel_err``).

- :func:`rel_err`, :func:`flatten_outputs`: compare two (nested) outputs in float64;
- :func:`randomize_norms`: random statistics and affine parameters, so that no fold or reset is an
  identity;
- :func:`float64_moments`: the float64 reference of a norm's population statistics;
- :func:`one_thread`: run a block with one intra-op thread (a fixture of the same name is in
  ``conftest.py``).

Example:
    >>> import torch
    >>> mean, var, n = float64_moments([torch.zeros(3, 2), torch.full((1, 2), 4.0)])
    >>> mean.tolist(), var.tolist(), n
    ([1.0, 1.0], [3.0, 3.0], 4)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torchvision

__all__ = ["rel_err", "flatten_outputs", "randomize_norms", "float64_moments", "one_thread"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block (small inputs: faster, and on a loaded two-core machine
    two threads spin-wait on each other; observed: 100x slower forwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def float64_moments(batches: Sequence[torch.Tensor], channel_dim: int = 1,
                    unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, variance (biased unless ``unbiased``) and count of every element of
    ``batches``, in float64 on the CPU, straight from the data: the reference for recalibration."""
    flat = [b.detach().double().cpu().movedim(channel_dim, 0).reshape(b.shape[channel_dim], -1) for b in batches]
    data = torch.cat(flat, dim=1)
    return data.mean(dim=1), data.var(dim=1, correction=1 if unbiased else 0), data.shape[1]


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every normalization layer random statistics and affine parameters (in place).

    Modules with running stats (BatchNorm*, SyncBatchNorm, FrozenBatchNorm2d, tracked InstanceNorm):
    ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2)``, ``weight ~ U(0.5, 1.5)``,
    ``bias ~ N(0, 0.2)``, ``num_batches_tracked = 10``. LayerNorm / GroupNorm / RMSNorm / untracked
    InstanceNorm: affine parameters drawn the same way. Values are drawn on the CPU in float64 from
    one seeded generator, module by module in ``named_modules`` order, then cast to each tensor's dtype
    and device, so the same seed gives the same model anywhere.

    Example:
        >>> bn = randomize_norms(nn.BatchNorm2d(4))
        >>> bool((bn.running_var >= 0.5).all()), int(bn.num_batches_tracked)
        (True, 10)
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, kind: str) -> None:
        shape = t.shape
        if kind == "mean":
            v = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        elif kind == "var":
            v = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        elif kind == "weight":
            v = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            v = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
        t.copy_(v.to(dtype=t.dtype))

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    extra: tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    for module in model.modules():
        if not isinstance(module, norm_types + extra + (frozen,)):
            continue
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            draw(mean, "mean")
            draw(var, "var")
        nbt = getattr(module, "num_batches_tracked", None)
        if isinstance(nbt, torch.Tensor):
            nbt.fill_(10)
        for attr, kind in (("weight", "weight"), ("bias", "bias")):
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor):
                draw(t, kind)
    return model


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a nested output (tuples, lists, dicts, namedtuples), in a deterministic order
    (dict keys in insertion order).

    Example:
        >>> [t.item() for t in flatten_outputs({"a": torch.tensor(1), "b": [torch.tensor(2), None]})]
        [1, 2]
    """
    found: list[torch.Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(out)
    return found


def rel_err(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` over all tensors of two outputs (float64; ``b`` is the reference).

    Raises ValueError when the outputs do not have the same structure and shapes.

    Example:
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    xs, ys = flatten_outputs(a), flatten_outputs(b)
    if len(xs) != len(ys):
        raise ValueError(f"outputs differ in structure: {len(xs)} vs {len(ys)} tensors")
    diff, ref = 0.0, 0.0
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        x64, y64 = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        diff = max(diff, float((x64 - y64).abs().max()))
        ref = max(ref, float(y64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / ref if ref > 0 else math.inf
