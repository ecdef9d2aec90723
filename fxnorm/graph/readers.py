"""Who else reads or writes what a fold would change: the facts behind "every reader counts".

A fold is exact only if nothing else sees the layers and values it changes. This module finds, read
only:

- :func:`mutators`: graph users that may write into a value or into an alias of it (in-place
  methods and functions, ``inplace=True``, modules with ``inplace=True``, unknown leaf modules, and
  the arithmetic operators that an in-place ``x += y`` is traced as — fx cannot tell ``x += y`` from
  ``x = x + y``);
- :func:`attribute_reads`: every ``get_attr`` of every graph part, by (owner module, attribute);
- :func:`hidden_references`: modules held outside the module tree (a plain list, a dict, a cached
  bound method), which can be called behind the graph's back;
- :func:`why_opaque`: modules whose calls are not what their class says (a ``forward`` replaced on
  the instance, forward hooks or pre-hooks, parametrizations, ``weight_norm``);
- :func:`value_users`: the users of a value that read it (``x.shape`` and friends only read metadata);
- :func:`augmented_assignment`: whether an operator being traced is an ``x += y``.

Example:
    >>> import torch.fx as fx, torch.nn as nn
    >>> gm = fx.symbolic_trace(lambda x: x.relu_() + x.view(-1).sum())
    >>> x = next(iter(gm.graph.nodes))
    >>> [n.name for n in mutators(gm, x)]
    ['relu_']
"""

from __future__ import annotations

import dis
import functools
import operator
import os
import sys
import types
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as module_globals

from .calls import submodule
from .kinds import known_base, target_in

__all__ = ["mutators", "aliases", "attribute_reads", "hidden_references", "why_opaque", "global_hooks",
           "module_names", "is_metadata_query", "value_users", "augmented_assignment", "MODULE_OWN_ATTRIBUTES"]

#: users that return a view (or may) of their first argument: a write into them writes the argument
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "t", "T", "mT", "H", "contiguous", "detach", "chunk",
    "split", "unbind", "split_with_sizes", "tensor_split", "movedim", "moveaxis", "swapaxes", "swapdims",
    "as_strided", "unfold", "diagonal", "real", "imag", "view_as_real", "alias", "__getitem__", "data",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "clone" ,
})
_VIEW_FUNCTIONS = frozenset({
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow,
    torch.select, torch.t, torch.chunk, torch.split, torch.unbind, torch.tensor_split, torch.movedim,
    torch.swapaxes, torch.diagonal, torch.detach, operator.getitem, torch.as_strided, torch.unflatten,
})
#: ``x += y`` traces as ``operator.add(x, y)``: with the value as the first argument, these may be
#: an augmented assignment that writes into it in the real model
_AUGMENTABLE = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem,
})
#: stateless modules that never write into their input (unless built with ``inplace=True``)
_PURE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d,
    nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.Softplus, nn.PReLU, nn.Threshold, nn.MultiheadAttention, nn.Embedding,
)


def _is_inplace_call(node: fx.Node) -> bool:
    """Whether the call at ``node`` writes into (one of) its arguments."""
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.endswith("__")) or "out" in node.kwargs
    if node.op == "call_function":
        if node.kwargs.get("inplace") is True or "out" in node.kwargs:
            return True
        schema = getattr(node.target, "_schema", None)  # ATen overloads: alias annotations say it
        if schema is not None:
            return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        # F.relu(x, True) and friends: a positional inplace flag
        return any(a is True for a in node.args[1:]) and "inplace" in _parameter_names(node.target)
    return False


@functools.lru_cache(maxsize=None)
def _parameter_names(target: Any) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return ()


def _module_may_write(module: nn.Module) -> bool:
    if getattr(module, "inplace", False) is True:
        return True
    if isinstance(module, _PURE_MODULES) and type(module).forward is _base_forward(module):
        return False
    base = known_base(module)
    if base is not None and type(module).forward is getattr(base[0], "forward", None):
        return False  # a plain norm, conv or linear never writes into its input
    return True  # an unknown (leaf) module may do anything with its input


def _base_forward(module: nn.Module) -> Any:
    for cls in type(module).__mro__:
        if cls in _PURE_MODULES:
            return getattr(cls, "forward", None)
    return None


def aliases(node: fx.Node) -> list[fx.Node]:
    """``node`` and every node that may share its memory (views, getitem, ``.to()``...), transitively.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.view(-1).t().relu())
        >>> [n.name for n in aliases(next(iter(gm.graph.nodes)))]
        ['x', 'view', 't']
    """
    found, todo = [node], [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in found or not user.args or user.args[0] is not current:
                continue
            view = (user.op == "call_method" and str(user.target) in _VIEW_METHODS) or (
                user.op == "call_function" and target_in(user.target, _VIEW_FUNCTIONS))
            view = view or (user.op == "call_function" and user.target is getattr and user.args[1] in _VIEW_METHODS)
            if view:
                found.append(user)
                todo.append(user)
    return found


def mutators(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that may write into the value of ``node`` or an alias of it: in-place methods and
    functions, ``inplace=True`` calls, in-place modules, modules fxnorm does not know (they may write
    into their inputs), and arithmetic operators with the value first (a traced ``x += y``).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: (x + 1) * x)
        >>> [n.name for n in mutators(gm, next(iter(gm.graph.nodes)))]   # "x + 1" may be "x += 1"
        ['add']
    """
    found: list[fx.Node] = []
    for alias in aliases(node):
        for user in alias.users:
            if user in found or is_metadata_query(user, alias):
                continue
            first = bool(user.args) and user.args[0] is alias
            if user.op == "call_module":
                if _module_may_write(submodule(gm, user.target)):
                    found.append(user)
            elif _is_inplace_call(user) and (first or "out" in user.kwargs):
                found.append(user)
            elif user.op == "call_function" and first and target_in(user.target, _AUGMENTABLE) and (
                    user.meta.get("fxnorm_inplace") is not False):  # fxnorm's tracer read the bytecode: "x + y"
                found.append(user)
    return found


def attribute_reads(parts: Iterable[tuple[str, fx.GraphModule]],
                    roots: Mapping[str, nn.Module]) -> dict[tuple[int, str], list[fx.Node]]:
    """Every ``get_attr`` of the graph parts, by ``(id(owner module), attribute name)``, with the
    nodes that read it; owners are resolved against ``roots[prefix]``, the model's own module each
    part was traced from (a part's root-level attributes belong to it, not to the GraphModule).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> reads = attribute_reads([("", fx.symbolic_trace(model))], {"": model})
        >>> sorted(reads) == [(id(model), "bias"), (id(model), "weight")]
        True
    """
    reads: dict[tuple[int, str], list[fx.Node]] = defaultdict(list)
    for prefix, gm in parts:
        root = roots[prefix]
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            path, _, attr = str(node.target).rpartition(".")
            try:
                owner = root.get_submodule(path) if path else root
            except AttributeError:
                continue
            reads[(id(owner), attr)].append(node)
    return dict(reads)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name each module of ``model`` is registered under (``named_modules`` with
    duplicates), by ``id``.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> module_names(nn.ModuleDict({"a": bn, "b": bn}))[id(bn)]
        ['a', 'b']
    """
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names[id(module)].append(name)
    return dict(names)


def _referenced_modules(value: Any, depth: int = 0) -> list[nn.Module]:
    """Modules reachable from a plain attribute value (containers, bound methods, partials)."""
    if depth > 3:
        return []
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, types.MethodType):
        return _referenced_modules(value.__self__, depth + 1)
    if isinstance(value, functools.partial):
        return [m for a in (value.func, *value.args, *value.keywords.values())
                for m in _referenced_modules(a, depth + 1)]
    if isinstance(value, (list, tuple, set, frozenset)):  # scalars skipped: most are tuples of ints
        return [m for v in value if type(v) not in _SCALARS for m in _referenced_modules(v, depth + 1)]
    if isinstance(value, dict):
        return [m for v in value.values() if type(v) not in _SCALARS for m in _referenced_modules(v, depth + 1)]
    return []


_SCALARS = frozenset({bool, int, float, str, type(None)})
#: module attributes that hold its tree, its tensors, a forward replaced on the instance or (by prefix)
#: hooks: not where a module is hidden
_TREE_ATTRIBUTES = frozenset({"_modules", "_parameters", "_buffers", "forward"})
_HOOK_PREFIXES = ("_forward_", "_backward_", "_state_dict", "_load_")
#: the attributes every ``nn.Module`` has: its tables of children, tensors and hooks, its flags (none
#: holds a module or tensor of its own; tested first, with one set lookup, by the walks over plain
#: attributes)
MODULE_OWN_ATTRIBUTES = frozenset(vars(nn.Module()))


def hidden_references(model: nn.Module) -> dict[int, list[str]]:
    """Modules of ``model`` that are also held outside the module tree — in a plain attribute, a list,
    a dict, a tuple, a bound method or a ``functools.partial`` of some module — by ``id``, with where.
    Such a module can be called behind the graph's back, so folding it (or into it) is refused.

    Example:
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.bn = nn.BatchNorm1d(2)
        ...         self.cache = [self.bn]
        >>> m = M()
        >>> hidden_references(m)[id(m.bn)]
        ['cache']
    """
    found: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        for key, value in module.__dict__.items():
            if key in MODULE_OWN_ATTRIBUTES or type(value) in _SCALARS:
                continue  # holds no module (most of a module's attributes)
            if key in _TREE_ATTRIBUTES or key.startswith(_HOOK_PREFIXES):
                continue
            for held in _referenced_modules(value):
                if held is not module:
                    found[id(held)].append(f"{name}.{key}" if name else key)
    return dict(found)


def global_hooks() -> list[str]:
    """The kinds of global module hooks installed (``register_module_forward_hook`` and friends):
    they see every module's inputs and outputs."""
    kinds = []
    for attr, label in (("_global_forward_hooks", "global forward hook"),
                        ("_global_forward_pre_hooks", "global forward pre-hook")):
        if getattr(module_globals, attr, None):
            kinds.append(label)
    return kinds


def why_opaque(module: nn.Module, *, allow_hooks: bool = False) -> str | None:
    """Why a call of ``module`` is not what its class's ``forward`` computes (None when it is): a
    ``forward`` replaced on the instance, forward hooks or pre-hooks (unless ``allow_hooks``),
    parametrizations or ``weight_norm``/``spectral_norm`` hooks (always).

    Example:
        >>> conv = nn.Conv2d(1, 1, 1)
        >>> _ = conv.register_forward_hook(lambda m, i, o: None)
        >>> why_opaque(conv), why_opaque(conv, allow_hooks=True)
        ('it has a forward hook (pass allow_hooks=True if the hook may see different values)', None)
    """
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance (fxnorm cannot tell what it computes)"
    if getattr(module, "parametrizations", None) is not None:
        names = ", ".join(getattr(module, "parametrizations").keys())
        return f"its {names} is parametrized (torch.nn.utils.parametrize): the weight is computed on every call"
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm", "SpectralNormLoadStateDictPreHook"):
            return f"it is under torch.nn.utils.{'weight_norm' if kind == 'WeightNorm' else 'spectral_norm'}: " \
                   "its weight is recomputed on every call (remove_weight_norm first)"
    if allow_hooks:
        return None
    if module._forward_pre_hooks or getattr(module, "_forward_pre_hooks_with_kwargs", None):
        return "it has a forward pre-hook (pass allow_hooks=True if the hook may see different values)"
    if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return "it has a forward hook (pass allow_hooks=True if the hook may see different values)"
    return None


#: Tensor methods and attributes that read only a tensor's metadata, never its values. A fold keeps
#: every one of them: a folded norm's input has its output's shape, dtype and device.
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


def is_metadata_query(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` only reads the metadata of ``node``'s output: ``x.shape``, ``x.size()``,
    ``x.size(1)``, ``x.dim()``, ``x.numel()``, ``x.dtype``, ``getattr(x, "device")``... and never its
    values, so it does not stop a fold (a folded norm's input has the same shape, dtype and device).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.relu().reshape(x.shape[0], -1))
        >>> x = next(iter(gm.graph.nodes))
        >>> [(u.name, is_metadata_query(u, x)) for u in x.users]
        [('relu', False), ('getattr_1', True)]
    """
    if not user.args or user.args[0] is not node or any(a is node for a in user.args[1:]):
        return False
    if any(a is node for a in user.kwargs.values()):
        return False
    if user.op == "call_method":
        return user.target in _METADATA_METHODS
    return (user.op == "call_function" and user.target is getattr and len(user.args) == 2
            and user.args[1] in _METADATA_ATTRS)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values: every user but :func:`is_metadata_query` ones.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.relu().reshape(x.size(0), -1))
        >>> [u.name for u in value_users(next(iter(gm.graph.nodes)))]
        ['relu']
    """
    return [u for u in node.users if not is_metadata_query(u, node)]


#: the folders of torch and fxnorm: frames there are the tracer's, not the user's (with the separator:
#: torchvision's folder starts with torch's name)
_FRAMEWORK = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def augmented_assignment(target: Any) -> bool | None:
    """For an arithmetic operator being traced right now: whether the user's code wrote it as an
    augmented assignment (``x += y`` writes into ``x``; fx records both as ``operator.add``). Read from
    the bytecode instruction the user's frame is executing. None for other targets, or when the frame
    cannot be told (callers then assume it may write).

    Example:
        >>> import operator
        >>> augmented_assignment(operator.add) is None   # not called while tracing: no user frame here
        True
    """
    if not _is_operator(target):
        return None
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_FRAMEWORK):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or frame.f_code.co_name == "<module>":
        return None
    found = _instructions(frame.f_code).get(frame.f_lasti)
    if found is None:
        return None
    name, arg = found
    if name.startswith("INPLACE_") or (name == "BINARY_OP" and arg.endswith("=") and arg != "=="):
        return True
    return False if name.startswith("BINARY_") else None


@functools.lru_cache(maxsize=4096)
def _instructions(code: types.CodeType) -> dict[int, tuple[str, str]]:
    return {i.offset: (i.opname, i.argrepr) for i in dis.get_instructions(code)}


def _is_operator(target: Any) -> bool:
    return getattr(target, "__module__", None) in ("_operator", "operator") and getattr(target, "__name__", "") in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift")
