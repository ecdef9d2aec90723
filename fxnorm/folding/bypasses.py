"""Folded norms bypassed in the parts' own graphs while :func:`fxnorm.folding.planner.plan_folds`
simulates its folds, then put back exactly: the rules read each graph as it is after the folds made so
far (a fold can enable another: conv -> bn -> bn) without a copy of it.

A bypassed norm node is the identity: its users read its input instead, and it reads nothing (what
``replace_all_uses_with`` and ``erase_node`` do), but it stays in the node list, where no rule looks
(the rules walk ``args`` and ``users``). :meth:`Bypasses.restore` puts back every argument it changed
and the order of every ``users`` dict those changes touched, so the graphs are left as they were.

Example:
    >>> import torch.fx as fx, torch.nn as nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU()))
    >>> x, conv, bn, relu, out = gm.graph.nodes
    >>> with Bypasses() as bypasses:
    ...     bypasses.bypass(bn, conv)
    ...     relu.args[0] is conv, list(bn.users), list(conv.users) == [relu]
    (True, [], True)
    >>> relu.args[0] is bn, list(bn.users) == [relu], list(conv.users) == [bn]
    (True, True, True)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch.fx as fx

__all__ = ["Bypasses"]

#: the ``args``/``kwargs`` properties of a node: their setters keep every ``users`` dict up to date
#: (``node.args = ...`` also goes through ``Node.__setattr__``, which re-files the node in its graph's
#: ``find_nodes`` table: a change of order there that a restore would not undo)
_ARGS: Any = vars(fx.Node)["args"]
_KWARGS: Any = vars(fx.Node)["kwargs"]


def _set_inputs(node: fx.Node, args: Any, kwargs: Any) -> None:
    _ARGS.__set__(node, args)
    _KWARGS.__set__(node, kwargs)


class Bypasses:
    """The norm nodes bypassed so far, with what each bypass changed (a context manager: leaving it
    restores the graphs)."""

    def __init__(self) -> None:
        #: per bypass: (node, args, kwargs) before it, and (node, its users in order) it may reorder
        self._undo: list[tuple[list[tuple[fx.Node, Any, Any]], list[tuple[fx.Node, list[fx.Node]]]]] = []

    def bypass(self, node: fx.Node, replacement: fx.Node | None) -> None:
        """Make ``node`` the identity: its users read ``replacement`` (its input), it reads nothing."""
        users = list(node.users)
        touched = dict.fromkeys([node, *node.all_input_nodes, *(n for u in users for n in u.all_input_nodes)])
        self._undo.append(([(n, n.args, n.kwargs) for n in (*users, node)], [(n, list(n.users)) for n in touched]))

        def swap(value: fx.Node) -> fx.Node | None:
            return replacement if value is node else value

        for user in users:
            _set_inputs(user, fx.map_arg(user.args, swap), fx.map_arg(user.kwargs, swap))
        _set_inputs(node, fx.map_arg(node.args, lambda _: None), fx.map_arg(node.kwargs, lambda _: None))

    def restore(self) -> None:
        """Undo every bypass, the last first: arguments, then the order of the ``users`` dicts."""
        while self._undo:
            inputs, users = self._undo.pop()
            for node, args, kwargs in inputs:
                _set_inputs(node, args, kwargs)
            for node, order in users:
                node.users.clear()
                node.users.update(dict.fromkeys(order))

    def __enter__(self) -> Bypasses:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.restore()
