"""Copy a model for folding without copying what folding replaces anyway.

:func:`fxnorm.fold` works on a copy of the user's model. A plain ``copy.deepcopy`` copies every conv
and linear weight, and folding then replaces most of them by new tensors: :func:`copy_sharing_layers`
leaves those tensors shared, and :func:`unshare` deep-copies the ones the folded model still uses,
so the result shares nothing with the user's model (ties inside the copy are kept). Nothing here
writes into a shared tensor.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    >>> shared = {}
    >>> copied = copy_sharing_layers(model, shared)
    >>> copied[0].weight is model[0].weight, len(shared)
    (True, 2)
    >>> unshare(copied, shared)
    >>> copied[0].weight is model[0].weight, bool((copied[0].weight == model[0].weight).all())
    (False, True)
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

from ..graph.kinds import layer_kind

__all__ = ["copy_sharing_layers", "unshare"]


def copy_sharing_layers(model: nn.Module, shared: dict[int, torch.Tensor]) -> nn.Module:
    """``copy.deepcopy(model)`` that does not copy the weights and biases of conv/linear layers: most
    of them are replaced by folded ones anyway. Those are left shared and recorded in ``shared``;
    :func:`unshare` copies the ones still in use once folding is done."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if layer_kind(module) is None:
            continue
        for t in module._parameters.values():
            if isinstance(t, torch.Tensor) and not is_lazy(t):
                memo[id(t)] = t
                shared[id(t)] = t
    return _deepcopy(model, memo)


_ATOMIC = frozenset({bool, int, float, str, type(None)})
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")


def _default_copy(module: nn.Module) -> bool:
    """True when ``copy.deepcopy`` copies ``module`` the default way: ``cls.__new__(cls)``, then
    ``__setstate__`` (the class's own, convs have one) of a deep copy of ``nn.Module.__getstate__()``."""
    cls = type(module)
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and not any(k in module.__dict__ for k in _COPY_HOOKS)
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__ and cls.__new__ is object.__new__
            and getattr(cls, "__getnewargs_ex__", None) is None and getattr(cls, "__getnewargs__", None) is None)


def _keep_alive(x: Any, memo: dict[int, Any]) -> None:
    """What ``copy.deepcopy`` does with every object it copies: keep it alive as long as ``memo``, so
    that its ``id`` stays unique."""
    memo.setdefault(id(memo), []).append(x)


def _deepcopy(x: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(x, memo)``, faster for modules copied the default way: their empty hook tables
    (a dozen ``OrderedDict`` s per module), empty sets and child tables are made directly instead of
    through ``__reduce_ex__``. Same objects, same sharing, same memo."""
    found = memo.get(id(x), memo)
    if found is not memo:
        return found
    if not isinstance(x, nn.Module) or not _default_copy(x):
        return copy.deepcopy(x, memo)
    y = type(x).__new__(type(x))
    memo[id(x)] = y
    _keep_alive(x, memo)
    state = {}
    for key, value in x.__getstate__().items():
        if type(value) in _ATOMIC or (type(value) is tuple and all(type(v) in _ATOMIC for v in value)):
            state[key] = value  # deepcopy returns these themselves, and does not memo them
        elif id(value) in memo:
            state[key] = memo[id(value)]
        elif type(value) is OrderedDict and not value and not value.__dict__:
            state[key] = memo[id(value)] = OrderedDict()
            _keep_alive(value, memo)
        elif type(value) is set and not value:
            state[key] = memo[id(value)] = set()
            _keep_alive(value, memo)
        elif key == "_modules" and type(value) is dict:
            children = state[key] = memo[id(value)] = {}
            _keep_alive(value, memo)
            for name, child in value.items():
                children[name] = _deepcopy(child, memo)
        else:
            state[key] = copy.deepcopy(value, memo)
    y.__setstate__(state)
    return y


def unshare(result: nn.Module, shared: dict[int, torch.Tensor]) -> None:
    """Replace every tensor of ``result`` still shared with the user's model by a deep copy (ties
    inside ``result`` are kept: one copy per tensor)."""
    if not shared:
        return
    copies: dict[int, torch.Tensor] = {}
    for module in result.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and id(t) in shared and shared[id(t)] is t:
                    if id(t) not in copies:
                        copies[id(t)] = copy.deepcopy(t)
                    store[key] = copies[id(t)]  # type: ignore[assignment]  # a Parameter's deepcopy is one
