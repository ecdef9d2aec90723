"""fold(model, merge_branches=True) (fxnorm.folding.branches, issue 16): parallel summed conv branches
of one input (RepVGG-style, with or without an identity batch norm) become one conv after folding;
anything else between the input and the sum refuses the merge with its reason. Float64, exact to 1e-9."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn
from helpers import randomize_norms, rel_err

from fxnorm import FoldReport, fold, report_of
from fxnorm.graph.kinds import BN_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: int | None = None) -> nn.Module:
    pad = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn_id(x)]), with traps."""

    def __init__(self, c: int, out: int | None = None, stride: int = 1, groups: int = 1, identity: str = "bn",
                 trap: str = "none") -> None:
        super().__init__()
        out = out or c
        self.dense = conv_bn(c, out, 3, stride, groups)
        self.one = conv_bn(c, out, 1, stride if trap != "stride" else 3, groups)
        self.id = nn.BatchNorm2d(c) if identity == "bn" else nn.Identity() if identity == "module" else None
        self.identity, self.trap = identity, trap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.one(x)
        if self.trap == "relu":
            one = torch.relu(one)
        y = self.dense(x) + one
        if self.id is not None:
            y = y + self.id(x)
        elif self.identity == "input":
            y = y + x
        if self.trap == "reread":
            y = y + one.mean()
        return torch.relu(y)


def merged_report(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[nn.Module, FoldReport]:
    model = randomize_norms(model, seed=13).double().eval()
    x = x.double()
    with torch.no_grad():
        ref = model(x)
        folded = fold(model, merge_branches=True, **kwargs)
        err = rel_err(folded(x), ref)
    assert err < 1e-9, f"relative error {err}"
    return folded, report_of(folded, FoldReport)


@pytest.mark.parametrize("identity", ["bn", "module", "input", "none"])
@pytest.mark.parametrize("groups", [1, 2])
def test_rep_block_merges_into_one_conv(identity, groups):
    model = nn.Sequential(RepBlock(4, groups=groups, identity=identity), RepBlock(4, identity=identity))
    folded, report = merged_report(model, torch.randn(2, 4, 7, 7))
    expected = ["dense", "one"] + ([] if identity == "none" else ["x" if identity == "input" else "id"])
    assert [(m.block, m.branches, m.into) for m in report.merged] == [("0", expected, "dense"), ("1", expected, "dense")]
    assert type(folded[0]) is RepBlock and type(folded[0].one) is nn.Identity
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and not any(type(m) in (nn.BatchNorm2d,) for m in folded.modules())
    assert not report.skipped  # the identity norm that could not fold was merged away
    source = folded[1].forward.args[0].source  # the rewritten forward: one conv call, no sum left
    assert " + " not in source and "self.one" not in source, source
    again = pickle.loads(pickle.dumps(folded))  # the rewritten forward saves and loads
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(again(x), folded(x))


def test_strided_and_widening_blocks_merge_without_identity():
    model = nn.Sequential(RepBlock(4, out=8, stride=2, identity="none"), RepBlock(8, stride=1))
    _, report = merged_report(model, torch.randn(2, 4, 9, 9))
    assert [(m.branches, m.into) for m in report.merged] == [(["dense", "one"], "dense"), (["dense", "one", "id"], "dense")]


def test_identity_as_channel_affine_merges():
    _, report = merged_report(RepBlock(4), torch.randn(2, 4, 6, 6), standalone="affine")
    assert [(m.branches, m.into) for m in report.merged] == [(["dense", "one", "id"], "dense")]


@pytest.mark.parametrize("trap, why", [
    ("relu", "is not a conv, a batch norm"),
    ("reread", "mean (mean) is not a conv, a batch norm"),
])
def test_branches_with_other_ops_are_refused(trap, why):
    folded, report = merged_report(RepBlock(4, trap=trap), torch.randn(2, 4, 6, 6))
    assert [m.into for m in report.merged] == [""] and why in str(report.merged[0].reason)
    assert type(folded.one) is not nn.Identity


def test_different_strides_are_refused():
    model = RepBlock(4, stride=2, identity="none", trap="stride")
    _, report = merged_report(model, torch.randn(2, 4, 2, 2))  # both branches give 1x1 outputs
    assert report.merged[0].into == "" and "differ in stride" in str(report.merged[0].reason)


class Uncentered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=0), conv_bn(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)[..., 1:-1, 1:-1]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3), conv_bn(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x * 2)


class InputFirst(RepBlock):
    """``x + ...`` merges; ``x += ...`` writes into the caller's tensor: refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trap == "iadd":
            x += self.dense(x) + self.one(x)
            return x
        return x + self.dense(x) + self.one(x)


class Hooked(RepBlock):
    def __init__(self) -> None:
        super().__init__(4)
        self.one.register_forward_hook(lambda m, i, o: None)


class RegisteredTwice(RepBlock):
    """The 1x1 branch is also registered under a second name (the merge would empty it there too)."""

    def __init__(self) -> None:
        super().__init__(4)
        self.alias = self.one


@pytest.mark.parametrize("model, why", [
    (Uncentered(), "is not a conv, a batch norm"),
    (RegisteredTwice(), "registered twice"),
    (TwoInputs(), "different inputs"),
    (Hooked(), "hook"),
    (InputFirst(4, trap="iadd"), "written in place by add"),
])
def test_other_refusals_say_why(model, why):
    _, report = merged_report(model, torch.randn(2, 4, 6, 6))
    assert [m.into for m in report.merged] == [""] and why in str(report.merged[0].reason), report.merged


def test_input_first_in_the_sum_merges():
    _, report = merged_report(InputFirst(4), torch.randn(2, 4, 5, 5))
    assert [(m.branches, m.into) for m in report.merged] == [(["x", "dense", "one"], "dense")]


class Untraceable(nn.Module):
    """Traced part by part: the root's control flow stops the whole-model trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y if y.sum() > 0 else -y


def test_a_model_traced_part_by_part_does_not_merge():
    _, report = merged_report(Untraceable(), torch.randn(2, 4, 5, 5))
    assert [m.into for m in report.merged] == [""] and "does not trace as one graph" in str(report.merged[0].reason)


def test_without_the_flag_nothing_merges():
    model = randomize_norms(RepBlock(4)).eval()
    report = report_of(fold(model), FoldReport)
    assert report.merged == [] and any(s.kind in BN_KINDS for s in report.skipped)
    assert report.to_dict()["merged"] == []
