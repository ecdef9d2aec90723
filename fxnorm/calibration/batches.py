"""Calibration batches: where they go and how the model is called with them.

Example:
    >>> import torch
    >>> batch = to_device({"x": torch.zeros(2), "mask": [torch.ones(1)]}, torch.device("cpu"))
    >>> sorted(batch), batch_size((torch.zeros(5, 3),), {})
    (['mask', 'x'], 5)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..errors import DataError

__all__ = ["model_device", "to_device", "default_forward", "batches_of", "batch_size"]


def model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any, index: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict) and batch and all(isinstance(k, str) for k in batch):
        return model(**batch)
    empty = " (empty)" if not batch else ""
    raise DataError(f"batch {index} is a {type(batch).__name__}{empty}: fxnorm runs a tensor, "
                    "a tuple/list whose first item is the input, or a dict of keyword inputs; pass "
                    "forward=lambda model, batch: ... for anything else")


def batches_of(data: Any) -> Iterable[Any]:
    if data is None:
        raise DataError("data is None: pass an iterable of calibration batches (a DataLoader, a list of tensors...)")
    if isinstance(data, (torch.Tensor, dict)):
        return [data]  # one batch
    try:
        return iter(data)
    except TypeError:
        raise DataError(f"data must be an iterable of batches, got a {type(data).__name__}") from None



def batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else 1
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return len(value)
    return 0
