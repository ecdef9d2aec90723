"""Record tensor shapes in the graphs of a traced model from one run on example inputs, so that
folds that depend on ranks are decided from facts (a Linear followed by BatchNorm1d folds only when
the Linear's output is 2-D).

Whole-model graphs run through ``torch.fx.passes.shape_prop.ShapeProp``. For a partly traced model
the inputs of every traced part are captured with forward pre-hooks during one ``no_grad`` run of the
model, then each part is shape-propagated on what it received. A node whose rank differs between
calls of a part (a part called on inputs of several ranks) keeps no shape: its rank stays unknown.
Buffers changed by the run (running stats of norms in training mode) are put back.

Example:
    >>> import torch, torch.nn as nn, fxnorm
    >>> gm = fxnorm.trace(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval())
    >>> record_shapes(gm, (torch.randn(2, 4),))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    [(2, 3), (2, 3)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import FoldError
from .tracing import graph_parts

__all__ = ["record_shapes"]

_MAX_CALLS = 4  #: calls of one part that are shape-propagated (more only cost time)


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


def _ranks(gm: fx.GraphModule) -> dict[fx.Node, int | None]:
    out: dict[fx.Node, int | None] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        out[node] = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return out


def _propagate(gm: fx.GraphModule, calls: list[tuple]) -> None:
    seen: dict[fx.Node, set[int | None]] = {}
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    first: dict[fx.Node, Any] = {}
    for i, args in enumerate(calls):
        ShapeProp(gm).propagate(*args)
        for node, rank in _ranks(gm).items():
            seen.setdefault(node, set()).add(rank)
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
    """Store ``node.meta["tensor_meta"]`` in every graph of ``traced`` from one run on ``example_inputs``.

    Raises:
        FoldError: the model does not run on ``example_inputs`` (its buffers are restored first).

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
            for handle in handles:
                handle.remove()
            handles = []
        for _, gm in parts:
            if calls[id(gm)]:
                _propagate(gm, calls[id(gm)])
    except Exception as err:
        raise FoldError(f"example_inputs do not run through {type(traced).__name__}: {type(err).__name__}: "
                        f"{err}; pass a tuple of the positional arguments model(*example_inputs) accepts") from err
    finally:
        for handle in handles:
            handle.remove()
        for buf, value in saved:
            buf.copy_(value)
