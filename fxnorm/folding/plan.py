"""Where each norm of a graph can fold, or why it cannot: the single source of truth shared by
:func:`fxnorm.find_norms` (which reports it) and :func:`fxnorm.fold` (which acts on it).

A batch norm with constant statistics is a per-channel affine map ``y = scale * x + shift``. It folds
*into its producer* (a conv/linear whose output feeds only this norm and which is called at this one
site) or *into its consumer* (a conv that reads only this norm's output and pads with something other
than zeros, or a 2-D Linear). Anything else would change the output, so it is refused with a reason.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> gm = fxnorm.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    >>> [plan_norm(gm, n).mode for n in gm.graph.nodes if n.op == "call_module" and n.target == "1"]
    ['into_producer']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parameter import is_lazy

from ..graph.calls import bind_node, call_sites, constant_value, describe, node_norm_kind, value_users
from ..graph.kinds import BN_KINDS, has_running_stats, is_plain, layer_kind

__all__ = ["BNConstants", "FoldPlan", "bn_constants", "plan_norm"]

_SHAPE_KEEPING = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Dropout, nn.Identity, nn.BatchNorm1d)


@dataclass
class BNConstants:
    """The constant statistics and affine parameters of an eval-mode batch norm site."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class FoldPlan:
    """Where a norm folds (``mode`` and ``target`` node) or, when ``mode`` is None, why not."""

    mode: str | None  #: "into_producer" | "into_consumer" | None
    target: fx.Node | None = None
    reason: str | None = None


def bn_constants(gm: fx.GraphModule, node: fx.Node) -> BNConstants | str:
    """The constants of a batch-norm-like site, or the reason it does not have constant statistics."""
    found = node_norm_kind(gm, node)
    if found is None:
        return "not a normalization layer"
    kind, module = found
    if module is not None:
        if not is_plain(module):
            return f"{type(module).__name__} overrides forward(): fxnorm cannot tell what it computes"
        if any(is_lazy(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            return "uninitialized lazy module: run one forward before folding"
        if kind not in BN_KINDS and not kind.startswith("InstanceNorm"):
            return f"{kind} normalizes each input with its own statistics; only its affine part can fold"
        if kind == "FrozenBatchNorm2d":
            return BNConstants(module.running_mean, module.running_var, module.eps, module.weight, module.bias)
        if not has_running_stats(module):
            return "track_running_stats=False: it always normalizes with batch statistics"
        if module.training:
            return "in training mode: call model.eval() before folding"
        return BNConstants(module.running_mean, module.running_var, module.eps, module.weight, module.bias)
    if kind != "batch_norm":
        return f"functional {kind} normalizes each input with its own statistics"
    args = bind_node(node)
    if args is None:
        return f"a {getattr(node.target, '__name__', node.target)} call whose arguments fxnorm cannot read"
    if not isinstance(args["training"], bool) or args["training"]:
        return "functional batch_norm traced in training mode: trace the model in eval mode"
    try:
        mean, var = constant_value(gm, args["running_mean"]), constant_value(gm, args["running_var"])
        weight, bias = constant_value(gm, args["weight"]), constant_value(gm, args["bias"])
        eps = constant_value(gm, args["eps"])
    except LookupError as err:
        return f"functional batch_norm whose argument {err} is computed in the graph, not constant"
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return "functional batch_norm without running statistics"
    return BNConstants(mean, var, float(eps), weight, bias)


def _rank(gm: fx.GraphModule, node: Any, depth: int = 0) -> int | None:
    """The tensor rank of a node's output when it is known statically (or recorded by ShapeProp)."""
    if not isinstance(node, fx.Node) or depth > 20:
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start + 1 if end == -1 and isinstance(start, int) and start >= 0 else None
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) > 1:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return len(sizes)
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start + 1 if isinstance(start, int) and start >= 0 and len(node.args) <= 2 else None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Flatten) and module.end_dim == -1 and module.start_dim >= 0:
            return module.start_dim + 1
        if isinstance(module, (nn.Linear, *_SHAPE_KEEPING)) and node.args:
            return _rank(gm, node.args[0], depth + 1)
    if node.op == "call_function" and node.target in (F.relu, torch.relu, F.dropout) and node.args:
        return _rank(gm, node.args[0], depth + 1)
    return None


def _channels(consts: BNConstants) -> int:
    return int(consts.running_mean.numel())


def _producer_plan(gm: fx.GraphModule, node: fx.Node, consts: BNConstants, sites: dict) -> FoldPlan:
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return FoldPlan(None, reason="its input is not a graph value")
    if source.op != "call_module":
        return FoldPlan(None, reason=f"producer {describe(gm, source)} is not a conv/linear")
    layer = gm.get_submodule(str(source.target))
    kind = layer_kind(layer)
    if kind is None:
        return FoldPlan(None, reason=f"producer {describe(gm, source)} is not a conv/linear")
    if not is_plain(layer):
        return FoldPlan(None, reason=f"producer {describe(gm, source)} overrides forward()")
    calls = sites.get(id(layer), [])
    if len(calls) > 1:
        names = ", ".join(n.name for n in calls)
        return FoldPlan(None, reason=f"producer {source.target} is called at {len(calls)} sites ({names})")
    others = [u.name for u in value_users(source) if u is not node]
    if others:
        return FoldPlan(None, reason=f"{source.target} output also used by {', '.join(others)}")
    out = layer.out_features if kind == "Linear" else layer.out_channels
    if out != _channels(consts):
        return FoldPlan(None, reason=f"producer {source.target} has {out} outputs, the norm {_channels(consts)}")
    if kind == "Linear":
        rank = _rank(gm, source)
        if rank != 2:
            why = "unknown" if rank is None else str(rank)
            return FoldPlan(None, reason=f"Linear output rank is {why}, the norm's channels are the Linear's "
                            "features only for 2-D input (pass example_inputs to record shapes)")
    return FoldPlan("into_producer", source)


def _consumer_plan(gm: fx.GraphModule, node: fx.Node, consts: BNConstants, sites: dict) -> FoldPlan:
    users = value_users(node)  # shape queries move to the norm's input, which has the same shape
    if len(users) != 1:
        return FoldPlan(None, reason=f"its output has {len(users)} users")
    user = users[0]
    if user.op != "call_module" or not user.args or user.args[0] is not node:
        return FoldPlan(None, reason=f"consumer {describe(gm, user)} is not a conv")
    layer = gm.get_submodule(str(user.target))
    kind = layer_kind(layer)
    if kind is None or kind.startswith("ConvTranspose") or not is_plain(layer):
        return FoldPlan(None, reason=f"consumer {describe(gm, user)} is not a conv")
    if len(sites.get(id(layer), [])) > 1:
        return FoldPlan(None, reason=f"consumer {user.target} is called at several sites")
    inp = layer.in_features if kind == "Linear" else layer.in_channels
    if inp != _channels(consts):
        return FoldPlan(None, reason=f"consumer {user.target} has {inp} inputs, the norm {_channels(consts)}")
    if kind == "Linear":
        if _rank(gm, node) != 2:
            return FoldPlan(None, reason=f"consumer {user.target} is a Linear and the input rank is not known to be 2")
        return FoldPlan("into_consumer", user)
    padding = layer.padding
    pads = any(p != 0 for p in padding) if isinstance(padding, tuple) else padding != "valid"
    if pads and layer.padding_mode == "zeros":
        shift_zero = consts.bias is None or not bool(torch.any(consts.bias != 0))
        shift_zero = shift_zero and not bool(torch.any(consts.running_mean != 0))
        if not shift_zero:
            return FoldPlan(None, reason=f"consumer {describe(gm, user)} pads with zeros (padding={padding}): "
                            "folding the norm's shift into it would change the border")
    return FoldPlan("into_consumer", user)


def plan_norm(gm: fx.GraphModule, node: fx.Node, sites: dict[int, list[fx.Node]] | None = None) -> FoldPlan:
    """Decide whether the norm at ``node`` folds into its producer, its consumer, or not at all.

    Example:
        >>> import torch.nn as nn, fxnorm
        >>> gm = fxnorm.trace(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU()).eval())
        >>> print(plan_norm(gm, list(gm.graph.nodes)[2]).reason)
        producer _0 (ReLU) is not a conv/linear; consumer _2 (ReLU) is not a conv
    """
    consts = bn_constants(gm, node)
    if isinstance(consts, str):
        return FoldPlan(None, reason=consts)
    sites = call_sites(gm) if sites is None else sites
    first = _producer_plan(gm, node, consts, sites)
    if first.mode is not None:
        return first
    second = _consumer_plan(gm, node, consts, sites)
    if second.mode is not None:
        return second
    return FoldPlan(None, reason=f"{first.reason}; {second.reason}")
