"""Running models for the ``fxnorm`` command: a forward whose failure names the layer it failed in,
and the relative error ``fxnorm fold --check`` compares against its tolerance.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    >>> run_model(model, (torch.randn(1, 5, 2, 2),), "running the model")
    Traceback (most recent call last):
    ...
    fxnorm.errors.FxNormError: running the model failed in layer 0 (Conv2d): RuntimeError: Given groups=1, ...
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import FxNormError
from .console import cause_of

__all__ = ["run_model"]


def run_model(model: nn.Module, inputs: tuple, what: str, remedy: str = "") -> Any:
    """``model(*inputs)`` without gradients; a failure becomes one :class:`~fxnorm.errors.FxNormError`
    line: ``{what} failed in layer NAME (Type): Error: message; {remedy}``.

    The layer is the innermost submodule that was running when the error was raised.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if running and running[-1] is module:
            running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as err:
        where = ""
        if running:
            layer = running[-1]
            where = f" in layer {names.get(id(layer)) or '<model>'} ({type(layer).__name__})"
        raise FxNormError(f"{what} failed{where}: {cause_of(err)}" + (f"; {remedy}" if remedy else "")) from err
    finally:
        for handle in handles:
            handle.remove()
