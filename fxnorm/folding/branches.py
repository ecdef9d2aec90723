"""Merge parallel summed branches into one conv after folding (``fold(model, merge_branches=True)``):
the re-parameterization of RepVGG-style blocks.

Once its batch norms folded, ``bn_id(x) + bn_a(conv3x3(x)) + bn_b(conv1x1(x))`` is a sum of convs of
one input plus a per-channel affine map of it. Convolution is linear in its kernel, so the sum is one
conv: each kernel is zero-padded (centered) to the largest size, the identity branch becomes a kernel
holding its per-channel scale at the centre tap of each channel, and the biases and shifts add up.
That is exact when every conv branch is a plain ``nn.Conv2d`` with odd square kernel, padding
``k // 2`` with zeros and dilation 1 (so every output position sees the same input window), the
convs share stride, groups and channel counts, and an identity branch (the input itself, a plain
eval-mode ``BatchNorm2d`` with running statistics, a :class:`~fxnorm.folding.modules.ChannelAffine`,
or an ``nn.Identity``) comes with stride 1 and as many output as input channels. Each branch module
must be called only there (in a model that traces as one graph), without hooks or readers of its
tensors elsewhere; anything else between the input and the sum (an activation, a different input)
refuses the merge with the reason.

This is the one change that does not keep the drop-in contract of :func:`fxnorm.fold`: the block's
own forward is rewritten (:func:`fxnorm.folding.forwards.install_forward`; its class is kept) to call
the merged conv alone, the conv that holds the merged kernel gets new ``weight``/``bias`` (and a new
kernel size and padding), and the other branch modules become ``nn.Identity()``. The state_dict
changes accordingly.

Example:
    >>> import torch, torch.nn as nn, fxnorm
    >>> class Rep(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         return self.a(x) + self.b(x) + x
    >>> merged = fxnorm.fold(Rep().eval(), merge_branches=True)
    >>> [(m.block, m.into, m.branches) for m in fxnorm.report_of(merged, fxnorm.FoldReport).merged]
    [('<model>', 'a', ['a', 'b', 'x'])]
    >>> merged.b
    Identity()
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.readers import mutators, why_opaque
from ..graph.tracing import LeafModules, trace
from .analysis import analyze, layer_sites
from .forwards import GraphProgram, install_forward, trace_own_forward
from .maths import bn_scale_shift
from .modules import ChannelAffine
from .plan import Analysis, layer_problem
from .report import MergedBranches

__all__ = ["merge_branches"]

_ADDS = (operator.add, torch.add)


@dataclass
class _Branch:
    """One summand: ``conv`` (a plain Conv2d, maybe inside an ``nn.Sequential`` with ``nn.Identity``),
    or an identity branch with its per-channel ``scale``/``shift`` (None: the input itself)."""

    node: fx.Node
    label: str
    module: nn.Module | None  #: the child the owner calls (None: the input itself)
    conv: nn.Conv2d | None = None
    name_hint: str = ""  #: how the node reads in the block's code
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))


def _summands(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The leaves of the tree of adds under ``root`` (inner adds read only by their parent), and the adds."""
    leaves: list[fx.Node] = []
    adds, todo = [root], [a for a in root.args if isinstance(a, fx.Node)]  # _is_add: both are nodes
    while todo:
        node = todo.pop(0)
        if _is_add(node) and len(node.users) == 1:
            adds.append(node)
            todo = [a for a in node.args if isinstance(a, fx.Node)] + todo
        else:
            leaves.append(node)
    return leaves, adds


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The plain Conv2d a branch computes: the module, or a Sequential of it and nn.Identity()s."""
    if type(module) is nn.Conv2d:
        return module
    if type(module) is nn.Sequential:
        parts = [m for m in module if type(m) is not nn.Identity]
        return parts[0] if len(parts) == 1 and isinstance(parts[0], nn.Conv2d) and type(parts[0]) is nn.Conv2d else None
    return None


def _affine_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str | None:
    """``(scale, shift)`` of an identity branch module; why not; None when it is no identity branch."""
    if type(module) is nn.Identity:
        return None
    if type(module) is ChannelAffine:
        return module.get_buffer("scale"), module.get_buffer("shift")
    if type(module) is nn.BatchNorm2d:
        if module.training or module.running_mean is None or module.running_var is None:
            return "is in training mode or has no running statistics"
        return bn_scale_shift(module.running_mean, module.running_var, module.eps, module.weight, module.bias)
    return "is not a conv, a batch norm, a ChannelAffine or the input"


def _branch(owner_gm: fx.GraphModule, node: fx.Node) -> _Branch | str:
    """What the summand ``node`` computes of its input, or why it is not a branch fxnorm merges."""
    if node.op != "call_module":
        return _Branch(node, node.name, None, name_hint=f"{node.name} ({node.target if node.op == 'call_method' else getattr(node.target, '__name__', node.op)})")
    module = owner_gm.get_submodule(str(node.target))
    label = str(node.target)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return f"branch {label} is not called on one input"
    conv = _conv_of(module)
    if conv is not None:
        return _Branch(node, label, module, conv=conv)
    affine = _affine_of(module)
    if isinstance(affine, str):
        return f"branch {label} ({type(module).__name__}) {affine}"
    if affine is None:
        return _Branch(node, label, module)
    return _Branch(node, label, module, scale=affine[0], shift=affine[1])


def _input_of(b: _Branch) -> fx.Node:
    return b.node if b.module is None else b.node.args[0]  # type: ignore[return-value]


def _conv_problem(convs: list[nn.Conv2d], identity: bool) -> str | None:
    """Why these convs (and an identity branch) are not one conv."""
    for c in convs:
        k = c.kernel_size
        padding = c.padding if isinstance(c.padding, tuple) else None
        if k[0] != k[1] or k[0] % 2 == 0 or padding != (k[0] // 2, k[0] // 2):
            return f"a {k} conv with padding {c.padding} is not centered (odd square kernel, padding k // 2)"
        if c.dilation != (1, 1) or c.padding_mode != "zeros":
            return "a branch conv is dilated or does not pad with zeros"
    first = convs[0]
    same = [(c.stride, c.groups, c.in_channels, c.out_channels) for c in convs]
    if len(set(same)) != 1:
        return f"the branch convs differ in stride, groups or channels ({sorted(set(same))})"
    if identity and (first.stride != (1, 1) or first.in_channels != first.out_channels):
        return "an identity branch needs stride 1 and as many output as input channels"
    return None


def _usage_problem(an: Analysis, sites: dict[int, list], gm: fx.GraphModule, branches: list[_Branch]) -> str | None:
    """Why a branch module cannot change: hooks, another registration, call site or reader, a
    reference outside the module tree. (A container or an fxnorm module the whole-model trace goes
    through has no call site there: it must be registered once and called once by the block.)"""
    if not an.complete:  # a call from untraced code would see the merged kernel
        return "the model does not trace as one graph: untraced code might call the branch modules"
    for b in branches:
        for module in filter(None, (b.module, b.conv)):
            name = an.name_of(module)
            why = why_opaque(module)
            if why is not None:
                return f"branch {name}: {why}"
            calls = len(sites.get(id(module), []))
            if calls > 1 or (calls == 0 and module is b.conv) or len(an.names.get(id(module), ())) != 1:
                return f"branch {name} is called at {calls} sites of the traced model, or registered twice"
            if id(module) in an.hidden:
                return f"branch {name} is also held outside the module tree"
        if b.module is not None and sum(n.op == "call_module" and n.target == b.node.target for n in gm.graph.nodes) != 1:
            return f"branch {b.label} is called more than once by its block"
        if b.conv is not None:
            why = layer_problem(an, b.conv, "branch")
            if why is not None:
                return why
    return None


def _merged_kernel(branches: list[_Branch]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The summed kernel, bias and kernel size (computed in float64 when any tensor is)."""
    convs = [b.conv for b in branches if b.conv is not None]
    size = max(c.kernel_size[0] for c in convs)
    first = convs[0]
    dtype = torch.promote_types(first.weight.dtype, torch.float32)
    weight = torch.zeros(first.out_channels, first.in_channels // first.groups, size, size, dtype=dtype,
                         device=first.weight.device)
    bias = torch.zeros(first.out_channels, dtype=dtype, device=first.weight.device)
    per_group = first.in_channels // first.groups
    for b in branches:
        if b.conv is not None:
            pad = (size - b.conv.kernel_size[0]) // 2
            weight += F.pad(b.conv.weight.detach().to(dtype), [pad] * 4)
            bias += 0 if b.conv.bias is None else b.conv.bias.detach().to(dtype)
            continue
        scale = torch.ones_like(bias) if b.scale is None else b.scale.to(dtype)
        channels = torch.arange(first.out_channels, device=weight.device)
        weight[channels, channels % per_group, size // 2, size // 2] += scale
        bias += 0 if b.shift is None else b.shift.to(dtype)
    return weight.to(first.weight.dtype), bias.to(first.weight.dtype), size


def _plan(an: Analysis, sites: dict[int, list], gm: fx.GraphModule, root: fx.Node) -> tuple | str | None:
    """``(branches, adds)`` of a mergeable sum at ``root``; why not; None when it is no sum of conv branches."""
    leaves, adds = _summands(root)
    found = [_branch(gm, leaf) for leaf in leaves]
    if not any(isinstance(b, _Branch) and b.conv is not None for b in found) or len(leaves) < 2:
        return None
    bad = next((b for b in found if isinstance(b, str)), None)
    if bad is not None:
        return bad
    branches: list[_Branch] = found  # type: ignore[assignment]  # no string left
    inputs = {_input_of(b) for b in branches if b.module is not None}
    if len(inputs) != 1:
        return "the branches read different inputs"
    other = next((b for b in branches if b.module is None and b.node not in inputs), None)
    if other is not None:
        return f"branch {other.name_hint} is not a conv, a batch norm, a ChannelAffine or the input"
    calls = {id(b.node) for b in branches if b.module is not None}  # convs, norms, affines: they write nothing
    writers = [w.name for w in mutators(gm, next(iter(inputs))) if id(w) not in calls]
    if writers:
        return (f"the input may be written in place by {', '.join(writers[:3])} (a traced 'x += y' reads as "
                "'x + y': put the input last in the sum)")
    if any(len(b.node.users) != 1 for b in branches if b.module is not None):
        return "a branch's output is also used outside the sum"
    convs = [b.conv for b in branches if b.conv is not None]
    return (_conv_problem(convs, any(b.conv is None for b in branches))
            or _usage_problem(an, sites, gm, branches) or (branches, adds))


def _apply(owner: nn.Module, gm: fx.GraphModule, adds: list[fx.Node], branches: list[_Branch]) -> str:
    """Merge into the largest conv's module, rewrite the owner's forward, drop the other branches
    (``adds[0]`` is the sum's root)."""
    target = max((b for b in branches if b.conv is not None), key=lambda b: b.conv.kernel_size[0])  # type: ignore[union-attr]
    weight, bias, size = _merged_kernel(branches)
    conv = target.conv
    assert conv is not None  # chosen among the conv branches
    grad = conv.weight.requires_grad
    conv.weight, conv.bias = nn.Parameter(weight, requires_grad=grad), nn.Parameter(bias, requires_grad=grad)
    conv.kernel_size, conv.padding = (size, size), (size // 2, size // 2)
    adds[0].replace_all_uses_with(target.node)
    dead = {id(n) for n in adds} | {id(b.node) for b in branches if b.module is not None and b is not target}
    for node in reversed(list(gm.graph.nodes)):  # users before what they read
        if id(node) in dead:
            assert not node.users, f"{node.name} is still read"  # every reader was in the sum
            gm.graph.erase_node(node)
    gm.graph.lint()
    install_forward(owner, GraphProgram.from_graph(gm.graph))
    for b in branches:
        if b.module is not None and b is not target:
            parent, _, attr = str(b.node.target).rpartition(".")
            setattr(owner.get_submodule(parent) if parent else owner, attr, nn.Identity())
    return str(target.node.target)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with children whose own forward may sum branches (not torch's containers)."""
    return [(name, m) for name, m in model.named_modules() if any(True for _ in m.children())
            and not type(m).__module__.startswith("torch.nn")]


def merge_branches(model: nn.Module, *, leaf_modules: LeafModules = ()) -> list[MergedBranches]:
    """Merge every sum of conv branches of one input in ``model`` (changed in place; see the module
    doc); return what merged, and each sum of conv branches that did not with the reason."""
    an = analyze(model, trace(model, leaf_modules=leaf_modules))
    sites = layer_sites(an)
    out: list[MergedBranches] = []
    for name, owner in _candidates(model):
        gm = trace_own_forward(owner)
        if isinstance(gm, str):
            continue
        roots = [n for n in gm.graph.nodes if _is_add(n) and not all(_is_add(u) for u in n.users)]
        for root in roots:
            found = _plan(an, sites, gm, root)
            if found is None:
                continue
            block = name or "<model>"
            if isinstance(found, str):
                out.append(MergedBranches(block, [], "", found))
                continue
            branches, adds = found
            labels = [b.label for b in branches]
            out.append(MergedBranches(block, labels, _apply(owner, gm, adds, branches)))
    return out
