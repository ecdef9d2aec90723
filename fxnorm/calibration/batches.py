"""Calibration batches: where they go and how the model is called with them.

Example:
    >>> import torch
    >>> batch = to_device({"x": torch.zeros(2), "mask": [torch.ones(1)]}, torch.device("cpu"))
    >>> sorted(batch), batch_size((torch.zeros(5, 3),), {})
    (['mask', 'x'], 5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import CalibrationError, DataError, FxNormError, StopForward

if TYPE_CHECKING:  # the session's engine imports this module
    from .session import RecalibrationSession

__all__ = ["model_device", "to_device", "default_forward", "batches_of", "batch_size", "check_arguments",
           "run_batches"]


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


def check_arguments(num_batches: int | None, forward: Callable[[nn.Module, Any], Any] | None) -> None:
    """``num_batches`` and ``forward`` as :func:`fxnorm.recalibrate` takes them (raises otherwise)."""
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise DataError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if forward is not None and not callable(forward):
        raise CalibrationError(f"forward must be callable as forward(model, batch), got {type(forward).__name__}")


def run_batches(session: RecalibrationSession, batches: Iterable[Any], num_batches: int | None,
                 device: torch.device, forward: Callable[[nn.Module, Any], Any] | None, progress: bool,
                 total: int | None) -> int:
    """Run the batches through the session's model, each as one calibration forward under
    ``torch.inference_mode``; returns how many ran."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="recalibrate", unit="batch")
    index = 0
    model = session.model
    try:
        iterator = iter(batches)
        while num_batches is None or index < num_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception as err:
                raise DataError(f"reading calibration batch {index} failed: {type(err).__name__}: {err}; "
                                "the model is unchanged") from err
            batch = to_device(batch, device)
            try:
                with torch.inference_mode(), session.batch():
                    if forward is None:
                        default_forward(model, batch, index)
                    else:
                        forward(model, batch)
            except StopForward:  # everything this pass runs for was gathered
                pass
            except FxNormError:
                raise
            except Exception as err:
                raise CalibrationError(f"batch {index}: the model raised {type(err).__name__}: {err}; "
                                       "the model is unchanged") from err
            index += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return index
