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

from ..graph.calls import describe, submodule
from ..graph.kinds import is_plain, layer_kind
from ..graph.readers import mutators, value_users, why_opaque
from ..graph.shapes import rank_of
from .chains import cat_inputs, follow_to_norm, is_cat, producer_path, single_users
from .constants import BNConstants, channel_dims
from .heads import consumer_path, follow_to_linear
from .own_layers import own_call_owner, own_call_problem, own_forward_problem
from .plan import Analysis, NormCall, Proposal, Target, crossing_hooks, layer_problem

__all__ = ["layer_at", "producer_plan", "consumer_plan"]


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


def layer_at(an: Analysis, call: NormCall, node: fx.Node, role: str, transposed_ok: bool
             ) -> tuple[nn.Module, str] | str:
    """The conv/linear layer computed at ``node`` and its kind: a plain layer's call, or (producers
    only) the layer-function call of a subclass whose own forward is "pad, then the layer"; else why not."""
    what = "conv/linear" if transposed_ok else "conv or linear"
    gm = call.gm
    if node.op == "call_function" and transposed_ok:
        owner = own_call_owner(an.roots.get(call.prefix, an.model), node)
        if owner is not None:
            name = an.name_of(owner)
            why = own_call_problem(gm, node, owner, f"producer {name}")
            if why is not None:
                return why
            if id(owner) not in an.own_forwards:
                an.own_forwards[id(owner)] = own_forward_problem(owner)
            why = an.own_forwards[id(owner)]
            return (owner, str(layer_kind(owner))) if why is None else f"producer {name}: {why}"
    if node.op != "call_module":
        return f"{role} {describe(gm, node)} is not a {what}"
    layer = submodule(gm, node.target)
    kind = layer_kind(layer)
    if kind is None or (not transposed_ok and kind.startswith("ConvTranspose")):
        return f"{role} {describe(gm, node)} is not a {what}"
    if not is_plain(layer):
        return f"{role} {describe(gm, node)} overrides forward()"
    return layer, kind


def _width(layer: nn.Module, kind: str, out: bool) -> int:
    if kind == "Linear":
        return int(getattr(layer, "out_features" if out else "in_features"))
    return int(getattr(layer, "out_channels" if out else "in_channels"))


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _chain_problem(an: Analysis, call: NormCall, chain: list[fx.Node]) -> str | None:
    """Why a module between the norm and its layer (``nn.Flatten``, a pooling module) stops the fold."""
    for node in chain:
        if node.op == "call_module":
            module = submodule(call.gm, node.target)
            why = why_opaque(module, allow_hooks=an.allow_hooks)
            if why is None and id(module) in an.hidden:
                why = f"it is also held outside the module tree ({', '.join(an.hidden[id(module)][:3])})"
            if why is not None:
                return f"{an.name_of(module)} between them: {why}"
    return None


def _site(call: NormCall, node: fx.Node) -> tuple[str, str]:
    return call.prefix, node.name


def producer_plan(an: Analysis, call: NormCall, consts: BNConstants) -> Proposal | str:
    """Fold into the conv/linear whose output the norm reads (through ops that only move elements),
    or into the producers a concatenation joins along the channel dim; or why not."""
    source = call.input()
    if source is None:
        return "its input is not a graph value"
    head, chain = producer_path(call.gm, source)
    if is_cat(head):
        return _cat_plan(an, call, consts, head, chain)
    found = layer_at(an, call, head, "producer", transposed_ok=True)
    if isinstance(found, str):
        return found
    layer, kind = found
    if chain:
        why = single_users([head, *chain], call.node)
    else:
        others = [u.name for u in value_users(head) if u is not call.node]
        why = f"{_label(head)} output also used by {', '.join(others)}" if others else None
    if why is not None:
        return why
    out = _width(layer, kind, out=True)
    if out != consts.num_features:
        return f"producer {_label(head)} has {out} outputs, the norm {consts.num_features}"
    ranks = (follow_to_norm(call.gm, head, chain, channel_dims(kind), channel_dims(call.rank_kind), out) if chain
             else _ranks_agree(call.gm, head, call.rank_kind, kind))
    why = (ranks or layer_problem(an, layer, "producer") or crossing_hooks(an, call.prefix, head, call.node)
           or _chain_problem(an, call, chain))
    if why is not None:
        return why
    return Proposal("into_producer", [Target(layer, an.name_of(layer), _site(call, head))])


def _cat_plan(an: Analysis, call: NormCall, consts: BNConstants, cat: fx.Node, chain: list[fx.Node]) -> Proposal | str:
    """Fold into every producer a concatenation joins, each taking its slice of the norm's channels."""
    tensors, dim = cat_inputs(cat)
    layers = [layer_at(an, call, t, "producer", True) if isinstance(t, fx.Node) else "" for t in tensors]
    if not tensors or any(isinstance(found, str) for found in layers):
        return f"producer {describe(call.gm, cat)} is not a conv/linear"
    if len(set(tensors)) != len(tensors) or not isinstance(dim, int) or isinstance(dim, bool):
        return f"producer {describe(call.gm, cat)} concatenates one value twice, or along a computed dim"
    why = single_users([cat, *chain], call.node)
    for t in tensors:
        others = [u.name for u in value_users(t) if u is not cat]
        why = why or (f"{_label(t)} output also used by {', '.join(others)}" if others else None)
    if why is not None:
        return why
    found = [f for f in layers if not isinstance(f, str)]
    widths = [_width(layer, kind, out=True) for layer, kind in found]
    if sum(widths) != consts.num_features:
        return f"producer {cat.name} concatenates {sum(widths)} channels, the norm has {consts.num_features}"
    dims = [channel_dims(kind) for _, kind in found]
    head_dims = {r: (d if all(other.get(r) == d for other in dims) and -r <= dim < r and dim % r == d else None)
                 for r, d in dims[0].items() if d is not None}
    why = _cat_dim_problem(call, cat, chain, dims, head_dims) or follow_to_norm(
        call.gm, cat, chain, head_dims, channel_dims(call.rank_kind), consts.num_features)
    for t, (layer, _) in zip(tensors, found):
        why = why or layer_problem(an, layer, "producer") or crossing_hooks(an, call.prefix, t, call.node)
    why = why or _chain_problem(an, call, chain)
    if why is not None:
        return why
    targets, start = [], 0
    for t, (layer, _), width in zip(tensors, found, widths):
        targets.append(Target(layer, an.name_of(layer), _site(call, t), channels=(start, start + width)))
        start += width
    return Proposal("into_producer", targets)


def _cat_dim_problem(call: NormCall, cat: fx.Node, chain: list[fx.Node], dims: list[dict[int, int | None]],
                     head_dims: dict[int, int | None]) -> str | None:
    """Why the concatenation may join along another dim than the producers' channel dim: at a rank the
    producers can have (the recorded one, else every rank) that can reach the norm."""
    known = rank_of(call.gm, cat)
    norm_ranks = channel_dims(call.rank_kind)
    for rank, d in dims[0].items():
        if d is None or head_dims.get(rank) is not None or (known is not None and rank != known):
            continue
        if chain or rank in norm_ranks:  # through a chain every rank may reach it
            return (f"producer {cat.name} may join its producers along another dim than their channels (at rank "
                    f"{rank})" + ("" if known is not None else " (pass example_inputs to record shapes)"))
    return None


def _pads_with_zeros(layer: nn.Module) -> bool:
    padding = getattr(layer, "padding", 0)
    pads = any(p != 0 for p in padding) if isinstance(padding, tuple) else padding not in ("valid", 0)
    return bool(pads) and getattr(layer, "padding_mode", "zeros") == "zeros"


def consumer_plan(an: Analysis, call: NormCall, consts: BNConstants) -> Proposal | str:
    """Fold into the conv/linear that alone reads the norm's output (a Linear also after pooling and
    flattening), or why not."""
    found_path = consumer_path(call.gm, call.node)  # shape queries move to the norm's input: it has the same shape
    if isinstance(found_path, str):
        return found_path
    user, chain = found_path
    found = layer_at(an, call, user, "consumer", transposed_ok=False)
    if isinstance(found, str):
        return f"consumer {describe(call.gm, chain[0])} is not a conv or linear" if chain else found
    layer, kind = found
    last = chain[-1] if chain else call.node
    if not user.args or user.args[0] is not last or len(user.args) > 1 or user.kwargs:
        return f"consumer {user.target} is not called on the norm output alone"
    width = _width(layer, kind, out=False)
    repeat: int | str = 1
    if chain and kind != "Linear":
        return f"consumer {describe(call.gm, user)} after {', '.join(n.name for n in chain)} is not a Linear"
    if chain:
        positive = consts.weight is None or (not consts.weight.is_meta and bool((consts.weight > 0).all()))
        repeat = follow_to_linear(call.gm, call.node, chain, channel_dims(call.rank_kind), consts.num_features, width,
                                  positive)
        if isinstance(repeat, str):
            return f"consumer {user.target}: {repeat}"
    elif width != consts.num_features:
        return f"consumer {user.target} has {width} inputs, the norm {consts.num_features}"
    why = None if chain else _ranks_agree(call.gm, call.node, call.rank_kind, kind)
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
    why = (layer_problem(an, layer, "consumer") or crossing_hooks(an, call.prefix, call.node, user)
           or _chain_problem(an, call, chain))
    return why or Proposal("into_consumer", [Target(layer, an.name_of(layer), _site(call, user), repeat=int(repeat))])
