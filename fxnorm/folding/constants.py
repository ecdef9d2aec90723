"""What a batch norm computes once its statistics are constant, and on which tensor dim.

- :func:`bn_constants`: the running statistics, eps and affine parameters of an eval-mode batch-norm
  call site (a module or a functional call), or the reason it has none — including health: a
  non-finite statistic or ``running_var + eps <= 0`` is never folded;
- :func:`channel_dims`: which dim of its input a norm (or a layer) treats as channels, for every
  rank it accepts, so that a fold is only planned when the norm's channels are the layer's
  channels at every rank the tensor between them can have.

Example:
    >>> import torch.nn as nn
    >>> channel_dims("BatchNorm1d"), channel_dims("Conv1d")
    ({2: 1, 3: 1}, {2: 0, 3: 1})
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.parameter import is_lazy

from ..graph.calls import bind_node, constant_value, describe_target, node_norm_kind
from ..graph.kinds import BN_KINDS, has_running_stats, is_plain

__all__ = ["BNConstants", "bn_constants", "call_constants", "module_constants", "health_problem", "channel_dims",
           "MAX_RANK"]

#: ranks considered for norms that accept "any rank >= 2"
MAX_RANK = 6


@dataclass
class BNConstants:
    """The constant statistics and affine parameters of an eval-mode batch norm site."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def num_features(self) -> int:
        return int(self.running_mean.numel())


@torch.no_grad()  # its sums become Python numbers: no graph, no warning about parameters that need grad
def health_problem(consts: BNConstants) -> str | None:
    """Why constants cannot be folded (NaN/Inf, ``running_var + eps <= 0``, mismatched lengths), or
    None. Tensors on the ``meta`` device hold no values: they are not checked.

    Example:
        >>> health_problem(BNConstants(torch.zeros(2), torch.tensor([1.0, -1.0]), 0.5, None, None))
        'running_var + eps is not positive in 1 channel(s)'
    """
    tensors = [consts.running_mean, consts.running_var, consts.weight, consts.bias]
    n = consts.num_features
    for label, t in zip(_LABELS, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != n or t.dim() != 1:
            return f"its {label} is not a float vector of {n} values"
    present = [t for t in tensors if t is not None]
    if any(t.is_meta for t in present):
        return None
    if not _all_finite(present):
        for label, t in zip(_LABELS, tensors):
            if t is not None and not bool(torch.isfinite(t).all()):
                return f"NaN/Inf in its {label}: recalibrate or fix the statistics before folding"
    if not consts.eps >= 0:
        return f"eps is {consts.eps}"
    # v + eps <= 0 for some v exactly when it holds for the smallest (rounding keeps the order)
    if n and float(consts.running_var.min()) + consts.eps <= 0:
        bad = int((consts.running_var.double() + consts.eps <= 0).sum())
        return f"running_var + eps is not positive in {bad} channel(s)"
    return None


_LABELS = ("running_mean", "running_var", "weight", "bias")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` (float vectors) is finite, in a few ops: their sum is finite
    only then (a NaN or Inf makes it NaN or Inf); when it is not (or it cannot be taken in one go),
    each tensor is checked, as the sum of finite values may overflow."""
    if len({(t.dtype, t.device) for t in tensors}) == 1 and math.isfinite(float(torch.cat(tensors).sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def module_constants(module: nn.Module, kind: str) -> BNConstants | str:
    """The constants of a batch-norm *module* of ``kind`` (health not checked), or why it has none."""
    if not is_plain(module):
        return f"{type(module).__name__} overrides forward(): fxnorm cannot tell what it computes"
    if any(t is not None and is_lazy(t) for t in (*module._parameters.values(), *module._buffers.values())):
        return "uninitialized lazy module: run one forward before folding"
    if kind not in BN_KINDS and not kind.startswith("InstanceNorm"):
        return f"{kind} normalizes each input with its own statistics; only its affine part can fold"
    if kind != "FrozenBatchNorm2d":
        if not has_running_stats(module):
            return "track_running_stats=False: it always normalizes with batch statistics"
        if module.training:
            return "in training mode: call model.eval() before folding"
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return BNConstants(module.running_mean, module.running_var, float(module.eps), weight, bias)  # type: ignore[arg-type]


def _functional_constants(gm: fx.GraphModule, node: fx.Node) -> BNConstants | str:
    args = bind_node(node)
    if args is None:
        return f"a {describe_target(node.target)} call whose arguments fxnorm cannot read"
    if not isinstance(args["training"], bool) or args["training"]:
        return "functional batch_norm traced in training mode: trace the model in eval mode"
    try:
        values = {key: constant_value(gm, args[key]) for key in ("running_mean", "running_var", "weight", "bias", "eps")}
    except LookupError as err:
        return f"functional batch_norm whose argument {err} is computed in the graph, not constant"
    mean, var = values["running_mean"], values["running_var"]
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return "functional batch_norm without running statistics"
    if not isinstance(values["eps"], (int, float)):
        return "functional batch_norm whose eps is not a number"
    return BNConstants(mean, var, float(values["eps"]), values["weight"], values["bias"])


def bn_constants(gm: fx.GraphModule, node: fx.Node) -> BNConstants | str:
    """The constants of a batch-norm-like call site, or the reason it has none (health included).

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm1d(2).eval()))
        >>> isinstance(bn_constants(gm, list(gm.graph.nodes)[1]), BNConstants)
        True
    """
    found = node_norm_kind(gm, node)
    if found is None:
        return "not a normalization layer"
    return call_constants(gm, node, *found)


def call_constants(gm: fx.GraphModule, node: fx.Node, kind: str, module: nn.Module | None) -> BNConstants | str:
    """:func:`bn_constants` of a norm call whose kind and module (None: a functional call) are known
    (:func:`~fxnorm.graph.calls.node_norm_kind`)."""
    if module is not None:
        consts = module_constants(module, kind)
    elif kind != "batch_norm":
        return f"functional {kind} normalizes each input with its own statistics"
    else:
        consts = _functional_constants(gm, node)
    if isinstance(consts, str):
        return consts
    problem = health_problem(consts)
    return consts if problem is None else problem


_SPATIAL = {"1d": 1, "2d": 2, "3d": 3}


def channel_dims(kind: str) -> dict[int, int | None]:
    """``{rank: channel dim}`` for every input rank a norm kind (or an output rank a layer kind) can
    have: the dim whose index is the channel of the per-channel scale (None: at that rank it runs but
    is not a per-channel map of the same shape).

    Convs accept unbatched input (channels at dim 0); ``BatchNorm2d``/``3d`` check their rank;
    ``BatchNorm1d`` takes 2-D or 3-D input; ``FrozenBatchNorm2d`` broadcasts a ``(1, C, 1, 1)``
    scale, so its channels are at ``rank - 3`` (and below rank 4 its output gains a dim); a Linear's
    features are its last dim.

    Example:
        >>> channel_dims("FrozenBatchNorm2d"), channel_dims("Linear")[3]
        ({2: None, 3: None, 4: 1, 5: 2, 6: 3}, 2)
    """
    if kind == "Linear":
        return {r: r - 1 for r in range(1, MAX_RANK + 1)}
    if kind.startswith(("Conv", "ConvTranspose")) or kind.startswith("InstanceNorm"):
        n = _SPATIAL[kind[-2:]]
        return {n + 1: 0, n + 2: 1}
    if kind in ("BatchNorm2d", "BatchNorm3d"):
        return {_SPATIAL[kind[-2:]] + 2: 1}
    if kind == "BatchNorm1d":
        return {2: 1, 3: 1}
    if kind == "FrozenBatchNorm2d":  # below rank 4 its (1, C, 1, 1) scale adds dims: not a per-channel map
        return {r: (r - 3 if r >= 4 else None) for r in range(2, MAX_RANK + 1)}
    return {r: 1 for r in range(2, MAX_RANK + 1)}  # SyncBatchNorm, functional batch_norm
