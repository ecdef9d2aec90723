"""A batch norm before a classifier head: ``bn -> flatten -> Linear`` and ``bn -> pooling -> flatten
-> Linear`` fold into the Linear.

After ``flatten(1)`` of an ``(N, C, H, W)`` tensor, input feature ``f`` of the Linear is channel
``f // (H*W)``: folding the norm's ``x * scale + shift`` multiplies each block of ``H*W`` columns of
the Linear's weight by one channel's scale (and adds the shifts through the weight to its bias).
``H*W`` is the Linear's ``in_features / C`` for every input that runs, so no shape is needed.
Averaging commutes with a per-channel affine map (the mean of ``a*x + b`` is ``a*mean(x) + b``):
adaptive average pooling always, ``AvgPool`` when no zero padding is counted (``padding=0`` or
``count_include_pad=False``) and without ``divisor_override``, ``mean`` over dims other than the
channel's. Max pooling commutes only when every scale is positive (``max(a*x) = a*max(x)`` for
``a > 0``). Pooling must see a batched tensor (an unbatched one would pool across channels).

Example:
    >>> import torch.nn as nn, fxnorm
    >>> head = nn.Sequential(nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    >>> [(s.fold, s.fold_into) for s in fxnorm.find_norms(head)]
    [('into_consumer', '3')]
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.calls import submodule
from ..graph.kinds import target_in
from ..graph.readers import value_users
from ..graph.shapes import rank_of
from .chains import bound_args, dim_of, op_call, view_sizes

__all__ = ["POOLS", "consumer_path", "follow_to_linear"]

#: pooling modules that commute with a per-channel affine map (max pooling: only for positive scales)
POOLS: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                           nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_AVG: dict[Any, int] = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
#: ``(rank, dim, exact)``: the channel of an element is its index along ``dim`` (``exact``), or that
#: index // k where k is the number of elements the dims after the channel were flattened into
State = tuple[int, int, bool]


def _pool(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int, bool] | str | None:
    """``(description, spatial dims, needs positive scales)`` of a pooling op that commutes with a
    per-channel affine map, why one does not, or None when ``node`` does not pool."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if type(module) not in POOLS:
            return None
        cls = type(module).__name__
        name, n = f"{node.name} ({cls})", int(cls[-2])
        if "Max" in cls:
            return f"{name} also returns indices" if getattr(module, "return_indices", False) else (name, n, True)
        if getattr(module, "divisor_override", None) is not None:
            return f"{name} divides by divisor_override={getattr(module, 'divisor_override')}: it does not average"
        padding = getattr(module, "padding", 0)
        pads = any(p != 0 for p in padding) if isinstance(padding, tuple) else padding != 0
        if pads and getattr(module, "count_include_pad", True):
            return (f"{name} pads with zeros (padding={padding}) and counts them (count_include_pad=True): the "
                    "norm's shift would be averaged with the zeros")
        return name, n, False
    if node.op == "call_function" and target_in(node.target, _ADAPTIVE_AVG):
        if len(node.args) != 2 or node.kwargs:
            return f"{node.name} is called with arguments fxnorm does not read"
        return f"{node.name} (adaptive_avg_pool)", _ADAPTIVE_AVG[node.target], False
    return None


def _mean(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean)


def _flattening(gm: fx.GraphModule, node: fx.Node) -> bool:
    call = op_call(gm, node)
    return call is not None and call[0] in ("flatten", "view", "reshape")


def consumer_path(gm: fx.GraphModule, norm: fx.Node) -> tuple[fx.Node, list[fx.Node]] | str:
    """Walk forward from a norm's output through pooling and flattening ops, each read only by the
    next: ``(end, chain)`` where ``end`` is the first other op (``chain`` empty: the norm's only user);
    or why there is no single path.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.mean((2, 3)).flatten(1).relu())
        >>> end, chain = consumer_path(gm, list(gm.graph.nodes)[0])
        >>> end.name, [n.name for n in chain]
        ('relu', ['mean', 'flatten'])
    """
    chain: list[fx.Node] = []
    node = norm
    while True:
        users = value_users(node)
        if len(users) != 1:
            return f"{node.name if chain else 'its'} output has {len(users)} users"
        user = users[0]
        first_only = user.args and user.args[0] is node and not any(
            a is node for a in (*user.args[1:], *user.kwargs.values()))
        if not first_only or len(chain) >= 8 or not (_pool(gm, user) is not None or _mean(user)
                                                      or _flattening(gm, user)):
            return user, chain
        chain.append(user)
        node = user


def _batch_view(node: fx.Node, sizes: Any) -> bool:
    """``x.view(x.size(0), -1)`` / ``x.reshape(x.shape[0], -1)`` of the tensor it reads."""
    if not isinstance(sizes, tuple) or len(sizes) != 2 or sizes[1] != -1 or not isinstance(sizes[0], fx.Node):
        return False
    size, viewed = sizes[0], node.args[0]
    if size.op == "call_method" and size.target == "size":
        return size.args[:1] == (viewed,) and (tuple(size.args[1:]) or (size.kwargs.get("dim"),)) == (0,)
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
        shape = size.args[0]
        return isinstance(shape, fx.Node) and (
            (shape.op == "call_function" and shape.target is getattr and shape.args == (viewed, "shape")) or
            (shape.op == "call_method" and shape.target == "size" and shape.args == (viewed,)))
    return False


def _averaged(node: fx.Node, state: State) -> State | str | None:
    """The state after ``mean`` over dims other than the channel's."""
    rank, dim, exact = state
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) and not isinstance(dims, bool) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not isinstance(keep, bool) or len(node.args) > 3 or set(
            node.kwargs) - {"dim", "keepdim"}:
        return f"{node.name} averages over dims fxnorm does not read"
    normal = [dim_of(d, rank) for d in dims]
    if None in normal:
        return None
    bad = next((d for d in normal if isinstance(d, str)), None)
    if bad is not None or dim in normal or not exact:
        return bad or f"{node.name} averages over the channel dim"
    removed = set(normal)
    return state if keep else (rank - len(removed), dim - sum(d < dim for d in removed), exact)  # type: ignore[operator]


def _flattened(gm: fx.GraphModule, node: fx.Node, state: State) -> State | str | None:
    """The state after a flatten (or a ``view(x.size(0), -1)``) on the way to the Linear."""
    rank, dim, exact = state
    name, args, kwargs = op_call(gm, node)  # type: ignore[misc]  # _flattening was checked
    if name in ("view", "reshape"):
        if not _batch_view(node, view_sizes(args, kwargs)) or rank < 2:
            return f"{node.name} is not a view(x.size(0), -1) of the tensor it reads"
        start, end = 1, rank - 1
    else:
        a = bound_args("flatten", args, kwargs)
        ends = (dim_of(a["start_dim"], rank), dim_of(a["end_dim"], rank)) if a is not None else ("", "")
        if a is None or isinstance(ends[0], str) or isinstance(ends[1], str):
            return f"{node.name} flattens dims fxnorm does not read"
        if ends[0] is None or ends[1] is None or ends[0] > ends[1]:
            return None
        start, end = ends  # type: ignore[assignment]
    if dim < start or dim > end:
        return rank - (end - start), dim if dim < start else dim - (end - start), exact
    if dim == start and end == rank - 1:
        return rank - (end - start), dim, exact and start == end
    return f"{node.name} does not flatten the channel dim with every dim after it"


def _step(gm: fx.GraphModule, node: fx.Node, state: State, positive: bool) -> State | str | None:
    """The state after ``node``: a pooling, a mean or a flatten (None: it raises at this rank)."""
    rank, dim, exact = state
    pool = _pool(gm, node)
    if isinstance(pool, str):
        return pool
    if pool is None:
        return _averaged(node, state) if _mean(node) else _flattened(gm, node, state)
    name, n, needs_positive = pool
    if rank != n + 2:
        return f"{name} receives a rank-{rank} tensor: unbatched, it would pool across channels"
    if not exact or dim != 1:
        return f"{name} does not pool the norm's channels one by one"
    if needs_positive and not positive:
        return f"{name} takes maxima, which commute with the norm only when every scale is positive"
    return state


def follow_to_linear(gm: fx.GraphModule, norm: fx.Node, chain: list[fx.Node], norm_dims: dict[int, int | None],
                     channels: int, in_features: int, positive: bool) -> int | str:
    """How many consecutive input features of the Linear each norm channel covers (``repeat``: feature
    ``f`` is channel ``f // repeat``) when, at every rank the norm's output can have, ``chain`` takes
    its channels to the Linear's last dim that way; else why not. ``positive``: every scale of the
    norm is positive (max pooling commutes only then)."""
    known = rank_of(gm, norm)
    ranks = [known] if known is not None else sorted(r for r, d in norm_dims.items() if d is not None)
    if in_features % channels:
        return f"it has {in_features} inputs, not a multiple of the norm's {channels} channels"
    cases = 0
    for rank in ranks:
        dim = norm_dims.get(rank)
        if dim is None:
            return f"at rank {rank} the norm has no channel dim"
        state: State | str | None = (rank, dim, True)
        for node in chain:
            state = _step(gm, node, state, positive)  # type: ignore[arg-type]
            if not isinstance(state, tuple):
                break
        if isinstance(state, str):
            return state + ("" if known is not None else " (pass example_inputs to record shapes)")
        if state is None:
            continue
        cases += 1
        out, last, exact = state
        if last != out - 1 or (exact and in_features != channels):
            return (f"at rank {rank} the norm's channels do not become its features through "
                    f"{', '.join(n.name for n in chain)}")
    if not cases:
        return f"no rank of {norm.name} reaches it through {', '.join(n.name for n in chain)}"
    return in_features // channels
