"""Tensor ranks in a traced graph, from real shapes or from rules that are exact.

:func:`record_shapes` stores ``node.meta["tensor_meta"]`` from example inputs: a whole-model graph
is shape-propagated on fake tensors (``FakeTensorMode``: no real computation, real weights allowed),
falling back to a real run; for a model traced part by part the inputs of each part are captured
during one real ``no_grad`` run and each part is shape-propagated on what it received. A node whose
rank differs between calls keeps no shape.

:func:`rank_of` answers from those shapes, or from rules that hold for every input: ``flatten`` and
``view``/``reshape`` read in full (never a partial reading of their arguments), rank-preserving
layers, and the outputs of norms that check their input rank (``BatchNorm2d`` is 4-D). Anything
else is unknown (``None``): a fold that depends on it is refused, with "pass example_inputs".

Example:
    >>> import torch, torch.nn as nn, fxnorm
    >>> gm = fxnorm.trace(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval())
    >>> record_shapes(gm, (torch.randn(2, 4),))
    >>> [rank_of(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    [2, 2]
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..errors import FxNormError
from .calls import submodule
from .kinds import is_plain, layer_kind, norm_kind, target_in
from .tracing import graph_parts

__all__ = ["record_shapes", "rank_of", "recorded_rank", "TensorShape"]

_MAX_CALLS = 4  #: calls of one part that are shape-propagated (more only cost time)
#: modules whose output has their input's rank
_SAME_RANK = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
              nn.Tanh, nn.Mish, nn.ELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
              nn.LayerNorm, nn.GroupNorm)
_SAME_RANK_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.dropout, torch.sigmoid,
                        torch.tanh, F.leaky_relu, torch.nn.functional.hardsigmoid}
#: norms that raise unless their input has this rank: their input and output have it
_CHECKED_RANK = {"BatchNorm2d": 4, "BatchNorm3d": 5}


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The arguments of a call of ``gm`` in placeholder order (kwargs and defaults resolved)."""
    values: list[Any] = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        name = str(node.target).lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            values.append(None)
    return tuple(values)


def _thawed(value: Any) -> Any:
    """``value`` with fx's immutable lists and dicts turned into fresh ones (generated code passes fresh
    literals; a function may mutate them, as torchvision's ``_get_window_and_shift_size`` does)."""
    if isinstance(value, immutable_list):
        return [_thawed(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _thawed(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_thawed(v) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_thawed(v) for v in value))
    return value


@dataclass(frozen=True)
class TensorShape:
    """What :func:`record_shapes` stores in ``node.meta["tensor_meta"]``."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph on fake or real tensors and stores each tensor output's :class:`TensorShape`.

    Unlike fx's ``ShapeProp`` it prints nothing, copies no module, and calls functions with fresh
    argument lists (:func:`_thawed`); a failing node raises :class:`FxNormError` naming it."""

    def __init__(self, gm: fx.GraphModule, fake_mode: Any = None) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.fake_mode = fake_mode

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_function(target, _thawed(args), _thawed(kwargs))

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_method(target, _thawed(args), _thawed(kwargs))

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_module(target, _thawed(args), _thawed(kwargs))

    def run_node(self, n: fx.Node) -> Any:
        try:
            with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext():
                result = super().run_node(n)
        except Exception as err:
            where = n.meta.get("fxnorm_scope") or n.name
            raise FxNormError(f"{type(err).__name__}: {err} (at node {n.name}, in {where!r})") from err
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(tuple(result.shape), result.dtype)
        return result


def _shapes(gm: fx.GraphModule) -> dict[fx.Node, tuple[int, ...] | None]:
    out: dict[fx.Node, tuple[int, ...] | None] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        out[node] = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return out


def _fake_propagate(gm: fx.GraphModule, args: tuple) -> bool:
    """Shapes from fake copies of ``args`` (real weights allowed); False when an op cannot run fake."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    logger = logging.getLogger("torch._subclasses.fake_tensor")  # logs every op that fails on fake tensors
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        _ShapeRecorder(gm, fake_mode=mode).run(*fake)
    except Exception:
        return False
    finally:
        logger.setLevel(level)
    return True


def _propagate(gm: fx.GraphModule, calls: list[tuple], fake: bool) -> None:
    seen: dict[fx.Node, set[int | None]] = {}
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    first: dict[fx.Node, Any] = {}
    for i, args in enumerate(calls):
        if not (fake and _fake_propagate(gm, args)):
            _ShapeRecorder(gm).run(*args)
        for node, shape in _shapes(gm).items():
            seen.setdefault(node, set()).add(None if shape is None else len(shape))
        if i == 0:
            first = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        meta = first.get(node)
        if meta is None or len(seen.get(node, ())) > 1:
            node.meta.pop("tensor_meta", None)
        else:
            node.meta["tensor_meta"] = meta


@torch.no_grad()
def record_shapes(traced: nn.Module, example_inputs: tuple) -> None:
    """Store ``node.meta["tensor_meta"]`` in every graph of ``traced`` from ``example_inputs``.

    Raises:
        FxNormError: the model does not run on ``example_inputs`` (its buffers are restored first).

    Example:
        >>> import torch, torch.nn as nn, fxnorm
        >>> gm = fxnorm.trace(nn.Sequential(nn.Linear(4, 3)))
        >>> record_shapes(gm, (torch.randn(5, 2, 4),))
        >>> [len(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "call_module"]
        [3]
    """
    saved = [(buf, buf.detach().clone()) for buf in traced.buffers()]
    parts = list(graph_parts(traced))
    calls: dict[int, list[tuple]] = {id(gm): [] for _, gm in parts}
    handles = []
    try:
        if isinstance(traced, fx.GraphModule):
            calls[id(traced)].append(tuple(example_inputs))
        else:
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                seen = calls[id(module)]
                if len(seen) < _MAX_CALLS:
                    seen.append(_positional(module, args, kwargs))  # type: ignore[arg-type]

            handles = [gm.register_forward_pre_hook(hook, with_kwargs=True) for _, gm in parts]
            traced(*example_inputs)
        for _, gm in parts:
            if calls[id(gm)]:
                _propagate(gm, calls[id(gm)], fake=gm is traced)
    except Exception as err:
        what = str(err) if isinstance(err, FxNormError) else f"{type(err).__name__}: {err}"
        raise FxNormError(f"example_inputs do not run through {type(traced).__name__}: {what}; pass a tuple of the "
                          "positional arguments model(*example_inputs) accepts") from err
    finally:
        for handle in handles:
            handle.remove()
        for buf, value in saved:
            if buf.device.type != "meta":
                buf.copy_(value)


def recorded_rank(node: Any) -> int | None:
    """The rank :func:`record_shapes` (or ``ShapeProp``/export) stored for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _flatten_rank(start: Any, end: Any, rank: int | None) -> int | None:
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    if end == -1 and start >= 0:
        return start + 1
    if rank is None or rank == 0:
        return None
    lo, hi = start % rank, end % rank
    return rank - (hi - lo) if hi >= lo else None


def _sizes_rank(args: tuple) -> int | None:
    """Rank of ``x.view(*sizes)`` / ``x.view(sizes)``: the number of sizes (each may be -1 or a node)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return len(args[0])
    if len(args) == 1 and isinstance(args[0], fx.Node):
        return None  # a computed shape: its length is not known here
    return len(args) if args else None


def rank_of(gm: fx.GraphModule, node: Any, depth: int = 0) -> int | None:
    """The rank of ``node``'s output when it is known for every input, else None (see the module doc).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.flatten(1, 2))
        >>> print(rank_of(gm, list(gm.graph.nodes)[1]))   # depends on the rank of x
        None
    """
    known = recorded_rank(node)
    if known is not None or not isinstance(node, fx.Node) or depth > 40:
        return known
    checked = _checked_by_a_user(gm, node)
    if checked is not None:
        return checked
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        module = submodule(gm, node.target)
        kind = norm_kind(module) if is_plain(module) else None
        if kind in _CHECKED_RANK:
            return _CHECKED_RANK[kind]
        if isinstance(module, nn.Flatten):
            return _flatten_rank(module.start_dim, module.end_dim, rank_of(gm, first, depth + 1))
        if (isinstance(module, _SAME_RANK) and type(module).forward is _forward_of(module)) or (
                layer_kind(module) is not None and is_plain(module)) or (kind is not None):
            return rank_of(gm, first, depth + 1)
        return None
    if node.op == "call_function":
        if node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return _flatten_rank(start, end, rank_of(gm, first, depth + 1))
        if node.target is torch.reshape:
            return _sizes_rank(tuple(node.args[1:2]) or (node.kwargs.get("shape"),))
        if target_in(node.target, _SAME_RANK_FUNCTIONS):
            return rank_of(gm, first, depth + 1)
        if node.target in (operator.add, operator.mul, operator.sub, operator.truediv) and len(node.args) == 2:
            ranks = [rank_of(gm, a, depth + 1) if isinstance(a, fx.Node) else 0 for a in node.args]
            return None if None in ranks else max(r for r in ranks if r is not None)
        return None
    if node.op == "call_method":
        name = str(node.target)
        if name in ("view", "reshape"):
            return _sizes_rank(tuple(node.args[1:]))
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return _flatten_rank(start, end, rank_of(gm, first, depth + 1))
        if name in ("relu", "sigmoid", "tanh", "contiguous", "float", "clone", "relu_"):
            return rank_of(gm, first, depth + 1)
    return None


def _checked_by_a_user(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The rank a norm that checks its input rank (``BatchNorm2d``: 4) demands of ``node``, if one
    reads it (the model would raise otherwise)."""
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node:
            module = submodule(gm, user.target)
            kind = norm_kind(module) if is_plain(module) else None
            if kind in _CHECKED_RANK:
                return _CHECKED_RANK[kind]
    return None


def _forward_of(module: nn.Module) -> Any:
    for cls in type(module).__mro__:
        if cls in _SAME_RANK:
            return cls.forward
    return None
