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
    return copy.deepcopy(model, memo)


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
