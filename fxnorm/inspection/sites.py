"""Find every normalization layer of a model and describe it: :func:`find_norms` returns data
(:class:`NormSite` dataclasses); rendering lives in :mod:`fxnorm.inspection.render`.

Example:
    >>> import torchvision, fxnorm
    >>> sites = fxnorm.find_norms(torchvision.models.resnet18().eval())
    >>> len(sites), sites[0].kind, sites[0].producer_type, sites[0].fold
    (20, 'BatchNorm2d', 'Conv2d', 'into_producer')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.parameter import is_lazy

from ..folding.plan import plan_norm
from ..graph.calls import bind_node, call_sites, constant_value, node_norm_kind, scope_name
from ..graph.kinds import has_running_stats
from ..graph.tracing import LeafModules, eager_norms, eager_reason, graph_parts, is_traced, qualified_name, trace, traced_report

__all__ = ["NormSite", "find_norms", "health_flags", "eager_sites"]


@dataclass
class NormSite:
    """One normalization layer as seen in the traced graph."""

    name: str  #: qualified name of the norm module in the model
    node: str | None  #: graph node name (None when the norm runs in untraced, eager code)
    graph: str | None  #: qualified name of the GraphModule holding the node ("" = the whole model)
    kind: str  #: BatchNorm2d, FrozenBatchNorm2d, LayerNorm, batch_norm (functional), ...
    op: str  #: call_module, call_function or eager
    module_type: str | None  #: class name of the module (a subclass shows its own name)
    num_features: int | None
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    num_batches_tracked: int | None
    producer: str | None  #: node feeding the norm
    producer_op: str | None  #: placeholder, call_module, call_function, call_method, get_attr
    producer_type: str | None  #: module class or function name of the producer
    consumers: list[str] = field(default_factory=list)
    fold: str | None = None  #: "into_producer", "into_consumer" or None
    fold_into: str | None = None  #: qualified name of the layer it folds into
    reason: str | None = None  #: why it cannot fold (None when it can)
    health: list[str] = field(default_factory=list)  #: problems with its statistics/parameters

    @property
    def foldable(self) -> bool:
        return self.fold is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def health_flags(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_batches_tracked: int | None = None,
) -> list[str]:
    """Problems with a norm's statistics and affine parameters, as short flags.

    Example:
        >>> health_flags(torch.zeros(3), torch.ones(3), 1e-5, num_batches_tracked=0)
        ['statistics never updated']
    """
    flags: list[str] = []
    if any(isinstance(t, torch.Tensor) and is_lazy(t) for t in (running_mean, running_var, weight, bias)):
        return ["uninitialized (lazy module): run one forward first"]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in (running_mean, running_var, weight, bias)):
        return []  # a model built on the meta device has no values to check
    for label, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            flags.append(f"NaN/Inf in {label}")
    if isinstance(running_var, torch.Tensor) and eps is not None:
        low = int((running_var < eps).sum())
        if low:
            flags.append(f"running_var below eps in {low} channel(s)")
    if isinstance(running_mean, torch.Tensor) and isinstance(running_var, torch.Tensor) and not num_batches_tracked:
        if bool((running_mean == 0).all()) and bool((running_var == 1).all()):
            flags.append("statistics never updated")
    return flags


def _producer_fields(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str | None, str | None]:
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None, None, None
    if source.op == "call_module":
        kind = type(gm.get_submodule(str(source.target))).__name__
    elif source.op in ("call_function", "call_method"):
        kind = getattr(source.target, "__name__", str(source.target))
    else:
        kind = source.op
    return source.name, source.op, kind


def _lookup(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        return None


def _module_site(gm: fx.GraphModule, prefix: str, node: fx.Node, module: nn.Module, kind: str) -> NormSite:
    nbt = getattr(module, "num_batches_tracked", None)
    nbt_value = int(nbt) if isinstance(nbt, torch.Tensor) else None
    name, op, ptype = _producer_fields(gm, node)
    stats = has_running_stats(module)
    return NormSite(
        name=qualified_name(prefix, str(node.target)),
        node=node.name,
        graph=prefix,
        kind=kind,
        op="call_module",
        module_type=type(module).__name__,
        num_features=_num_features(module),
        eps=getattr(module, "eps", None),
        momentum=getattr(module, "momentum", None),
        affine=getattr(module, "weight", None) is not None,
        track_running_stats=stats,
        training=module.training if kind != "FrozenBatchNorm2d" else False,
        num_batches_tracked=nbt_value,
        producer=name,
        producer_op=op,
        producer_type=ptype,
        consumers=[u.name for u in node.users],
        health=health_flags(
            getattr(module, "running_mean", None), getattr(module, "running_var", None), getattr(module, "eps", None),
            getattr(module, "weight", None), getattr(module, "bias", None), nbt_value,
        ),
    )


def _num_features(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) > 0:  # 0: lazy, not set
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(torch.Size(shape).numel())
    for attr in ("running_mean", "weight"):  # FrozenBatchNorm2d keeps no num_features
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor) and not is_lazy(t):
            return int(t.numel())
    return None


def _function_site(gm: fx.GraphModule, prefix: str, node: fx.Node, kind: str, root: nn.Module) -> NormSite:
    scope = scope_name(gm, node)
    name, op, ptype = _producer_fields(gm, node)
    values: dict[str, Any] = {}
    if kind == "batch_norm":
        for key, value in (bind_node(node) or {}).items():
            try:
                values[key] = constant_value(gm, value)
            except LookupError:
                values[key] = None
    mean, var = values.get("running_mean"), values.get("running_var")
    weight = values.get("weight")
    owner = _lookup(root, qualified_name(prefix, scope))
    nbt = getattr(owner, "num_batches_tracked", None) if owner is not None else None
    nbt_value = int(nbt) if isinstance(nbt, torch.Tensor) else None
    features = mean if isinstance(mean, torch.Tensor) else weight
    return NormSite(
        name=qualified_name(prefix, scope),
        node=node.name,
        graph=prefix,
        kind=kind,
        op="call_function",
        module_type=type(owner).__name__ if owner is not None else None,
        num_features=int(features.numel()) if isinstance(features, torch.Tensor) else None,
        eps=float(values["eps"]) if isinstance(values.get("eps"), (int, float)) else None,
        momentum=values.get("momentum") if isinstance(values.get("momentum"), (int, float)) else None,
        affine=isinstance(weight, torch.Tensor),
        track_running_stats=isinstance(mean, torch.Tensor),
        training=bool(values.get("training")) if isinstance(values.get("training"), bool) else True,
        num_batches_tracked=nbt_value,
        producer=name,
        producer_op=op,
        producer_type=ptype,
        consumers=[u.name for u in node.users],
        health=health_flags(mean, var, values.get("eps"), weight, values.get("bias"), nbt_value)
        if isinstance(mean, torch.Tensor) else [],
    )


def eager_sites(traced: nn.Module) -> list[NormSite]:
    """The norms of a traced model that run in untraced (eager) code, with why they are not traced.

    Example:
        >>> import torch.nn as nn, fxnorm
        >>> eager_sites(fxnorm.trace(nn.Sequential(nn.BatchNorm1d(2))))
        []
    """
    trace_info = traced_report(traced)
    sites: list[NormSite] = []
    for name, module, kind in eager_norms(traced):
        nbt = getattr(module, "num_batches_tracked", None)
        nbt_value = int(nbt) if isinstance(nbt, torch.Tensor) else None
        sites.append(NormSite(
            name=name, node=None, graph=None, kind=kind, op="eager", module_type=type(module).__name__,
            num_features=_num_features(module), eps=getattr(module, "eps", None),
            momentum=getattr(module, "momentum", None), affine=getattr(module, "weight", None) is not None,
            track_running_stats=has_running_stats(module), training=module.training,
            num_batches_tracked=nbt_value, producer=None, producer_op=None, producer_type=None,
            reason=eager_reason(name, trace_info),
            health=health_flags(getattr(module, "running_mean", None), getattr(module, "running_var", None),
                                getattr(module, "eps", None), getattr(module, "weight", None),
                                getattr(module, "bias", None), nbt_value),
        ))
    return sites

def find_norms(model: nn.Module, *, leaf_modules: LeafModules = ()) -> list[NormSite]:
    """Every normalization layer of ``model``, in graph order, with where it can fold or why not.

    ``model`` may be any module (it is traced with :func:`fxnorm.trace`, part by part if needed; the
    model itself is not changed) or the output of :func:`fxnorm.trace` / any ``GraphModule``. Norms
    in untraced code are reported with ``op="eager"`` after the graph ones.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
        >>> [(s.name, s.fold or s.reason) for s in find_norms(m)]
        [('1', 'into_producer'), ('3', 'producer _2 (ReLU) is not a conv/linear; consumer the graph output is not a conv')]
    """
    traced = model if is_traced(model) else trace(model, leaf_modules=leaf_modules)
    sites: list[NormSite] = []
    for prefix, gm in graph_parts(traced):
        calls = call_sites(gm)
        for node in gm.graph.nodes:
            found = node_norm_kind(gm, node)
            if found is None:
                continue
            kind, module = found
            site = (_module_site(gm, prefix, node, module, kind) if module is not None
                    else _function_site(gm, prefix, node, kind, model))
            plan = plan_norm(gm, node, calls)
            if plan.mode is not None and plan.target is not None:
                site.fold, site.fold_into = plan.mode, qualified_name(prefix, str(plan.target.target))
            else:
                site.reason = plan.reason
            sites.append(site)
    sites.extend(eager_sites(traced))
    return sites
