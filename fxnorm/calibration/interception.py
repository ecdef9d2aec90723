"""Catching the norm computation itself: a ``TorchFunctionMode`` that answers the ``batch_norm`` and
``instance_norm`` calls made with the running buffers of a chosen norm.

While a recalibration forward runs, :class:`NormInterceptor` sees every torch function call of the
model. A call of ``F.batch_norm``, ``torch.batch_norm``, ``F.instance_norm`` or
``torch.instance_norm`` whose ``running_mean`` and ``running_var`` are *the* buffers of a chosen norm
(compared by identity) is answered by the observer of that norm; every other call runs unchanged.
That covers a plain ``BatchNorm2d``, a subclass with its own ``forward`` (BN + activation, a
transpose to ``(N, L, C)``, a split batch) and a functional call with a norm's buffers in any
module's forward, without replacing or tracing anything. The arguments are read with the layouts of
:mod:`fxnorm.graph.calls` (``torch.batch_norm`` takes weight and bias *before* the statistics).

The mode is cheap on every other call: one dictionary lookup of the called function.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> bn = nn.BatchNorm1d(2).eval()
    >>> seen = []
    >>> def answer(target, kind, bound):
    ...     seen.append((target, kind, bound["eps"]))
    ...     return bound["input"]
    >>> with NormInterceptor({id(bn.running_mean): ("bn", bn.running_mean, bn.running_var)}, answer):
    ...     _ = bn(torch.randn(4, 2))
    ...     _ = F.relu(torch.randn(3))                       # runs as usual
    >>> seen
    [('bn', 'batch_norm', 1e-05)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..graph.calls import bind

__all__ = ["INTERCEPTED", "NormInterceptor", "remove_mode"]

T = TypeVar("T")

#: The functions whose calls are matched against the chosen norms' buffers, and their kind.
INTERCEPTED: dict[Callable[..., Any], str] = {
    F.batch_norm: "batch_norm",
    torch.batch_norm: "batch_norm",
    F.instance_norm: "instance_norm",
    torch.instance_norm: "instance_norm",
}


class NormInterceptor(TorchFunctionMode, Generic[T]):
    """Answers the norm calls made with the buffers in ``targets`` with ``answer``.

    ``targets`` maps ``id(running_mean)`` to ``(target, running_mean, running_var)``; ``answer(target,
    kind, bound)`` gets the target, ``"batch_norm"`` or ``"instance_norm"`` and the call's arguments
    by ``F.batch_norm`` name (``use_input_stats`` of an instance norm is given as ``training``), and
    returns the call's result.
    """

    def __init__(self, targets: dict[int, tuple[T, torch.Tensor, torch.Tensor]],
                 answer: Callable[[T, str, dict[str, Any]], Any]) -> None:
        super().__init__()
        self.targets = targets
        self.answer = answer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            kind = INTERCEPTED.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is None:
            return func(*args, **(kwargs or {}))
        bound = bind(func, args, kwargs or {})
        found = self.targets.get(id(bound["running_mean"])) if bound is not None else None
        if found is None or bound is None or found[1] is not bound["running_mean"] \
                or found[2] is not bound["running_var"]:
            return func(*args, **(kwargs or {}))
        if "use_input_stats" in bound:
            bound["training"] = bound.pop("use_input_stats")
        return self.answer(found[0], kind, bound)


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's torch-function mode stack wherever it is (the modes above it
    are put back in their order). Returns whether it was there.

    Example:
        >>> mode = NormInterceptor({}, lambda *a: None)
        >>> _ = mode.__enter__()
        >>> remove_mode(mode), remove_mode(mode)
        (True, False)
    """
    above = []
    found = False
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            found = True
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    return found
