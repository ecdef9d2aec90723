"""Fold the affine part of LayerNorm / RMSNorm / GroupNorm into the layers that alone consume it.

``LayerNorm(x) = n(x) * gamma + beta`` and ``Linear(W, c)(n * gamma + beta) = (W * gamma) n + (W beta + c)``:
when every user of the norm's output is a Linear (or an ``nn.MultiheadAttention`` whose query, key and
value are all that output, its packed input projection being a Linear) called at one site, gamma and
beta move into those layers and the norm loses its affine parameters. Shape queries (``x.shape``,
``x.size()``, ``x.dim()``; see :func:`fxnorm.folding.plan.value_users`) do not count as users: they do not read
the values. Exact up to float rounding.
GroupNorm normalizes over channel dim 1: its affine part folds into (non-transposed) convs, whose
zero padding must not see the shift (so beta must be zero, or the conv pads with no zeros).

This is used by :func:`fxnorm.fold` with ``norm_affine=True``; the folded norms are reported with
mode ``"norm_affine_into_consumer"``. The norm modules stay the same objects (their affine parameters
become None); a functional norm is edited in its module's own forward
(:mod:`fxnorm.folding.forwards`). Hooks, hidden references and other readers of the norm or of its
consumers' weights refuse the fold, as for batch norms.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxnorm import fold
    >>> block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    >>> nn.init.normal_(block[0].weight); nn.init.normal_(block[0].bias)  # doctest: +ELLIPSIS
    Parameter...
    >>> folded = fold(block, norm_affine=True)
    >>> x = torch.randn(2, 3, 8)
    >>> torch.allclose(folded(x), block(x), atol=1e-5), folded[0].elementwise_affine, folded[0].weight
    (True, False, None)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.calls import bind_node, constant_value, describe, node_norm_kind, replace_argument, scope_name
from ..graph.kinds import is_plain, layer_kind
from ..graph.readers import value_users, why_opaque
from ..graph.calls import qualified_name
from .analysis import analyze
from .changes import Changes, new_parameters
from .forwards import GraphProgram, trace_own_forward
from .maths import fold_affine_into_next_linear, fold_bn_into_next_conv
from .plan import Analysis, layer_problem
from .report import FoldedNorm, FoldReport

__all__ = ["fold_norm_affine", "plan_norm_affine", "AffinePlan"]

_LAST_DIM = ("LayerNorm", "RMSNorm", "layer_norm", "rms_norm")
_CHANNEL = ("GroupNorm", "group_norm")


@dataclass
class AffinePlan:
    """How one norm's affine part folds: into ``consumers`` (nodes), or why not (``reason``)."""

    gamma: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    consumers: list[fx.Node] = field(default_factory=list)
    reason: str | None = None


def _affine_params(gm: fx.GraphModule, node: fx.Node, kind: str, module: nn.Module | None) -> tuple | str:
    """(gamma, beta, features) of the norm, or why it has no foldable affine part."""
    if module is not None:
        if not is_plain(module):
            return f"{type(module).__name__} overrides forward()"
        gamma, beta = getattr(module, "weight", None), getattr(module, "bias", None)
        features: int | None
        if kind in _CHANNEL:
            features = int(getattr(module, "num_channels"))
        else:
            shape = tuple(getattr(module, "normalized_shape"))
            if len(shape) != 1:
                return f"normalized_shape {shape} spans several dims; only a last-dim affine folds into a Linear"
            features = shape[0]
    else:
        args = bind_node(node)
        if args is None:
            return f"a functional {kind} call whose arguments fxnorm cannot read"
        values = []
        for key in ("weight", "bias"):
            try:
                values.append(constant_value(gm, args.get(key)))
            except LookupError:
                return f"functional {kind} whose {key} is computed in the graph"
        gamma, beta = values
        if kind in _CHANNEL:
            features = None
        else:
            shape = args["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (list, tuple)) else ()
            if len(shape) != 1 or not isinstance(shape[0], int):
                return f"normalized_shape {shape} is not one constant dim"
            features = shape[0]
    if gamma is None and beta is None:
        return "it has no affine parameters"
    ref = gamma if gamma is not None else beta
    return gamma, beta, features if features is not None else int(ref.numel())  # type: ignore[union-attr]


def _consumer_reason(gm: fx.GraphModule, node: fx.Node, user: fx.Node, channel: bool, beta: Any,
                     features: int, sites: dict[int, list[fx.Node]]) -> str | None:
    if user.op != "call_module":
        return f"{describe(gm, user)} uses its output"
    layer = gm.get_submodule(str(user.target))
    if len(sites.get(id(layer), [])) > 1:
        return f"consumer {user.target} is called at several sites"
    if isinstance(layer, nn.MultiheadAttention) and not channel:
        if type(layer).forward is not nn.MultiheadAttention.forward or not layer._qkv_same_embed_dim:
            return f"consumer {user.target} is a MultiheadAttention with separate q/k/v projections"
        qkv = list(user.args[:3]) + [user.kwargs.get(k) for k in ("query", "key", "value") if k in user.kwargs]
        if len(qkv) != 3 or any(a is not node for a in qkv):
            return f"consumer {user.target} is a MultiheadAttention whose query, key and value differ"
        if any(a is node for a in list(user.args[3:]) + list(user.kwargs.values())):
            return f"consumer {user.target} also reads the norm output as a mask"
        return None if layer.embed_dim == features else f"consumer {user.target} has another width"
    kind = layer_kind(layer)
    if kind is None or not is_plain(layer) or kind.startswith("ConvTranspose"):
        return f"{describe(gm, user)} is not a Linear" + (" or conv" if channel else "")
    if [a for a in user.args[1:]] or user.kwargs or not user.args or user.args[0] is not node:
        return f"consumer {user.target} is not called on the norm output alone"
    if channel != (kind != "Linear"):
        want = "a conv (GroupNorm normalizes channel dim 1)" if channel else "a Linear (the affine is over the last dim)"
        return f"consumer {user.target} is {kind}, not {want}"
    if kind == "Linear":
        return None if layer.in_features == features else f"consumer {user.target} has {layer.in_features} inputs"
    if layer.in_channels != features:
        return f"consumer {user.target} has {layer.in_channels} input channels"
    padding = layer.padding
    pads = any(p != 0 for p in padding) if isinstance(padding, tuple) else padding != "valid"
    if pads and layer.padding_mode == "zeros" and beta is not None and bool(torch.any(beta != 0)):
        return f"consumer {user.target} pads with zeros, which would not see the norm's shift"
    return None


def plan_norm_affine(gm: fx.GraphModule, node: fx.Node, sites: dict[int, list[fx.Node]]) -> AffinePlan | None:
    """Where the affine part of the LayerNorm/RMSNorm/GroupNorm at ``node`` folds (None: not such a norm).

    Example:
        >>> import torch.nn as nn, fxnorm
        >>> from fxnorm.graph.calls import call_sites
        >>> gm = fxnorm.trace(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
        >>> node = [n for n in gm.graph.nodes if n.target == "0"][0]
        >>> [c.target for c in plan_norm_affine(gm, node, call_sites(gm)).consumers]
        ['1']
    """
    found = node_norm_kind(gm, node)
    if found is None or found[0] not in _LAST_DIM + _CHANNEL:
        return None
    kind, module = found
    if module is not None and len(sites.get(id(module), [])) > 1:
        return AffinePlan(reason=f"the {kind} module is called at several sites")
    params = _affine_params(gm, node, kind, module)
    if isinstance(params, str):
        return AffinePlan(reason=params)
    gamma, beta, features = params
    users = value_users(node)
    if not users:
        return AffinePlan(reason="its output is unused")
    for user in users:
        why = _consumer_reason(gm, node, user, kind in _CHANNEL, beta, features, sites)
        if why is not None:
            return AffinePlan(reason=f"affine part not folded: {why}")
    return AffinePlan(gamma, beta, users)


def _without_affine(module: nn.Module, kind: str) -> list[tuple[nn.Module, str, Any]]:
    """The :attr:`Changes.attrs` that turn the norm's affine flag off (its parameters become None)."""
    return [(module, "affine" if kind == "GroupNorm" else "elementwise_affine", False)]


def _new_weights(gm: fx.GraphModule, plan: AffinePlan) -> list[tuple[nn.Module, str, nn.Parameter | None]]:
    """The new parameters of every consumer; nothing assigned."""
    out = []
    for user in plan.consumers:
        layer = gm.get_submodule(str(user.target))
        if isinstance(layer, nn.MultiheadAttention):
            w, b = fold_affine_into_next_linear(getattr(layer, "in_proj_weight").detach(),
                                                _detached(getattr(layer, "in_proj_bias")), plan.gamma, plan.beta)
            out += new_parameters(layer, w, b, ("in_proj_weight", "in_proj_bias"))
        elif layer_kind(layer) == "Linear":
            w, b = fold_affine_into_next_linear(getattr(layer, "weight").detach(), _detached(getattr(layer, "bias")),
                                                plan.gamma, plan.beta)
            out += new_parameters(layer, w, b)
        else:
            c = int(getattr(layer, "in_channels"))
            ref: Any = plan.gamma if plan.gamma is not None else plan.beta
            gamma = plan.gamma if plan.gamma is not None else torch.ones(c, dtype=ref.dtype, device=ref.device)
            beta = plan.beta if plan.beta is not None else torch.zeros(c, dtype=ref.dtype, device=ref.device)
            w, b = fold_bn_into_next_conv(getattr(layer, "weight").detach(), _detached(getattr(layer, "bias")), gamma,
                                          beta, groups=int(getattr(layer, "groups")))
            out += new_parameters(layer, w, b)
    return out


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _functional_change(an: Analysis, prefix: str, gm: fx.GraphModule, node: fx.Node,
                       programs: dict[int, tuple[nn.Module, fx.GraphModule]], changes: Changes) -> str | None:
    """Pass None as the weight and bias of a functional norm in its module's own forward (recorded in
    ``programs``; the rewrite itself is made later; the module's own parameters that nothing reads any
    more go), or say why that forward cannot be rewritten."""
    owner = an.module_at(prefix, str(node.meta.get("fxnorm_scope") or ""))
    if owner is None or owner is an.model:
        return "the model's own forward calls it: fxnorm does not rewrite the root's forward"
    if id(owner) not in programs:
        traced = trace_own_forward(owner)
        if isinstance(traced, str):
            return traced
        programs[id(owner)] = (owner, traced)
    own = programs[id(owner)][1]
    target = (bind_node(node) or {}).get("weight")
    key = id(constant_value(gm, target)) if target is not None else None
    for candidate in own.graph.nodes:
        args = bind_node(candidate) if candidate.op == "call_function" else None
        if args is None or candidate.target is not node.target:
            continue
        weight = args.get("weight")
        if key is not None and weight is not None and id(constant_value(own, weight)) == key:
            owner = programs[id(an.module_at(prefix, str(node.meta.get("fxnorm_scope") or "")))][0]
            for name in ("weight", "bias"):
                if args.get(name) is None:
                    continue
                old = replace_argument(candidate, name, None)
                if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
                    own.graph.erase_node(old)
                    if "." not in str(old.target):
                        changes.deletions.append((owner, str(old.target)))
            return None
    return "its call was not found again when tracing its module's forward alone"


def fold_norm_affine(model: nn.Module, traced: nn.Module, report: FoldReport, *, allow_hooks: bool = False) -> None:
    """Fold the affine part of every LayerNorm/RMSNorm/GroupNorm of ``model`` (traced as ``traced``)
    that folds; update ``report`` (folded norms added, the reason of the others extended). Every new
    weight is computed before anything changes; the norm modules keep their identity (their affine
    parameters become None), functional norms are edited in their module's own forward.

    Example:
        >>> import torch.nn as nn, fxnorm
        >>> model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
        >>> report = FoldReport()
        >>> fold_norm_affine(model, fxnorm.trace(model), report)
        >>> [(f.name, f.into) for f in report.folded], model[0].weight
        ([('0', '1')], None)
    """
    an = analyze(model, traced, allow_hooks=allow_hooks)
    sites: dict[int, list[fx.Node]] = defaultdict(list)
    for _, gm in an.parts:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites[id(gm.get_submodule(str(node.target)))].append(node)
    changes, refused = Changes(), {}
    programs: dict[int, tuple[nn.Module, fx.GraphModule]] = {}
    for prefix, gm in an.parts:
        for node in gm.graph.nodes:
            plan = plan_norm_affine(gm, node, sites)
            if plan is None:
                continue
            kind, module = node_norm_kind(gm, node)  # type: ignore[misc]
            name = qualified_name(prefix, str(node.target) if node.op == "call_module" else scope_name(gm, node))
            why = plan.reason or _readers_problem(an, gm, node, module, plan)
            if why is None and module is None:
                why = _functional_change(an, prefix, gm, node, programs, changes)
            if why is not None:
                refused[name] = why if why.startswith("affine part not folded") else f"affine part not folded: {why}"
                continue
            changes.params += _new_weights(gm, plan)
            if module is not None:
                changes.params += [(module, "weight", None), (module, "bias", None)] if hasattr(module, "bias") else [
                    (module, "weight", None)]
                changes.attrs += _without_affine(module, kind)
            into = ", ".join(an.name_of(gm.get_submodule(str(u.target))) for u in plan.consumers)
            report.folded.append(FoldedNorm(name, kind, "norm_affine_into_consumer", into,
                                            "proven" if an.complete else "unverified"))
    for owner, own in programs.values():
        own.graph.lint()
        changes.forwards.append((owner, an.name_of(owner), GraphProgram.from_graph(own.graph)))
    changes.commit()
    report.forwards += [name for _, name, _ in changes.forwards]
    done = {f.name for f in report.folded}
    report.skipped = [s for s in report.skipped if s.name not in done]
    for s in report.skipped:
        if s.name in refused:
            s.reason = f"{s.reason}; {refused[s.name]}"


def _readers_problem(an: Analysis, gm: fx.GraphModule, node: fx.Node, module: nn.Module | None,
                     plan: AffinePlan) -> str | None:
    """Hooks, hidden references and other readers of the norm or its consumers (see
    :mod:`fxnorm.graph.readers`)."""
    if module is not None:
        why = why_opaque(module, allow_hooks=an.allow_hooks)
        if why is not None:
            return why
        if id(module) in an.hidden:
            return f"it is also held outside the module tree ({', '.join(an.hidden[id(module)][:3])})"
        for attr in ("weight", "bias"):
            if an.reads.get((id(module), attr)):
                return f"its {attr} is also read elsewhere"
    for user in plan.consumers:
        layer = gm.get_submodule(str(user.target))
        why = layer_problem(an, layer, "consumer")
        if why is None and isinstance(layer, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "in_proj_bias"):
                if an.reads.get((id(layer), attr)):
                    why = f"the {attr} of consumer {an.name_of(layer)} is also read elsewhere"
        if why is not None:
            return why
    return None
