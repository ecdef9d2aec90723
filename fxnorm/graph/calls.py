"""How the calls fxnorm reads lay out their arguments, and what a graph node calls.

This is the one place that knows where ``weight``, ``running_mean`` or ``groups`` sit in a call of
``F.batch_norm``, ``torch.batch_norm`` (weight and bias come *first* there), ``F.conv2d`` or
``F.conv_transpose2d`` (``groups`` before ``dilation``). Every entry of :data:`LAYOUTS` is tested
against ``inspect.signature`` or the ATen op schema, so a wrong order cannot pass the tests.
``torch.fx.operator_schemas.normalize_function`` is not enough on its own: it is ambiguous for
``F.conv2d`` (two overloads) and knows nothing of modules.

Example:
    >>> import torch, torch.nn.functional as F
    >>> args = bind(torch.batch_norm, ("x", "w", "b", "rm", "rv", False, 0.1, 1e-5, True), {})
    >>> args["weight"], args["running_mean"], args["eps"]
    ('w', 'rm', 1e-05)
    >>> bind(F.batch_norm, ("x", "rm", "rv"), {"eps": 1e-3})["weight"] is None
    True
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kinds import functional_norm_kind, norm_kind

__all__ = [
    "Layout",
    "LAYOUTS",
    "layout_of",
    "bind",
    "bind_node",
    "replace_argument",
    "describe_target",
    "node_norm_kind",
    "submodule",
    "submodule_tables",
    "call_sites",
    "describe",
    "constant_value",
    "scope_name",
    "qualified_name",
]

_REQUIRED = object()


@dataclass(frozen=True)
class Layout:
    """The positional order of a callable's parameters and the defaults of the optional ones."""

    names: tuple[str, ...]  #: parameter names in positional order (the input first)
    defaults: dict[str, Any] = field(default_factory=dict)  #: defaults of the optional parameters
    keyword_only: tuple[str, ...] = ()  #: parameters that can only be passed by keyword

    def required(self) -> tuple[str, ...]:
        """The parameters without a default."""
        return tuple(n for n in self.names if n not in self.defaults)


_BN_F = Layout(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
               {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
_BN_TORCH = Layout(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                    "cudnn_enabled"))
_IN_F = Layout(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
               {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
                "momentum": 0.1, "eps": 1e-5})
_IN_TORCH = Layout(("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
                    "cudnn_enabled"))
_LN_F = Layout(("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_LN_TORCH = Layout(("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
                   {"weight": None, "bias": None, "eps": 1e-5, "cudnn_enable": True})
_GN_F = Layout(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_GN_TORCH = Layout(("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
                   {"weight": None, "bias": None, "eps": 1e-5, "cudnn_enabled": True})
_RMS = Layout(("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
_NATIVE_BN = Layout(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"))
_LINEAR = Layout(("input", "weight", "bias"), {"bias": None})


def _conv(dims: int) -> Layout:
    one = (1,) * dims
    return Layout(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": one, "padding": (0,) * dims, "dilation": one, "groups": 1})


def _conv_transpose(dims: int) -> Layout:
    one, zero = (1,) * dims, (0,) * dims
    return Layout(("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
                  {"bias": None, "stride": one, "padding": zero, "output_padding": zero, "groups": 1, "dilation": one})


#: The argument layout of every call form fxnorm reads, by callable. The functional norms (both the
#: ``torch.nn.functional`` and the ``torch`` forms, whose orders differ), ``torch.native_batch_norm``,
#: and the conv/linear functions a norm can fold into or be fed by.
LAYOUTS: dict[Callable[..., Any], Layout] = {
    F.batch_norm: _BN_F,
    torch.batch_norm: _BN_TORCH,
    torch.native_batch_norm: _NATIVE_BN,
    F.instance_norm: _IN_F,
    torch.instance_norm: _IN_TORCH,
    F.layer_norm: _LN_F,
    torch.layer_norm: _LN_TORCH,
    F.group_norm: _GN_F,
    torch.group_norm: _GN_TORCH,
    F.linear: _LINEAR,
    torch.nn.functional.conv1d: _conv(1),
    torch.nn.functional.conv2d: _conv(2),
    torch.nn.functional.conv3d: _conv(3),
    torch.conv1d: _conv(1),
    torch.conv2d: _conv(2),
    torch.conv3d: _conv(3),
    F.conv_transpose1d: _conv_transpose(1),
    F.conv_transpose2d: _conv_transpose(2),
    F.conv_transpose3d: _conv_transpose(3),
    torch.conv_transpose1d: _conv_transpose(1),
    torch.conv_transpose2d: _conv_transpose(2),
    torch.conv_transpose3d: _conv_transpose(3),
}
if hasattr(F, "rms_norm"):
    LAYOUTS[F.rms_norm] = _RMS
if hasattr(torch, "rms_norm"):
    LAYOUTS[torch.rms_norm] = _RMS


def layout_of(target: Any) -> Layout | None:
    """The :class:`Layout` of a callable fxnorm reads (``None`` for any other callable).

    Example:
        >>> layout_of(torch.batch_norm).names[1:3]
        ('weight', 'bias')
    """
    try:
        return LAYOUTS.get(target)
    except TypeError:  # an unhashable callable
        return None


def bind(target: Any, args: tuple | list, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of a call of ``target`` by parameter name, defaults filled in.

    ``None`` when ``target`` has no known layout, or when the call does not fit it (too many
    positional arguments, an unknown keyword, a required argument missing): a caller must then treat
    the call as opaque rather than guess.

    Example:
        >>> bind(F.conv_transpose2d, ("x", "w"), {"groups": 2})["dilation"]
        (1, 1)
        >>> bind(F.linear, ("x", "w", "b", "extra"), {}) is None
        True
    """
    layout = layout_of(target)
    if layout is None or len(args) > len(layout.names):
        return None
    values: dict[str, Any] = dict(zip(layout.names, args))
    for key, value in kwargs.items():
        if key in values or (key not in layout.names and key not in layout.keyword_only):
            return None
        values[key] = value
    for name in layout.names:
        if name not in values:
            default = layout.defaults.get(name, _REQUIRED)
            if default is _REQUIRED:
                return None
            values[name] = default
    return values


def bind_node(node: fx.Node) -> dict[str, Any] | None:
    """:func:`bind` for a ``call_function`` node (``None`` for any other node).

    Example:
        >>> gm = fx.symbolic_trace(lambda x, rm, rv: F.batch_norm(x, rm, rv, eps=0.1))
        >>> node = [n for n in gm.graph.nodes if n.op == "call_function"][0]
        >>> bind_node(node)["eps"], bind_node(node)["running_var"].name
        (0.1, 'rv')
    """
    if node.op != "call_function":
        return None
    return bind(node.target, node.args, dict(node.kwargs))


def replace_argument(node: fx.Node, name: str, value: Any) -> Any:
    """Set argument ``name`` of a ``call_function`` node to ``value`` where the call passes it
    (positionally or by keyword; by keyword when it was left to its default). Returns the old value.

    Raises:
        KeyError: the node's target has no known layout or no parameter ``name``.

    Example:
        >>> gm = fx.symbolic_trace(lambda x, w: torch.layer_norm(x, (2,), w))
        >>> node = [n for n in gm.graph.nodes if n.op == "call_function"][0]
        >>> replace_argument(node, "weight", None).name, node.args[2], replace_argument(node, "eps", 0.1)
        ('w', None, 1e-05)
        >>> node.kwargs
        {'eps': 0.1}
    """
    layout = layout_of(node.target) if node.op == "call_function" else None
    if layout is None or name not in layout.names:
        raise KeyError(f"{describe_target(node.target)} has no argument {name!r}")
    pos = layout.names.index(name)
    if pos < len(node.args):
        old = node.args[pos]
        node.update_arg(pos, value)
        return old
    old = node.kwargs.get(name, layout.defaults.get(name))
    node.update_kwarg(name, value)
    return old


def describe_target(target: Any) -> str:
    """The name of a call target for messages (``batch_norm``, ``conv2d``...).

    Example:
        >>> describe_target(F.batch_norm)
        'batch_norm'
    """
    return str(getattr(target, "__name__", target))


#: while :func:`submodule_tables` is active: each graph module's submodules by qualified name
_TABLES: ContextVar[dict[nn.Module, dict[str, nn.Module]] | None] = ContextVar("fxnorm_submodule_tables", default=None)


@contextlib.contextmanager
def submodule_tables() -> Iterator[None]:
    """Within the block, :func:`submodule` finds a module's submodules in a table made once, by one
    ``named_modules`` walk: for a pass that looks up the modules of many nodes while none is added,
    removed or replaced. Inside an active block it keeps that block's tables.

    Example:
        >>> relu = nn.ReLU()
        >>> gm = fx.symbolic_trace(nn.Sequential(relu))
        >>> with submodule_tables():
        ...     submodule(gm, "0") is relu
        True
    """
    if _TABLES.get() is not None:
        yield
        return
    token = _TABLES.set({})
    try:
        yield
    finally:
        _TABLES.reset(token)


def submodule(gm: nn.Module, target: Any) -> nn.Module:
    """The module ``gm`` holds at ``target`` (a ``call_module`` node's): ``gm.get_submodule(str(target))``,
    from a table inside :func:`submodule_tables`."""
    tables = _TABLES.get()
    if tables is None:
        return gm.get_submodule(str(target))
    table = tables.get(gm)
    if table is None:
        table = tables[gm] = dict(gm.named_modules(remove_duplicate=False))
    found = table.get(str(target))
    return gm.get_submodule(str(target)) if found is None else found


def node_norm_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module | None] | None:
    """The norm kind of a graph node and its module (None for functional norms), or None.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm1d(2)))
        >>> [node_norm_kind(gm, n) is not None for n in gm.graph.nodes]
        [False, True, False]
    """
    if node.op == "call_module":
        module = submodule(gm, node.target)
        kind = norm_kind(module)
        return (kind, module) if kind is not None else None
    if node.op == "call_function":
        found = functional_norm_kind(node.target)
        return (found, None) if found is not None else None
    return None


def call_sites(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """``call_module`` nodes grouped by the identity of the module they call.

    Example:
        >>> relu = nn.ReLU()
        >>> gm = fx.symbolic_trace(nn.Sequential(relu, relu))
        >>> [len(nodes) for nodes in call_sites(gm).values()]
        [2]
    """
    sites: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[id(submodule(gm, node.target))].append(node)
    return sites


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human description of a node: ``layer1_0_relu (ReLU)``, ``cat (torch.cat)``...

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
        >>> [describe(gm, n) for n in gm.graph.nodes]
        ['the model input input_1', '_0 (ReLU)', 'the graph output']
    """
    if node.op == "call_module":
        return f"{node.name} ({type(submodule(gm, node.target)).__name__})"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        short = "torch" if mod.startswith("torch") and not mod.startswith("torch.nn") else mod.split(".")[-1]
        return f"{node.name} ({short + '.' if short else ''}{getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    if node.op == "placeholder":
        return f"the model input {node.name}"
    if node.op == "output":
        return "the graph output"
    return f"{node.name} ({node.op})"


def constant_value(gm: fx.GraphModule, value: Any) -> Any:
    """The value of a constant argument: a ``get_attr`` node's tensor, or a Python literal as is.

    Raises:
        LookupError: ``value`` is a node computed in the graph (its name is the message).

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm1d(2)))
        >>> constant_value(gm, 0.5)
        0.5
    """
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            raise LookupError(value.name)
        obj: Any = gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
        return obj
    return value


def scope_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The qualified name (inside ``gm``) of the module whose code made ``node``: recorded by
    fxnorm's tracer, else the owner of the functional norm's statistics or weight, else the node's
    own name (a functional norm in the top-level forward).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: F.layer_norm(x, (2,)))
        >>> [scope_name(gm, n) for n in gm.graph.nodes if n.op == "call_function"]
        ['layer_norm']
    """
    scope = node.meta.get("fxnorm_scope")
    if scope:
        return str(scope)
    args = bind_node(node) or {}
    for key in ("running_mean", "weight"):
        arg = args.get(key)
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            owner = str(arg.target).rpartition(".")[0]
            if owner:
                return owner
    return node.name


def qualified_name(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever is not empty.

    Example:
        >>> qualified_name("layer1", "0.bn1"), qualified_name("", "fc"), qualified_name("head", "")
        ('layer1.0.bn1', 'fc', 'head')
    """
    return f"{prefix}.{name}" if prefix and name else prefix or name
