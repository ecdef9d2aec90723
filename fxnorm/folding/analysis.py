"""The facts a fold plan is built from: the traced parts of a model and everything that reads or
calls what a fold would change, gathered once (see :class:`fxnorm.folding.plan.Analysis`).

Example:
    >>> import torch.nn as nn, fxnorm
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    >>> an = analyze(model, fxnorm.trace(model))
    >>> an.complete, [prefix for prefix, _ in an.parts], an.name_of(model[1])
    (True, [''], '1')
"""

from __future__ import annotations

from collections import defaultdict

import torch.fx as fx
import torch.nn as nn

from ..graph.calls import (bind_node, constant_value, node_norm_kind, qualified_name, scope_name, submodule,
                           submodule_tables)
from ..graph.kinds import BN_KINDS
from ..graph.readers import attribute_reads, global_hooks, hidden_references, module_names
from ..graph.eager import EAGER_READS
from ..graph.tracing import graph_parts, traced_report
from .own_layers import own_call_owner, own_call_problem
from .plan import Analysis, NormCall

__all__ = ["analyze", "norm_calls", "layer_sites", "FOLDABLE_KINDS"]

#: norm kinds that are a per-channel affine map once their statistics are constant
FOLDABLE_KINDS = BN_KINDS | {"InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"}


def _reads(model: nn.Module, parts: list[tuple[str, fx.GraphModule]],
           roots: dict[str, nn.Module]) -> dict[tuple[int, str], list]:
    """Every read of a module attribute: ``get_attr`` nodes (resolved against the model's own
    modules) and computations the tracer ran eagerly on a tensor (described as text)."""
    reads: dict[tuple[int, str], list] = defaultdict(list)
    owners: dict[int, list[tuple[int, str]]] | None = None  # made when a part computed eagerly
    for prefix, gm in parts:
        for key, nodes in attribute_reads([(prefix, gm)], roots).items():
            reads[key].extend(nodes)
        eager = gm.meta.get(EAGER_READS, {})
        if not eager:
            continue
        owners = _tensor_owners(model) if owners is None else owners
        for tensor_id, functions in eager.items():
            for key in owners.get(tensor_id, ()):
                reads[key].append(f"{functions[0]}() computed while tracing {prefix or 'the model'}")
    return dict(reads)


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """``id(tensor) -> [(id(module), attribute)]``: where each parameter and buffer is registered."""
    owners: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None:
                owners[id(t)].append((id(module), attr))
    return owners


def analyze(model: nn.Module, traced: nn.Module, *, allow_hooks: bool = False) -> Analysis:
    """The :class:`Analysis` of ``model`` (its trace is ``traced``, from :func:`fxnorm.trace`)."""
    parts = list(graph_parts(traced))
    roots = {prefix: (model.get_submodule(prefix) if prefix else model) for prefix, _ in parts}
    an = Analysis(model=model, parts=parts, roots=roots, names=module_names(model),
                  hidden=hidden_references(model), allow_hooks=allow_hooks, global_hooks=global_hooks(),
                  complete=traced_report(traced).complete)
    an.reads = _reads(model, parts, roots)
    _own_calls(an)
    return an


def _own_calls(an: Analysis) -> None:
    """Every call a conv/linear subclass's own forward makes of its layer function with its own weight
    and bias (:mod:`fxnorm.folding.own_layers`): the sites of that layer."""
    calls: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for prefix, gm in an.parts:
        for node in gm.graph.nodes:
            owner = own_call_owner(an.roots[prefix], node)
            if owner is not None and own_call_problem(gm, node, owner, "") is None:
                calls[id(owner)].append((prefix, node.name))
                an.own_nodes.add(id(node))
    an.own_calls = dict(calls)


def _identity(call_module: nn.Module | None, node: fx.Node, running_mean: object) -> int:
    stats = getattr(call_module, "running_mean", None) if call_module is not None else running_mean
    if stats is not None:
        return id(stats)  # a module and a functional call on its buffers are the same norm
    return id(call_module) if call_module is not None else id(node)


def norm_calls(an: Analysis) -> list[NormCall]:
    """Every batch-norm-like call in the parts' graphs, graph order."""
    calls = []
    with submodule_tables():  # faster than get_submodule per node
        for prefix, gm in an.parts:
            for node in gm.graph.nodes:
                found = node_norm_kind(gm, node)
                if found is not None:
                    calls.append(_norm_call(an, prefix, gm, node, *found))
    return calls


def _norm_call(an: Analysis, prefix: str, gm: fx.GraphModule, node: fx.Node, kind: str,
               module: nn.Module | None) -> NormCall:
    if module is not None:
        return NormCall(prefix, gm, node, kind, an.name_of(module), _identity(module, node, None), module=module)
    scope = scope_name(gm, node)
    owner_path = str(node.meta.get("fxnorm_scope") or "")
    try:
        mean = constant_value(gm, (bind_node(node) or {}).get("running_mean"))
    except LookupError:
        mean = None
    return NormCall(prefix, gm, node, kind, qualified_name(prefix, scope), _identity(None, node, mean),
                    owner=an.module_at(prefix, owner_path))


def layer_sites(an: Analysis) -> dict[int, list[tuple[str, str]]]:
    """``call_module`` nodes of every part by module identity: ``id -> [(prefix, node name)]``; for a
    conv/linear subclass traced through, the layer-function calls its own forward made."""
    sites: dict[int, list[tuple[str, str]]] = defaultdict(list)
    with submodule_tables():  # faster than get_submodule per node
        for prefix, gm in an.parts:
            for node in gm.graph.nodes:
                if node.op == "call_module":
                    sites[id(submodule(gm, node.target))].append((prefix, node.name))
    for module_id, calls in an.own_calls.items():
        sites[module_id].extend(calls)
    return dict(sites)
