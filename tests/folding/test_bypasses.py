"""The plan simulates its folds in the traced graphs themselves (fxnorm.folding.bypasses): a folded
norm is bypassed, so the next rule sees the graph after the fold (conv -> bn -> bn folds twice), and
every graph is left exactly as it was: arguments, the order of each node's users, the node list."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxnorm
from fxnorm.folding.bypasses import Bypasses
from fxnorm.folding.planner import plan_folds
from fxnorm.graph.calls import submodule, submodule_tables
from fxnorm.graph.tracing import graph_parts

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(traced: nn.Module) -> list[tuple]:
    """Everything a bypass may change: each node's arguments, users (in order) and inputs."""
    out = []
    for prefix, gm in graph_parts(traced):
        for n in gm.graph.nodes:
            out.append((prefix, n, n.args, n.kwargs, list(n.users), n.all_input_nodes))
    return out


class Branchy(nn.Module):
    """conv -> bn -> bn, a cat of two convs into one bn, a bn whose input is also read elsewhere (it
    folds into its consumer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.a, self.b, self.bn3 = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(5)
        self.side = nn.BatchNorm2d(4)
        self.pre, self.bn4, self.post = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.bn1(self.conv(x)))
        z = self.bn3(torch.cat([self.a(y), self.b(y)], 1))
        u = self.pre(x)
        return z.sum() + self.side(y) + y + self.post(self.bn4(u)) + u


class PartByPart(nn.Module):
    """Untraceable at the top (a data-dependent branch): traced part by part."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Branchy(), Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        return self.second(y[:, :3]) if y.sum() > -1e9 else y


@pytest.mark.parametrize("cls", [Branchy, PartByPart])
def test_planning_leaves_the_graphs_as_they_were(cls):
    model = cls().eval()
    traced = fxnorm.trace(model)
    before = _state(traced)
    plan = plan_folds(model, traced)
    assert _state(traced) == before
    folded = {d.call.name.split(".")[-1]: d.layer_name for d in plan.decisions if d.mode is not None}
    assert folded["bn1"].endswith("conv") and folded["bn2"].endswith("conv")  # bn2 folds once bn1 has
    assert "a" in folded["bn3"] and "b" in folded["bn3"]
    assert folded["bn4"].endswith("post")  # its bypass reorders the users of pre's output: put back


def test_a_bypass_reroutes_the_users_and_restore_puts_everything_back():
    gm = fx.symbolic_trace(Branchy().eval())
    nodes = {n.name: n for n in gm.graph.nodes}
    before = [(n, n.args, n.kwargs, list(n.users)) for n in gm.graph.nodes]
    with pytest.raises(RuntimeError, match="stop"):
        with Bypasses() as bypasses:
            bypasses.bypass(nodes["bn1"], nodes["conv"])
            bypasses.bypass(nodes["bn2"], nodes["conv"])
            assert nodes["a"].args[0] is nodes["conv"] and not nodes["bn1"].users and not nodes["bn2"].users
            assert nodes["bn2"].args == (None,) and list(nodes["conv"].users)[0] is nodes["a"]
            raise RuntimeError("stop")  # an error while simulating: the graphs are restored all the same
    assert [(n, n.args, n.kwargs, list(n.users)) for n in gm.graph.nodes] == before
    gm.graph.lint()


def test_submodule_tables_answer_as_get_submodule_and_nest():
    gm = fx.symbolic_trace(Branchy().eval())
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    with submodule_tables():
        found = [submodule(gm, t) for t in targets]
        with submodule_tables():  # an inner block keeps the outer tables
            assert [submodule(gm, t) for t in targets] == found
    assert found == [gm.get_submodule(t) for t in targets]
    with pytest.raises(AttributeError):
        with submodule_tables():
            submodule(gm, "missing")
