"""Which modules and functions are normalization layers, and which layers a norm can fold into.

A module is *plain* when its ``forward`` is the one of the torch (or torchvision) class it derives
from: a user subclass that only changes ``__init__`` (torchvision's ``Conv3DSimple``, say) behaves
exactly like its base. A subclass whose ``forward`` differs (a BatchNorm fused with an activation,
for example) is never treated as a plain norm: the tracer goes inside it and fxnorm sees what it
really computes (usually a functional ``batch_norm`` call).

Example:
    >>> import torch.nn as nn
    >>> norm_kind(nn.BatchNorm2d(8))
    'BatchNorm2d'
    >>> is_plain(nn.BatchNorm2d(8))
    True
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BN_KINDS",
    "FUNCTIONAL_NORMS",
    "known_base",
    "norm_kind",
    "is_plain",
    "is_plain_norm",
    "layer_kind",
    "has_running_stats",
    "functional_norm_kind",
    "target_in",
]


def _frozen_bn_type() -> type | None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except Exception:  # torchvision is a dependency, but never let an import break inspection
        return None
    return FrozenBatchNorm2d


@functools.lru_cache(maxsize=None)
def _norm_bases() -> dict[type, str]:
    bases: dict[type, str] = {
        nn.SyncBatchNorm: "SyncBatchNorm",
        nn.BatchNorm1d: "BatchNorm1d",
        nn.BatchNorm2d: "BatchNorm2d",
        nn.BatchNorm3d: "BatchNorm3d",
        nn.InstanceNorm1d: "InstanceNorm1d",
        nn.InstanceNorm2d: "InstanceNorm2d",
        nn.InstanceNorm3d: "InstanceNorm3d",
        nn.GroupNorm: "GroupNorm",
        nn.LayerNorm: "LayerNorm",
        nn.LazyBatchNorm1d: "BatchNorm1d",
        nn.LazyBatchNorm2d: "BatchNorm2d",
        nn.LazyBatchNorm3d: "BatchNorm3d",
        nn.LazyInstanceNorm1d: "InstanceNorm1d",
        nn.LazyInstanceNorm2d: "InstanceNorm2d",
        nn.LazyInstanceNorm3d: "InstanceNorm3d",
    }
    if hasattr(nn, "RMSNorm"):
        bases[nn.RMSNorm] = "RMSNorm"
    frozen = _frozen_bn_type()
    if frozen is not None:
        bases[frozen] = "FrozenBatchNorm2d"
    return bases


@functools.lru_cache(maxsize=None)
def _layer_bases() -> dict[type, str]:
    return {
        nn.Conv1d: "Conv1d",
        nn.Conv2d: "Conv2d",
        nn.Conv3d: "Conv3d",
        nn.ConvTranspose1d: "ConvTranspose1d",
        nn.ConvTranspose2d: "ConvTranspose2d",
        nn.ConvTranspose3d: "ConvTranspose3d",
        nn.Linear: "Linear",
        nn.LazyConv1d: "Conv1d",
        nn.LazyConv2d: "Conv2d",
        nn.LazyConv3d: "Conv3d",
        nn.LazyConvTranspose1d: "ConvTranspose1d",
        nn.LazyConvTranspose2d: "ConvTranspose2d",
        nn.LazyConvTranspose3d: "ConvTranspose3d",
        nn.LazyLinear: "Linear",
    }


@functools.lru_cache(maxsize=None)
def _all_bases() -> dict[type, str]:
    return {**_norm_bases(), **_layer_bases()}


#: Kinds whose eval-mode output is a per-channel affine map of the input (foldable).
BN_KINDS = frozenset(
    {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "FrozenBatchNorm2d", "batch_norm"}
)

#: Functional norms recognised in a graph, by target, with the kind fxnorm reports.
FUNCTIONAL_NORMS: dict[Callable[..., Any], str] = {
    F.batch_norm: "batch_norm",
    torch.batch_norm: "batch_norm",
    F.instance_norm: "instance_norm",
    torch.instance_norm: "instance_norm",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    torch.group_norm: "group_norm",
}
if hasattr(F, "rms_norm"):
    FUNCTIONAL_NORMS[F.rms_norm] = "rms_norm"


def known_base(module: nn.Module) -> tuple[type, str] | None:
    """The most specific known norm or conv/linear class ``module`` derives from, with its kind.

    Example:
        >>> known_base(nn.LazyBatchNorm2d())[1]
        'BatchNorm2d'
    """
    table = _all_bases()
    for cls in type(module).__mro__:
        if cls in table:
            return cls, table[cls]
    return None


def norm_kind(module: nn.Module) -> str | None:
    """The norm kind of ``module`` (``"BatchNorm2d"``, ``"LayerNorm"``...), or ``None``.

    Subclasses report their base's kind; whether they behave like it is :func:`is_plain`.

    Example:
        >>> norm_kind(nn.GroupNorm(2, 8)), norm_kind(nn.ReLU())
        ('GroupNorm', None)
    """
    base = known_base(module)
    if base is None or base[0] not in _norm_bases():
        return None
    return base[1]


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a conv/linear layer a norm can fold into (``"Conv2d"``...), or ``None``.

    Example:
        >>> layer_kind(nn.ConvTranspose2d(4, 4, 3))
        'ConvTranspose2d'
    """
    base = known_base(module)
    if base is None or base[0] not in _layer_bases():
        return None
    return base[1]


def is_plain(module: nn.Module) -> bool:
    """True when ``module`` is a known norm/conv/linear whose ``forward`` is its base class's (and
    not replaced on the instance: ``module.forward = ...`` makes it opaque).

    Example:
        >>> class BNReLU(nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return super().forward(x).relu()
        >>> is_plain(nn.BatchNorm2d(4)), is_plain(BNReLU(4))
        (True, False)
    """
    base = known_base(module)
    if base is None or "forward" in module.__dict__:
        return False
    return getattr(type(module), "forward", None) is getattr(base[0], "forward", None)


def is_plain_norm(module: nn.Module) -> bool:
    """True for a norm module that behaves exactly like its torch/torchvision base.

    Example:
        >>> is_plain_norm(nn.BatchNorm1d(3)), is_plain_norm(nn.Conv2d(1, 1, 1))
        (True, False)
    """
    return norm_kind(module) is not None and is_plain(module)


def has_running_stats(module: nn.Module) -> bool:
    """True when ``module`` holds ``running_mean``/``running_var`` tensors (BN, tracked InstanceNorm).

    Example:
        >>> has_running_stats(nn.BatchNorm2d(2)), has_running_stats(nn.BatchNorm2d(2, track_running_stats=False))
        (True, False)
    """
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def functional_norm_kind(target: Any) -> str | None:
    """The kind of a ``call_function`` target when it is a functional norm, else ``None``.

    Example:
        >>> functional_norm_kind(torch.nn.functional.batch_norm)
        'batch_norm'
    """
    try:
        return FUNCTIONAL_NORMS.get(target)
    except TypeError:  # unhashable target
        return None


def target_in(target: Any, table: Any) -> bool:
    """Whether a graph node's call target is in ``table`` (a set, dict or tuple of functions); an
    unhashable target is in no table.

    Example:
        >>> target_in(torch.cat, {torch.cat}), target_in([], {torch.cat})
        (True, False)
    """
    try:
        return target in table
    except TypeError:  # unhashable target
        return False
