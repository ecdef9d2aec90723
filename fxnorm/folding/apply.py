"""Fold eval-mode batch norms into neighbouring conv/linear layers: same outputs, fewer ops.

:func:`fold` traces the model with :func:`fxnorm.trace` (part by part when it does not trace as a
whole: every traced part folds), asks :func:`fxnorm.folding.plan.plan_norm` where each norm folds, and
applies the plan until nothing more folds (a fold can enable another: conv -> bn -> bn). Planning
runs on copies of the graphs, so nothing is changed before everything is known: ``strict=True``
raises before touching the model, and a failure never leaves a half-folded model behind.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold(model)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> import fxnorm
    >>> torch.allclose(folded(x), model(x), atol=1e-5), fxnorm.report_of(folded, FoldReport).folded[0].into
    (True, '0')
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.fx as fx
import torch.nn as nn

from .norm_affine import fold_norm_affine
from ..errors import FoldError
from .maths import (
    bn_scale_shift,
    fold_bn_into_conv,
    fold_bn_into_linear,
    fold_bn_into_next_conv,
    fold_bn_into_next_linear,
)
from .copies import copy_sharing_layers, unshare
from .report import FoldedNorm, FoldReport, SkippedNorm
from ..graph.shapes import record_shapes
from ..graph.kinds import BN_KINDS, is_plain, layer_kind, norm_kind
from .plan import bn_constants, plan_norm
from ..graph.calls import node_norm_kind, scope_name
from ..graph.tracing import LeafModules, eager_norms, eager_reason, graph_parts, qualified_name, trace, traced_report
from ..reports import record_report

__all__ = ["Standalone", "fold", "ChannelAffine"]

#: What :func:`fold` does with a batch norm that cannot fold (see its ``standalone`` argument).
Standalone = Literal["keep", "affine"]



class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1): what an unfoldable eval-mode batch norm computes.

    ``scale``/``shift`` are buffers kept in float32 (float64 for a float64 norm); the output has the
    input's dtype. Traceable by ``torch.fx`` (it broadcasts over the last dim of ``x.transpose(1, -1)``).

    Example:
        >>> m = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
        >>> m(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [2.0, 4.0]
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.transpose(1, -1)
        return (t * self.scale.to(x.dtype) + self.shift.to(x.dtype)).transpose(1, -1)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


@dataclass
class _Action:
    """One planned change: fold ``scale``/``shift`` into ``layer`` (or replace the norm by an affine)."""

    name: str
    kind: str
    mode: str
    layer: str  # target inside the GraphModule: the conv/linear, or the new ChannelAffine module
    scale: torch.Tensor
    shift: torch.Tensor


@dataclass
class _PartPlan:
    prefix: str
    gm: fx.GraphModule
    graph: fx.Graph
    actions: list[_Action] = field(default_factory=list)
    erased: set[str] = field(default_factory=set)  # call_module / get_attr targets no longer used
    skipped: list[tuple[SkippedNorm, bool]] = field(default_factory=list)  # (site, has BN-kind)


def _norm_name(gm: fx.GraphModule, prefix: str, node: fx.Node) -> str:
    if node.op == "call_module":
        return qualified_name(prefix, str(node.target))
    return qualified_name(prefix, scope_name(gm, node))


def _graph_sites(graphs: list[tuple[fx.GraphModule, fx.Graph]]) -> dict[int, list[fx.Node]]:
    """call_module nodes of every graph grouped by module identity (a layer shared across parts counts
    all its call sites)."""
    sites: dict[int, list[fx.Node]] = defaultdict(list)
    for gm, graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                sites[id(gm.get_submodule(str(node.target)))].append(node)
    return sites


def _erase_norm(part: _PartPlan, node: fx.Node, replacement: fx.Node) -> None:
    """Route the norm's users to ``replacement`` and erase it with the constants only it used."""
    node.replace_all_uses_with(replacement)
    inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    if node.op == "call_module":
        part.erased.add(str(node.target))
    part.graph.erase_node(node)
    for arg in inputs:
        if not arg.users:
            part.erased.add(str(arg.target))
            part.graph.erase_node(arg)


def _free_name(gm: fx.GraphModule, wanted: str, taken: set[str]) -> str:
    """An attribute name of ``gm`` (no dots) that nothing uses yet."""
    name, i = wanted, 1
    while name in taken or hasattr(gm, name):
        name, i = f"{wanted}_{i}", i + 1
    taken.add(name)
    return name


def _plan_part(part: _PartPlan, sites: dict[int, list[fx.Node]], standalone: str) -> None:
    """Fold on ``part.graph`` (a copy when folding in place) until nothing more folds; record the actions
    (applied to the weights by :func:`_commit`) and what is left, with reasons."""
    gm, graph, reasons = part.gm, part.graph, {}
    norms = [n for n in graph.nodes if node_norm_kind(gm, n) is not None]
    done: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in norms:
            if node in done:
                continue
            plan = plan_norm(gm, node, sites)
            if plan.mode is None or plan.target is None:
                continue
            consts = bn_constants(gm, node)
            if isinstance(consts, str):  # plan_norm only plans norms with constants; never reached
                continue
            try:
                scale, shift = bn_scale_shift(consts.running_mean, consts.running_var, consts.eps,
                                              consts.weight, consts.bias)
            except FoldError as err:
                reasons[node] = str(err)
                continue
            kind = node_norm_kind(gm, node)[0]  # type: ignore[index]
            part.actions.append(_Action(_norm_name(gm, part.prefix, node), kind, plan.mode,
                                        str(plan.target.target), scale, shift))
            source = node.args[0]
            _erase_norm(part, node, plan.target if plan.mode == "into_producer" else source)  # type: ignore[arg-type]
            done.add(node)
            changed = True
    left = []  # reasons first: the affine nodes made below call modules that do not exist yet
    for node in norms:
        found = None if node in done else node_norm_kind(gm, node)
        if found is not None:
            reason = reasons.get(node) or plan_norm(gm, node, sites).reason or "cannot fold"
            left.append((node, found[0], _norm_name(gm, part.prefix, node), reason))
    taken: set[str] = set()
    for node, kind, name, reason in left:
        consts = bn_constants(gm, node)
        if standalone == "affine" and not isinstance(consts, str) and node not in reasons:
            scale, shift = bn_scale_shift(consts.running_mean, consts.running_var, consts.eps,
                                          consts.weight, consts.bias)
            base = str(node.target) if node.op == "call_module" else f"{scope_name(gm, node)}_affine"
            target = base if node.op == "call_module" else _free_name(gm, base.replace(".", "_"), taken)
            part.actions.append(_Action(name, kind, "affine", target, scale, shift))
            with graph.inserting_before(node):
                new = graph.create_node("call_module", target, (node.args[0],))
            new.meta = dict(node.meta)
            _erase_norm(part, node, new)
            part.erased.discard(target)
            continue
        part.skipped.append((SkippedNorm(name, kind, reason), kind in BN_KINDS))


def _new_parameter(old: torch.Tensor | None, value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    grad = old.requires_grad if isinstance(old, torch.Tensor) else like.requires_grad
    return nn.Parameter(value, requires_grad=grad)


def _compute(parts: list[_PartPlan]) -> dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """New (weight, bias) of every layer something folds into, actions applied in order; nothing assigned."""
    pending: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}
    for part in parts:
        for act in part.actions:
            if act.mode == "affine":
                continue
            layer = part.gm.get_submodule(act.layer)
            kind = layer_kind(layer) or ""
            _, w, b = pending.get(id(layer), (layer, layer.weight.detach(), _detached(layer.bias)))
            try:
                if act.mode == "into_producer" and kind == "Linear":
                    w, b = fold_bn_into_linear(w, b, act.scale, act.shift)
                elif act.mode == "into_producer":
                    w, b = fold_bn_into_conv(w, b, act.scale, act.shift, transposed=kind.startswith("ConvTranspose"),
                                             groups=layer.groups)
                elif kind == "Linear":
                    w, b = fold_bn_into_next_linear(w, b, act.scale, act.shift)
                else:
                    w, b = fold_bn_into_next_conv(w, b, act.scale, act.shift, groups=layer.groups)
            except FoldError as err:
                raise FoldError(f"folding {act.name} into {qualified_name(part.prefix, act.layer)} failed: {err}; the model "
                                "was left unchanged") from err
            pending[id(layer)] = (layer, w, b)
    return pending  # type: ignore[return-value]


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _commit(parts: list[_PartPlan]) -> None:
    """Apply the planned actions: new weights, affine modules, the edited graphs; drop unused norms."""
    weights = _compute(parts)
    with torch.no_grad():
        for layer, w, b in weights.values():
            layer.weight = _new_parameter(layer.weight, w, layer.weight)
            layer.bias = _new_parameter(layer.bias, b, layer.weight)
    for part in parts:
        if not part.actions:
            continue
        gm = part.gm
        for act in part.actions:
            if act.mode == "affine":
                gm.add_submodule(act.layer, ChannelAffine(act.scale, act.shift))
        gm.graph = part.graph
        _drop_unused(gm, part.erased)


def _drop_unused(gm: fx.GraphModule, erased: set[str]) -> None:
    """Delete the norms (modules, or the constants of functional norms) that no node uses any more.
    A tensor is only removed from a module that no ``call_module`` node runs (directly or inside an
    ancestor), and a module only when no node refers to it or to anything inside it."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    used = called | {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    prefixes = {p for t in used for p in _ancestors(t)}  # every path some used target lies in or under
    modules = dict(gm.named_modules(remove_duplicate=False))

    def runs(path: str) -> bool:
        return any(a in called for a in _ancestors(path))

    owners: set[str] = set()
    for target in sorted(erased):
        if target in prefixes:
            continue
        if target in modules:
            owners.add(target)
            continue
        owner, _, attr = target.rpartition(".")
        module = modules.get(owner)
        if module is not None and not runs(owner) and (attr in module._buffers or attr in module._parameters):
            delattr(module, attr)
        owners.add(owner)
    for owner in sorted(owners, key=len, reverse=True):
        if owner and owner in modules and owner not in prefixes and not runs(owner):
            gm.delete_submodule(owner)


def _ancestors(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``."""
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _strict_error(sites: list[tuple[str, str, str]]) -> FoldError:
    lines = "\n".join(f"  - {name} ({kind}): {reason}" for name, kind, reason in sites)
    return FoldError(
        f"{len(sites)} batch norm(s) cannot fold exactly (strict=True, nothing was changed):\n{lines}\n"
        "Fix them (model.eval(), leaf_modules=..., example_inputs=...) or pass strict=False to skip them."
    )


def fold(
    model: nn.Module,
    *,
    inplace: bool = False,
    strict: bool = False,
    standalone: Standalone = "keep",
    norm_affine: bool = False,
    example_inputs: tuple | None = None,
    leaf_modules: LeafModules = (),
) -> nn.Module:
    """Fold every eval-mode batch norm of ``model`` that folds exactly into a neighbouring conv/linear.

    Args:
        model: any ``nn.Module`` (BN in eval mode; a BN in training mode is never folded).
        inplace: change ``model``'s own layers (faster, no copy). Use the returned module afterwards:
            ``model`` itself is no longer consistent. By default ``model`` is deep-copied and left as is.
        strict: raise :class:`FoldError` listing every batch norm that cannot fold, before changing
            anything. Otherwise such norms are skipped and reported with the reason.
        standalone: ``"keep"`` leaves unfoldable norms as they are; ``"affine"`` turns each one with
            constant statistics into a :class:`ChannelAffine` (``x * scale + shift``).
        norm_affine: also fold the affine part of LayerNorm/RMSNorm/GroupNorm into the Linear/1x1 conv
            layers that alone consume them (see :mod:`fxnorm.folding.norm_affine`).
        example_inputs: positional arguments of ``model(*example_inputs)``; shapes recorded from one run
            decide folds that depend on ranks (Linear -> BatchNorm1d on 2-D input folds, 3-D does not).
        leaf_modules: modules the tracer keeps opaque (classes, qualified names or instances).

    Returns:
        The folded model (a ``GraphModule``, or the model with its traceable parts as ``GraphModule``).
        ``fxnorm.report_of(folded, FoldReport)`` gives what folded where and what was skipped and why.

    Raises:
        FoldError: bad arguments, ``strict=True`` with norms that cannot fold, or example inputs that do
            not run. ``model`` is unchanged whenever an error is raised.

    Example:
        >>> import torchvision
        >>> folded = fold(torchvision.models.resnet18().eval())
        >>> import fxnorm
        >>> report = fxnorm.report_of(folded, FoldReport)
        >>> len(report.folded), report.skipped
        (20, [])
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"fxnorm.fold expects an nn.Module, got {type(model).__name__}")
    if standalone not in get_args(Standalone):
        raise FoldError(f"standalone must be one of {get_args(Standalone)}, got {standalone!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise FoldError("example_inputs must be a tuple of positional arguments for model(*example_inputs), "
                        f"got {type(example_inputs).__name__}")
    shared: dict[int, torch.Tensor] = {}
    try:
        work = model if inplace else copy_sharing_layers(model, shared)
    except Exception as err:  # deepcopy of arbitrary user objects
        raise FoldError(f"could not copy {type(model).__name__} ({err}); pass inplace=True to fold it in place") from err
    opaque = [(name, kind, type(m).__name__) for name, m in work.named_modules()
              if (kind := norm_kind(m)) in BN_KINDS and not is_plain(m)]
    traced = trace(work, inplace=True, leaf_modules=leaf_modules)
    if example_inputs is not None:
        record_shapes(traced, tuple(example_inputs))
    # Plan on copies of the graphs when folding in place (so that a refusal changes nothing); a
    # private copy of the model is thrown away on failure, its graphs can be edited directly.
    parts = [_PartPlan(prefix, gm, copy.deepcopy(gm.graph) if inplace else gm.graph)
             for prefix, gm in graph_parts(traced)]
    sites = _graph_sites([(p.gm, p.graph) for p in parts])
    for part in parts:
        _plan_part(part, sites, standalone)
    trace_info = traced_report(traced)
    report = FoldReport(untraced=list(trace_info.untraced))
    eager = [(SkippedNorm(name, kind, eager_reason(name, trace_info)), kind in BN_KINDS)
             for name, _, kind in eager_norms(traced)]
    left = [site for part in parts for site in part.skipped] + eager
    seen = {a.name for part in parts for a in part.actions} | {s.name for s, _ in left}
    left += [(SkippedNorm(name, kind, f"{cls} overrides forward() and its traced code calls no batch_norm with "
                          "constant statistics: fxnorm cannot tell what it computes"), True)
             for name, kind, cls in opaque if name not in seen]
    if strict:
        bad = [(s.name, s.kind, s.reason) for s, is_bn in left if is_bn]
        if bad:
            raise _strict_error(bad)
    _commit(parts)
    for part in parts:
        for act in part.actions:
            report.folded.append(FoldedNorm(act.name, act.kind, act.mode, qualified_name(part.prefix, act.layer)))
    report.skipped = [s for s, _ in left]
    if norm_affine:
        fold_norm_affine(traced, report)
    unshare(traced, shared)
    record_report(traced, report)
    return traced
