"""Ranks from example inputs (fxnorm.graph.shapes.record_shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxnorm
from fxnorm.errors import FxNormError
from fxnorm.graph.shapes import record_shapes, recorded_rank


@fx.wrap
def window_sizes(window: list[int], size: list[int]) -> list[int]:
    """Mutates its list argument, as torchvision's swin3d ``_get_window_and_shift_size`` does."""
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


class Windowed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = window_sizes([8, 8], [x.shape[2], x.shape[3]])
        return self.bn(self.conv(x))[..., : sizes[0], : sizes[1]]


def _ranks(gm: fx.GraphModule) -> dict[str, int | None]:
    return {n.name: recorded_rank(n) for n in gm.graph.nodes if n.op == "call_module"}


def test_functions_that_mutate_their_list_arguments_propagate():
    gm = fxnorm.trace(Windowed().eval())
    record_shapes(gm, (torch.randn(2, 3, 5, 6),))
    assert _ranks(gm) == {"conv": 4, "bn": 4}
    # the graph's own literals are untouched: the next propagation sees [8, 8] again
    record_shapes(gm, (torch.randn(2, 3, 9, 9),))
    assert gm(torch.randn(1, 3, 9, 9)).shape == (1, 4, 8, 8)


def test_ranks_seen_differently_across_calls_are_dropped():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    gm = fxnorm.trace(Twice())
    record_shapes(gm, (torch.randn(3, 5, 4),))
    assert _ranks(gm) == {"lin": 3}


def test_inputs_that_do_not_run_name_the_node_and_remedy_print_nothing_and_restore_buffers(capfd, caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    gm = fxnorm.trace(model)
    before = model[1].running_mean.clone()
    with pytest.raises(FxNormError, match=r"(?s)example_inputs do not run through Sequential: RuntimeError: mat1 and mat2 .*at node _0.*positional arguments"):
        record_shapes(gm, (torch.randn(3, 5),))
    assert torch.equal(model[1].running_mean, before)
    assert capfd.readouterr().err == "" and not [r for r in caplog.records if r.levelname == "ERROR"]
