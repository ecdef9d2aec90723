"""Calibration batches: where they go and how the model is called with them.

Example:
    >>> import torch
    >>> batch = to_device({"x": torch.zeros(2), "mask": [torch.ones(1)]}, torch.device("cpu"))
    >>> sorted(batch), batch_size((torch.zeros(5, 3),), {})
    (['mask', 'x'], 5)
"""

from __future__ import annotations

import inspect
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
    """Run ``model`` on one batch: a tensor (``model(batch)``), a tuple/list whose first item is the
    input (``model(batch[0])``), or a dict of keyword inputs (``model(**batch)``).

    Raises:
        DataError: a batch of another kind, or one that does not fit the model's ``forward`` (a dict
            with a key it does not take, a missing argument): pass ``forward=`` to say how a batch is fed.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> default_forward(net, {"input": torch.zeros(3, 2)}, 0).shape
        torch.Size([3, 1])
        >>> default_forward(net, {"input": torch.zeros(3, 2), "labels": torch.zeros(3)}, 4)
        Traceback (most recent call last):
        ...
        fxnorm.errors.DataError: batch 4 is a dict with keys ['input', 'labels'], which does not fit Linear.forward(input) (got an unexpected keyword argument 'labels'): pass forward=lambda model, batch: ... to say how a batch is fed to the model, e.g. forward=lambda model, batch: model(batch['input'])
    """
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if isinstance(batch, torch.Tensor):
        args, what = (batch,), "a tensor"
    elif isinstance(batch, (tuple, list)) and batch:
        args, what = (batch[0],), f"a {type(batch).__name__} whose first item is the input"
    elif isinstance(batch, dict) and batch and all(isinstance(k, str) for k in batch):
        kwargs, what = dict(batch), f"a dict with keys {sorted(batch)}"
    else:
        empty = " (empty)" if not batch else ""
        raise DataError(f"batch {index} is a {type(batch).__name__}{empty}: fxnorm runs a tensor, "
                        "a tuple/list whose first item is the input, or a dict of keyword inputs; pass "
                        "forward=lambda model, batch: ... for anything else")
    _check_fit(model, args, kwargs, index, what)
    return model(*args, **kwargs)


def _check_fit(model: nn.Module, args: tuple, kwargs: dict[str, Any], index: int, what: str) -> None:
    """A batch whose arguments cannot bind to ``model.forward`` is the data's fault, not the model's."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or an unusual callable: let the call itself decide
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        example = f"model(batch[{next(iter(kwargs))!r}])" if kwargs else "model(*batch)"
        params = ", ".join(str(p.replace(annotation=inspect.Parameter.empty, default=inspect.Parameter.empty))
                           for p in signature.parameters.values())
        raise DataError(f"batch {index} is {what}, which does not fit {type(model).__name__}.forward({params}) "
                        f"({err}): pass forward=lambda model, batch: ... to say how a batch is fed to the model, "
                        f"e.g. forward=lambda model, batch: {example}") from None


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
