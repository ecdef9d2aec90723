"""Where one batch-norm call site can fold: into its producer (a conv/linear whose output only this
norm reads) or into its consumer (a conv or linear that alone reads the norm's output, where the
shift cannot leak into zero padding), with the checks on the neighbours themselves: what they are,
their widths, the ranks between them, their other readers (:func:`fxnorm.folding.plan.layer_problem`)
and hooks. :mod:`fxnorm.folding.planner` calls :func:`producer_plan` and :func:`consumer_plan` for
every norm call.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> sites = fxnorm.find_norms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 1)).eval())
    >>> sites[0].fold, sites[0].fold_into
    ('into_consumer', '1')
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..graph.calls import describe
from ..graph.kinds import is_plain, layer_kind
from ..graph.readers import mutators, value_users
from ..graph.shapes import rank_of
from .constants import BNConstants, channel_dims
from .plan import Analysis, NormCall, Proposal, crossing_hooks, layer_problem

__all__ = ["producer_plan", "consumer_plan"]


def _ranks_agree(gm: fx.GraphModule, value: fx.Node, norm_kind: str, layer_kind_: str) -> str | None:
    """None when the norm's channel dim is the layer's channel dim at every rank ``value`` can have."""
    norm_dims, layer_dims = channel_dims(norm_kind), channel_dims(layer_kind_)
    rank = rank_of(gm, value)
    ranks = [rank] if rank is not None else sorted(set(norm_dims) & set(layer_dims))
    if rank is not None and (rank not in norm_dims or rank not in layer_dims):
        return f"the tensor between them has rank {rank}, which {norm_kind} or {layer_kind_} does not take"
    bad = [r for r in ranks if norm_dims[r] != layer_dims[r]]
    if not ranks or bad:
        if rank is None:
            return (f"the rank of {value.name} is not known and at rank {bad[0] if bad else '?'} the {norm_kind} "
                    f"channels are not the {layer_kind_} channels (pass example_inputs to record shapes)")
        return f"at rank {rank} the {norm_kind} channels (dim {norm_dims[rank]}) are not the {layer_kind_} channels"
    return None


def _plain_layer(gm: fx.GraphModule, node: fx.Node, role: str, transposed_ok: bool) -> tuple[nn.Module, str] | str:
    what = "conv/linear" if transposed_ok else "conv or linear"
    if node.op != "call_module":
        return f"{role} {describe(gm, node)} is not a {what}"
    layer = gm.get_submodule(str(node.target))
    kind = layer_kind(layer)
    if kind is None or (not transposed_ok and kind.startswith("ConvTranspose")):
        return f"{role} {describe(gm, node)} is not a {what}"
    if not is_plain(layer):
        return f"{role} {describe(gm, node)} overrides forward()"
    return layer, kind


def producer_plan(an: Analysis, call: NormCall, consts: BNConstants) -> Proposal | str:
    """Fold into the conv/linear whose output the norm reads, or why not."""
    source = call.input()
    if source is None:
        return "its input is not a graph value"
    found = _plain_layer(call.gm, source, "producer", transposed_ok=True)
    if isinstance(found, str):
        return found
    layer, kind = found
    others = [u.name for u in value_users(source) if u is not call.node]
    if others:
        return f"{source.target} output also used by {', '.join(others)}"
    out = layer.out_features if kind == "Linear" else layer.out_channels
    if out != consts.num_features:
        return f"producer {source.target} has {out} outputs, the norm {consts.num_features}"
    why = (_ranks_agree(call.gm, source, call.rank_kind, kind) or layer_problem(an, layer, "producer")
           or crossing_hooks(an, call.prefix, source, call.node))
    if why is not None:
        return why
    return Proposal("into_producer", source, layer, an.name_of(layer))


def _pads_with_zeros(layer: nn.Module) -> bool:
    padding = getattr(layer, "padding", 0)
    pads = any(p != 0 for p in padding) if isinstance(padding, tuple) else padding not in ("valid", 0)
    return bool(pads) and getattr(layer, "padding_mode", "zeros") == "zeros"


def consumer_plan(an: Analysis, call: NormCall, consts: BNConstants) -> Proposal | str:
    """Fold into the conv/linear that alone reads the norm's output, or why not."""
    users = value_users(call.node)  # shape queries move to the norm's input, which has the same shape
    if len(users) != 1:
        return f"its output has {len(users)} users"
    user = users[0]
    found = _plain_layer(call.gm, user, "consumer", transposed_ok=False)
    if isinstance(found, str):
        return found
    layer, kind = found
    if not user.args or user.args[0] is not call.node or len(user.args) > 1 or user.kwargs:
        return f"consumer {user.target} is not called on the norm output alone"
    width = layer.in_features if kind == "Linear" else layer.in_channels
    if width != consts.num_features:
        return f"consumer {user.target} has {width} inputs, the norm {consts.num_features}"
    why = _ranks_agree(call.gm, call.node, call.rank_kind, kind)
    if why is not None:
        return why
    if kind != "Linear" and _pads_with_zeros(layer):
        shift_free = (consts.bias is None or not bool((consts.bias != 0).any())) and not bool(
            (consts.running_mean != 0).any())
        if not shift_free:
            return (f"consumer {describe(call.gm, user)} pads with zeros (padding={layer.padding}): "
                    "folding the norm's shift into it would change the border")
    source = call.input()
    writers = mutators(call.gm, source) if source is not None else []
    if writers:
        return (f"its input {source.name} may be written in place by {', '.join(w.name for w in writers[:3])} "  # type: ignore[union-attr]
                "(after folding, the consumer would read the written values)")
    why = layer_problem(an, layer, "consumer") or crossing_hooks(an, call.prefix, call.node, user)
    return why or Proposal("into_consumer", user, layer, an.name_of(layer))
