"""Where one batch-norm call site can fold, or why it cannot: the rules the planner applies.

A batch norm with constant statistics is a per-channel affine map ``y = scale * x + shift``. It folds
*into its producer* (a conv/linear whose output only this norm reads) or *into its consumer* (a conv
or linear that alone reads the norm's output, where the shift cannot leak into zero padding), when
every reader of every value and weight involved is known: no other user of the value, no write into
the norm's input while the consumer still needs it (after a fold the norm's output *is* its input),
no other read of the layer's weight or of the norm's statistics, no module held outside the module
tree, no hook that would see different values, no parametrized weight, and the norm's channels are
the layer's channels at every rank the tensor between them can have. Anything else is refused with a
reason. The rules about a call site's neighbours are in :mod:`fxnorm.folding.neighbours`;
:mod:`fxnorm.folding.planner` applies them to a whole model.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> sites = fxnorm.find_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    >>> sites[0].fold, sites[0].fold_into
    ('into_producer', '0')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.calls import bind_node
from ..graph.kinds import known_base
from ..graph.readers import is_metadata_query, why_opaque

__all__ = ["Analysis", "NormCall", "Target", "Proposal", "norm_problem", "layer_problem", "crossing_hooks"]


@dataclass(eq=False)
class Analysis:
    """Facts about the whole model that every rule reads (built once per plan)."""

    model: nn.Module
    parts: list[tuple[str, fx.GraphModule]]
    roots: dict[str, nn.Module]  #: part prefix -> the model's own module at that path
    names: dict[int, list[str]]  #: id(module) -> every qualified name it is registered under
    hidden: dict[int, list[str]]  #: id(module) -> where it is held outside the module tree
    #: (id(owner), attr) -> its readers: get_attr nodes, or text for what the tracer computed eagerly
    reads: dict[tuple[int, str], list[Any]] = field(default_factory=dict)
    allow_hooks: bool = False
    global_hooks: list[str] = field(default_factory=list)
    complete: bool = True  #: the whole model is one graph
    #: id(conv/linear subclass) -> [(part prefix, node name)]: the layer-function calls its own forward made
    own_calls: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    own_nodes: set[int] = field(default_factory=set)  #: ids of those call nodes (in the parts' graphs)
    own_forwards: dict[int, str | None] = field(default_factory=dict)  #: id(subclass) -> own_forward_problem

    def name_of(self, module: nn.Module) -> str:
        names = self.names.get(id(module))
        return names[0] if names else f"<{type(module).__name__}>"

    def module_at(self, prefix: str, path: str) -> nn.Module | None:
        """The model's own module at ``path`` inside the part at ``prefix`` (None if there is none)."""
        try:
            return self.roots[prefix].get_submodule(path) if path else self.roots[prefix]
        except (AttributeError, KeyError):
            return None


@dataclass(eq=False)
class NormCall:
    """One call of a batch norm in a graph part."""

    prefix: str
    gm: fx.GraphModule
    node: fx.Node
    kind: str
    name: str  #: qualified name: the norm module, or the module whose forward makes the functional call
    identity: int  #: calls with the same identity are the same norm (module, or running statistics)
    module: nn.Module | None = None  #: the norm module (None for a functional call)
    owner: nn.Module | None = None  #: for a functional call: the module whose forward makes it

    @property
    def key(self) -> tuple[str, str]:
        return self.prefix, self.node.name

    @property
    def rank_kind(self) -> str:
        """The kind whose input ranks apply: a functional call made by a ``BatchNorm2d``/``3d``
        subclass that keeps its base's input-rank check has that base's ranks."""
        found = known_base(self.owner) if self.module is None and self.owner is not None else None
        if found is not None and found[1] in ("BatchNorm2d", "BatchNorm3d"):
            check = getattr(type(self.owner), "_check_input_dim", None)
            if check is getattr(found[0], "_check_input_dim", None) and "_check_input_dim" not in vars(self.owner):
                return found[1]
        return self.kind

    def input(self) -> fx.Node | None:
        if self.module is not None:
            value = self.node.args[0] if self.node.args else None
        else:
            value = (bind_node(self.node) or {}).get("input")
        return value if isinstance(value, fx.Node) else None


Mode = Literal["into_producer", "into_consumer"]


@dataclass(eq=False)
class Target:
    """A layer a fold changes, at one call site, and the part of the norm's channels it takes."""

    layer: nn.Module
    name: str  #: its qualified name
    site: tuple[str, str]  #: its call (part prefix, node name): a call_module node, or its own forward's call
    #: ``(start, stop)``: the norm channels this layer produces (one of several concatenated producers)
    channels: tuple[int, int] | None = None
    repeat: int = 1  #: into a Linear after a flatten: each norm channel is this many consecutive input features

    @property
    def how(self) -> tuple[tuple[int, int] | None, int]:
        """What of the norm this target takes (two sites of a layer must take the same)."""
        return self.channels, self.repeat


@dataclass(eq=False)
class Proposal:
    """A fold the rules allow: ``mode`` into ``targets`` (one layer, or the concatenated producers)."""

    mode: Mode
    targets: list[Target]


def layer_problem(an: Analysis, layer: nn.Module, role: str) -> str | None:
    """Why ``layer`` (a conv/linear) cannot take a fold: opaque calls, hidden references, its weight
    or bias read elsewhere (a subclass's own calls of the layer function read them: those count as
    its calls, not as other readers)."""
    name = an.name_of(layer)
    why = why_opaque(layer, allow_hooks=an.allow_hooks)
    if why is not None:
        return f"{role} {name}: {why}"
    if id(layer) in an.hidden:
        return f"{role} {name} is also held outside the module tree ({', '.join(an.hidden[id(layer)][:3])})"
    for attr in ("weight", "bias"):
        readers = [r for r in an.reads.get((id(layer), attr), []) if not _own_read(an, r)]
        if readers:
            return f"the {attr} of {role} {name} is also read by {_readers(readers)}"
    return None


def _own_read(an: Analysis, reader: Any) -> bool:
    """A ``get_attr`` read only by a subclass's own layer-function calls (or for its shape)."""
    return isinstance(reader, fx.Node) and bool(an.own_nodes) and all(
        id(u) in an.own_nodes or is_metadata_query(u, reader) for u in reader.users)


def _readers(readers: list[Any]) -> str:
    return ", ".join(r.name if isinstance(r, fx.Node) else str(r) for r in readers[:3])


def norm_problem(an: Analysis, call: NormCall) -> str | None:
    """Why the norm at ``call`` cannot leave the model even when its neighbours allow it."""
    if an.global_hooks and not an.allow_hooks:
        return f"a {an.global_hooks[0]} is installed: it would see different values (pass allow_hooks=True)"
    if call.module is not None:
        why = why_opaque(call.module, allow_hooks=an.allow_hooks)
        if why is not None:
            return why
        if id(call.module) in an.hidden:
            return f"it is also held outside the module tree ({', '.join(an.hidden[id(call.module)][:3])})"
        for attr in (*call.module._parameters, *call.module._buffers):
            readers = an.reads.get((id(call.module), attr))
            if readers:
                return f"its {attr} is also read by {_readers(readers)}"
        return None
    for value in (bind_node(call.node) or {}).values():
        if isinstance(value, fx.Node) and value.op == "get_attr":
            path, _, attr = str(value.target).rpartition(".")
            owner = an.module_at(call.prefix, path)
            readers = an.reads.get((id(owner), attr), []) if owner is not None else []
            others = [r for r in readers if not isinstance(r, fx.Node)] + [
                u for r in readers if isinstance(r, fx.Node) for u in r.users
                if u is not call.node and (u.op != "call_function" or u.target not in _BATCH_NORMS)]
            if others:
                return f"its constant {value.target} is also read by {_readers(others)}"
    return None


_BATCH_NORMS = (torch.batch_norm, F.batch_norm)


def _callers(node: fx.Node) -> tuple[str, ...]:
    """The modules whose code made ``node`` (for a leaf's call: its callers, not the leaf)."""
    stack = tuple(node.meta.get("fxnorm_stack", ()))
    return stack[:-1] if node.op == "call_module" and stack else stack


def crossing_hooks(an: Analysis, prefix: str, first: fx.Node, second: fx.Node) -> str | None:
    """A module with hooks whose input or output changes when the value between ``first`` and
    ``second`` changes: modules left between them (their output changes) or entered (their input)."""
    if an.allow_hooks:
        return None
    one, two = _callers(first), _callers(second)
    for path in sorted(set(one) ^ set(two)):
        module = an.module_at(prefix, path)
        if module is not None and (module._forward_hooks or module._forward_pre_hooks
                                   or getattr(module, "_forward_hooks_with_kwargs", None)):
            return (f"{an.name_of(module)} has hooks that would see different values once the fold moves work "
                    "across it (pass allow_hooks=True)")
    return None
