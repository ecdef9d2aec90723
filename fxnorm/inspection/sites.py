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

from ..folding.observed import OBSERVED
from ..folding.planner import plan_folds
from ..graph.shapes import record_shapes
from ..graph.kinds import has_running_stats
from ..graph.calls import bind_node, constant_value, qualified_name, scope_name
from ..graph.eager import eager_norms, eager_reason
from ..graph.tracing import LeafModules, graph_parts, is_traced, trace, traced_report

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
    #: how the fold is shown exact (see :class:`fxnorm.FoldedNorm`); None when it does not fold
    evidence: str | None = None

    @property
    def foldable(self) -> bool:
        return self.fold is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _count(t: object) -> int | None:
    """A ``num_batches_tracked`` value (None: no counter, or a tensor with no value on ``meta``)."""
    return int(t) if isinstance(t, torch.Tensor) and not t.is_meta else None


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


def _module_site(gm: fx.GraphModule, prefix: str, name: str, node: fx.Node, module: nn.Module,
                 kind: str) -> NormSite:
    nbt = getattr(module, "num_batches_tracked", None)
    nbt_value = _count(nbt)
    producer, op, ptype = _producer_fields(gm, node)
    stats = has_running_stats(module)
    return NormSite(
        name=name,
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
        producer=producer,
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
    nbt_value = _count(nbt)
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
        nbt_value = _count(nbt)
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

def find_norms(model: nn.Module, *, leaf_modules: LeafModules = (), example_inputs: tuple | None = None,
               allow_hooks: bool = False) -> list[NormSite]:
    """Every normalization layer of ``model``, in graph order, with where it folds or why not.

    The decision is the one :func:`fxnorm.fold` makes (the same planner, the same arguments), so
    what this reports is what ``fold`` does. ``model`` may be any module (traced with
    :func:`fxnorm.trace`, part by part if needed; the model itself is not changed) or the output of
    :func:`fxnorm.trace`. Norms in untraced code are reported with ``op="eager"`` after the graph ones.

    Args:
        model: the model (or a traced model).
        leaf_modules: modules the tracer keeps opaque (classes, qualified names or instances).
        example_inputs: positional arguments of ``model(*example_inputs)``: shapes from them decide
            folds that depend on ranks, and for a model traced part by part a recorded run shows
            which folds eager code cannot disturb (as for :func:`fxnorm.fold`).
        allow_hooks: as for :func:`fxnorm.fold`.

    Raises:
        TraceError: ``model`` is not an ``nn.Module``, or is TorchScript.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
        >>> [(s.name, s.fold or s.reason) for s in find_norms(m)]
        [('1', 'into_producer'), ('3', 'producer _2 (ReLU) is not a conv/linear; consumer the graph output is not a conv or linear')]
    """
    traced = model if is_traced(model) else trace(model, leaf_modules=leaf_modules)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if inputs is not None:
        record_shapes(traced, tuple(inputs))
    plan = plan_folds(model, traced, example_inputs=None if inputs is None else tuple(inputs),
                      allow_hooks=allow_hooks)
    originals = {(prefix, n.name): (gm, n) for prefix, gm in graph_parts(traced) for n in gm.graph.nodes}
    eager = {site.name: site for site in eager_sites(traced)}
    sites: list[NormSite] = []
    for d in plan.decisions:
        if d.call.prefix == OBSERVED:  # a norm no graph holds: its site comes from the module
            site = eager.pop(d.call.name)
        else:
            gm, node = originals[d.call.key]
            module = d.call.module
            site = (_module_site(gm, d.call.prefix, d.call.name, node, module, d.call.kind) if module is not None
                    else _function_site(gm, d.call.prefix, node, d.call.kind, model))
            site.name = d.call.name
        if d.mode is not None:
            site.fold, site.fold_into, site.evidence, site.reason = d.mode, d.layer_name, d.evidence, None
        else:
            site.reason = d.reason
        sites.append(site)
    sites.extend(eager.values())
    return sites
