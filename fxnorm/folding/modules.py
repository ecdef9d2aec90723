"""The modules a fold may put in a model: :class:`ChannelAffine` (a batch norm that could not fold,
with ``standalone="affine"``) and :class:`NormRemainder` (what remains of a norm subclass whose
forward did more than normalize).

Example:
    >>> m = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
    >>> m(torch.ones(1, 2, 1, 1)).flatten().tolist()
    [2.0, 4.0]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .forwards import GraphProgram, run_program

__all__ = ["ChannelAffine", "NormRemainder"]


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1): what an unfoldable eval-mode batch norm computes.

    ``scale``/``shift`` are buffers kept in float32 (float64 for a float64 norm); the output has the
    input's dtype. Traceable by ``torch.fx`` (it broadcasts over the last dim of ``x.transpose(1, -1)``).

    Example:
        >>> m = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
        >>> m(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [2.0, 4.0]
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.get_buffer("scale"), self.get_buffer("shift")
        t = x.transpose(1, -1)
        return (t * scale.to(x.dtype) + shift.to(x.dtype)).transpose(1, -1)

    def extra_repr(self) -> str:
        return f"{self.get_buffer('scale').numel()}"


class NormRemainder(nn.Module):
    """What remains of a norm subclass once its batch norm folded away: the rest of its forward
    (an activation, a dropout...) with the children and tensors that part uses. Not a norm:
    :func:`fxnorm.find_norms` and :func:`fxnorm.recalibrate` do not see one here.

    Example:
        >>> import torch.fx as fx
        >>> rest = NormRemainder("BNReLU", GraphProgram.from_graph(fx.symbolic_trace(lambda x: x.relu()).graph))
        >>> rest(torch.tensor([-2.0, 2.0])).tolist(), rest
        ([0.0, 2.0], NormRemainder(of BNReLU))
    """

    def __init__(self, of: str, program: GraphProgram) -> None:
        super().__init__()
        self.of = of
        self.program = program

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return run_program(self.program, self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"of {self.of}"
