"""Where a batch norm's channels go between its producer and the norm, when ops stand between them:
rearranging ops (``view``, ``reshape``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``,
``transpose``, ``permute``, ``movedim``, ``contiguous``, ``nn.Flatten``, ``nn.Unflatten``) and a
concatenation of producers along the channel dim. (The consumer side, pooling and flattening before
a Linear, is :mod:`fxnorm.folding.heads`.)

A per-channel affine map commutes with any op that moves elements without changing their channel.
The functions here follow the channel dim through such ops for every rank the tensor can have (the
rank recorded from example inputs, else every rank the layer can produce); a rank at which an op or
the norm would raise is not a case. A state ``(rank, dim)`` means "the channel of an element is its
index along ``dim`` modulo C" (that dim's size is a multiple of C); ``FLAT`` means "the channel is
the element's row-major index modulo C" (after a ``view`` of a tensor whose channels were last). At
the norm, the norm's own channel dim must carry it; the norm checks that this dim has C entries, so
the mapping holds for every input that runs.

Example:
    >>> import torch, torch.fx as fx, torch.nn as nn
    >>> gm = fx.symbolic_trace(lambda y: y.flatten(0, 1))
    >>> y, flat = list(gm.graph.nodes)[:2]
    >>> print(follow_to_norm(gm, y, [flat], {3: 2}, {2: 1, 3: 1}, 4))  # (N, L, C) Linear -> BN1d
    None
    >>> follow_to_norm(gm, y, [flat], {3: 0, 4: 1}, {2: 1, 3: 1}, 4)[:49]   # Conv2d -> BatchNorm1d
    "the channels of y do not stay the norm's channels"
    >>> follow_to_norm(gm, y, [flat], {r: r - 1 for r in range(1, 7)}, {2: 1, 3: 1}, 4).endswith(
    ...     "(pass example_inputs to record shapes)")  # rank unknown: at rank 4 the channels end at dim 2
    True
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.calls import submodule
from ..graph.kinds import target_in
from ..graph.readers import value_users
from ..graph.shapes import rank_of

__all__ = ["FLAT", "Step", "op_call", "dim_of", "view_sizes", "bound_args", "rearranging", "producer_path",
           "single_users", "follow_to_norm", "is_cat", "cat_inputs"]

#: the state "channel = row-major index modulo C"
FLAT = "flat"
State = tuple[int, Union[int, str]]
#: what one op does to a state: the new state, a string (why the channel is lost), or None (the op
#: raises at this rank: not a case)
Step = Union[State, str, None]

_METHODS = {"flatten", "unflatten", "view", "reshape", "view_as", "reshape_as", "contiguous", "squeeze", "unsqueeze",
            "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t"}
_FUNCTIONS: dict[Any, str] = {torch.flatten: "flatten", torch.unflatten: "unflatten", torch.reshape: "reshape",
              torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.transpose: "transpose",
              torch.swapaxes: "swapaxes", torch.swapdims: "swapdims", torch.permute: "permute",
              torch.movedim: "movedim", torch.moveaxis: "moveaxis", torch.t: "t"}
#: argument names and defaults of the rearranging ops (after the tensor)
_PARAMS: dict[str, tuple[tuple[str, Any], ...]] = {
    "flatten": (("start_dim", 0), ("end_dim", -1)), "unflatten": (("dim", None), ("sizes", None)),
    "squeeze": (("dim", None),), "unsqueeze": (("dim", None),), "transpose": (("dim0", None), ("dim1", None)),
    "swapaxes": (("axis0", None), ("axis1", None)), "swapdims": (("dim0", None), ("dim1", None)),
    "movedim": (("source", None), ("destination", None)), "moveaxis": (("source", None), ("destination", None)),
    "t": (), "contiguous": (),
}
_CATS = frozenset({torch.cat, torch.concat, torch.concatenate})


def op_call(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple, dict] | None:
    """``(op name, arguments after the tensor, keyword arguments)`` of a rearranging op, else None.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Flatten()))
        >>> op_call(gm, list(gm.graph.nodes)[1])
        ('flatten', (1, -1), {})
    """
    if node.op == "call_method" and node.target in _METHODS:
        return str(node.target), tuple(node.args[1:]), dict(node.kwargs)
    if node.op == "call_function" and target_in(node.target, _FUNCTIONS):
        return _FUNCTIONS[node.target], tuple(node.args[1:]), dict(node.kwargs)
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if type(module) is nn.Flatten:
            return "flatten", (module.start_dim, module.end_dim), {}
        if type(module) is nn.Unflatten:
            return "unflatten", (module.dim, tuple(module.unflattened_size)), {}
    return None


def rearranging(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` only moves the elements of its first argument (a view, reshape, flatten, transpose...)."""
    return bool(node.args) and isinstance(node.args[0], fx.Node) and op_call(gm, node) is not None


def bound_args(name: str, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments of a rearranging op by name, defaults filled in (None: a call fxnorm does not read)."""
    params = _PARAMS[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
    if len(args) > len(params) or any(k not in dict(params) for k in kwargs):
        return None
    values = {k: default for k, default in params}
    values.update(zip((k for k, _ in params), args))
    values.update(kwargs)
    return values


def dim_of(value: Any, rank: int) -> int | str | None:
    """A dim argument normalized for ``rank``: an int, None when torch would raise, or why it is not read."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"a dim computed in the graph ({value})"
    span = max(rank, 1)
    return value % span if -span <= value < span else None


def view_sizes(args: tuple, kwargs: dict) -> tuple | str | None:
    """The target sizes of ``view``/``reshape``; None when they are one computed value; a string for a
    dtype view (it reinterprets the bits)."""
    if any(isinstance(v, torch.dtype) for v in (*args, *kwargs.values())):
        return "it reinterprets the values as another dtype"
    if "shape" in kwargs or "size" in kwargs:
        value = kwargs.get("shape", kwargs.get("size"))
        return tuple(value) if isinstance(value, (tuple, list)) else None
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    if len(args) == 1 and not isinstance(args[0], int):
        return None
    return tuple(args)


def _order(name: str, a: dict[str, Any], rank: int) -> list[int] | str | None:
    """Where each output dim comes from, for transpose/swapaxes/movedim/t."""
    order = list(range(rank))
    if name == "t":
        return None if rank > 2 else order[::-1]
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = [dim_of(v, rank) for v in list(a.values())[:2]]
        pair = [d for d in dims if isinstance(d, int)]
        if len(pair) != 2:  # a dim fxnorm does not read (str), or torch raises (None)
            return next((d for d in dims if isinstance(d, str)), None)
        i, j = pair
        order[i], order[j] = order[j], order[i]
        return order
    src, dst = a["source"], a["destination"]
    src, dst = (list(src), list(dst)) if isinstance(src, (tuple, list)) else ([src], [dst])
    normal = [dim_of(d, rank) for d in (*src, *dst)]
    ints = [d for d in normal if isinstance(d, int)]
    if len(ints) != len(normal):
        return next((d for d in normal if isinstance(d, str)), None)
    if len(src) != len(dst) or len(set(ints[:len(src)])) != len(src) or len(set(ints[len(src):])) != len(dst):
        return None
    placed = dict(zip(ints[len(src):], ints[:len(src)]))
    rest = iter(d for d in order if d not in placed.values())
    return [placed[i] if i in placed else next(rest) for i in range(rank)]


def _reshape(gm: fx.GraphModule, node: fx.Node, name: str, args: tuple, kwargs: dict, state: State) -> Step:
    rank, dim = state
    if name in ("view", "reshape"):
        sizes = view_sizes(args, kwargs)
        if isinstance(sizes, str):
            return f"{node.name}: {sizes}"
        out = len(sizes) if sizes is not None else rank_of(gm, node)
    else:
        other = args[0] if args else next(iter(kwargs.values()), None)
        out = rank_of(gm, other) if isinstance(other, fx.Node) else None
    if out is None:
        return f"the rank after {node.name} is not known"
    if dim == FLAT or dim == rank - 1:
        return out, FLAT
    return f"{node.name} reshapes a tensor whose channels are not its last dim"


def _flatten(node: fx.Node, a: dict[str, Any], state: State) -> Step:
    rank, dim = state
    start, end = dim_of(a["start_dim"], rank), dim_of(a["end_dim"], rank)
    if not isinstance(start, int) or not isinstance(end, int) or start > end:
        return start if isinstance(start, str) else end if isinstance(end, str) else None
    if dim == FLAT:
        return max(rank - (end - start), 1), FLAT
    assert isinstance(dim, int)  # FLAT was handled
    if dim < start or dim > end:
        return rank - (end - start), dim if dim < start else dim - (end - start)
    if dim == end:  # the channel is the innermost of the merged dims: index modulo C
        return rank - (end - start), start
    return f"{node.name} merges the channel dim with the dims after it"


def _unflatten(node: fx.Node, a: dict[str, Any], state: State, channels: int) -> Step:
    rank, dim = state
    sizes = a["sizes"]
    if not isinstance(sizes, (tuple, list)) or not sizes:
        return f"{node.name} unflattens into sizes fxnorm does not read"
    at = dim_of(a["dim"], rank)
    if not isinstance(at, int):
        return at
    out = rank + len(sizes) - 1
    if dim == FLAT or at != dim:
        return out, dim if dim == FLAT or dim < at else dim + len(sizes) - 1  # type: ignore[operator]
    last = sizes[-1]
    if isinstance(last, int) and last > 0 and last % channels == 0:
        return out, at + len(sizes) - 1
    return f"{node.name} splits the channel dim"


def _squeeze(gm: fx.GraphModule, node: fx.Node, name: str, a: dict[str, Any], state: State) -> Step:
    rank, dim = state
    if name == "unsqueeze":
        at = dim_of(a["dim"], rank + 1)
        if not isinstance(at, int):
            return at
        return rank + 1, dim if dim == FLAT or dim < at else dim + 1  # type: ignore[operator]
    out = rank_of(gm, node)  # which dims squeeze removes depends on their sizes
    if out is None:
        return f"the rank after {node.name} is not known"
    at = dim_of(a["dim"], rank) if a["dim"] is not None else None
    if out == rank or dim == FLAT:
        return out, dim
    if isinstance(at, int) and out == rank - 1 and at != dim:
        return out, dim if dim < at else dim - 1  # type: ignore[operator]
    return f"{node.name} removes dims around the channel dim"


def _step(gm: fx.GraphModule, node: fx.Node, state: State, channels: int) -> Step:
    """The channel state after ``node`` (see the module doc)."""
    name, args, kwargs = op_call(gm, node)  # type: ignore[misc]  # rearranging() was checked
    rank, dim = state
    if name == "contiguous":
        return state
    if name in ("view", "reshape", "view_as", "reshape_as"):
        return _reshape(gm, node, name, args, kwargs, state)
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args or kwargs.get("dims", ())
        order = [dim_of(d, rank) for d in dims]
        if len(order) != rank or None in order or len(set(order)) != rank:
            return None
        bad = next((d for d in order if isinstance(d, str)), None)
        return bad or (f"{node.name} reorders a reshaped tensor" if dim == FLAT else (rank, order.index(dim)))
    a = bound_args(name, args, kwargs)
    if a is None:
        return f"{node.name} is called with arguments fxnorm does not read"
    if name == "flatten":
        return _flatten(node, a, state)
    if name == "unflatten":
        return _unflatten(node, a, state, channels)
    if name in ("squeeze", "unsqueeze"):
        return _squeeze(gm, node, name, a, state)
    moved = _order(name, a, rank)
    if not isinstance(moved, list):
        return moved
    return f"{node.name} reorders a reshaped tensor" if dim == FLAT else (rank, moved.index(dim))  # type: ignore[arg-type]


def producer_path(gm: fx.GraphModule, source: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from a norm's input through rearranging ops: ``(head, chain)``, ``chain[0]`` reading
    ``head`` and ``chain[-1]`` being ``source`` (``chain`` is empty when ``source`` is not such an op).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.flatten(0, 1).contiguous())
        >>> head, chain = producer_path(gm, list(gm.graph.nodes)[2])
        >>> head.name, [n.name for n in chain]
        ('x', ['flatten', 'contiguous'])
    """
    chain: list[fx.Node] = []
    node = source
    while rearranging(gm, node) and len(chain) < 16:
        chain.insert(0, node)
        node = node.args[0]  # type: ignore[assignment]
    return node, chain


def single_users(nodes: list[fx.Node], last_user: fx.Node) -> str | None:
    """None when each node's values are read only by the next node (the last one's by ``last_user``)."""
    for node, nxt in zip(nodes, [*nodes[1:], last_user]):
        others = [u.name for u in value_users(node) if u is not nxt]
        if others:
            return f"{node.name} is also used by {', '.join(others)}"
    return None


def follow_to_norm(gm: fx.GraphModule, head: fx.Node, chain: list[fx.Node], head_dims: dict[int, int | None],
                   norm_dims: dict[int, int | None], channels: int) -> str | None:
    """None when, at every rank ``head`` can have, its channel dim (``head_dims[rank]``) reaches the
    norm through ``chain`` as the norm's channel dim (``norm_dims[rank]``); else why not."""
    known = rank_of(gm, head)
    ranks = [known] if known is not None else sorted(r for r, d in head_dims.items() if d is not None)
    cases = 0
    for rank in ranks:
        start = head_dims.get(rank)
        if start is None:
            return _lost(head, chain, f"at rank {rank} {head.name} has no channel dim the norm could take", known)
        state: Step = (rank, start)
        for node in chain:
            state = _step(gm, node, state, channels)  # type: ignore[arg-type]
            if not isinstance(state, tuple):
                break
            if rank_of(gm, node) not in (None, state[0]):
                state = None  # the recorded rank says this is not the case
                break
        if isinstance(state, str):
            return _lost(head, chain, state, known)
        if state is None or state[0] not in norm_dims:
            continue  # an op, or the norm, raises at this rank
        cases += 1
        out, dim = state
        wanted = norm_dims[out]
        if wanted is None or (dim != wanted and not (dim == FLAT and wanted == out - 1)):
            return _lost(head, chain, f"at rank {rank} they arrive at dim {dim}, the norm's channels are dim "
                                      f"{wanted} of its rank-{out} input", known)
    if not cases:
        return f"no rank of {head.name} reaches the norm through {', '.join(n.name for n in chain)} without an error"
    return None


def _lost(head: fx.Node, chain: list[fx.Node], why: str, known: int | None) -> str:
    through = f" through {', '.join(n.name for n in chain)}" if chain else ""
    text = f"the channels of {head.name} do not stay the norm's channels{through}: {why}"
    return text if known is not None else text + " (pass example_inputs to record shapes)"


def is_cat(node: fx.Node) -> bool:
    """Whether ``node`` is a ``torch.cat``/``concat``/``concatenate`` call."""
    return node.op == "call_function" and target_in(node.target, _CATS)


def cat_inputs(node: fx.Node) -> tuple[list[Any], Any]:
    """The tensors and the dim of a concatenation (the dim may be a node: not a literal).

    Example:
        >>> gm = fx.symbolic_trace(lambda a, b: torch.cat([a, b], 1))
        >>> tensors, dim = cat_inputs(list(gm.graph.nodes)[2])
        >>> [t.name for t in tensors], dim
        (['a', 'b'], 1)
    """
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return list(tensors) if isinstance(tensors, (tuple, list)) else [], dim
