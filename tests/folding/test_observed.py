"""Folds across trace boundaries seen in a recorded run (evidence "observed", fxnorm.folding.observed).

The models reproduce what timm-style libraries do: a conv that pads from the input's shape (TF "same"
padding, so the conv's parent does not trace), followed by a batch norm in code that does not trace
either (control flow on values), so that no graph holds both.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxnorm
from fxnorm.folding.observed import DISAGREED
from helpers import randomize_norms, rel_err


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass padding like TF "same" (reads x.shape: does not trace symbolically)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (k - 1 + (size % 2 == 0) for k, size in zip(self.kernel_size, x.shape[-2:]))
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Same(nn.Module):
    """A plain conv whose parent computes the padding from the input's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = max(3 - x.shape[-1] % 2, 1)
        return self.conv(F.pad(x, [pad // 2] * 4))


class Glue(nn.Module):
    """conv -> bn in eager glue; ``tail`` decides what else happens to the conv's output."""

    def __init__(self, tail: str = "none") -> None:
        super().__init__()
        self.same, self.bn, self.act = Same(), nn.BatchNorm2d(6), nn.ReLU()
        self.tail = tail

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - returns a tensor or a tuple
        if float(x.sum()) < -1e30:  # data-dependent control flow: this forward does not trace
            return x
        y = self.same(x)
        out = self.act(self.bn(y))
        if self.tail == "add":
            return out + y
        if self.tail == "return":
            return out, y
        if self.tail == "noise":
            return out + 1e-2 * torch.rand_like(out)
        return out


def _model(tail: str = "none") -> nn.Module:
    return randomize_norms(Glue(tail), seed=3).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))


def test_eager_conv_bn_folds_with_example_inputs_and_matches_float64():
    model = _model()
    reference = copy.deepcopy(model).double()(_x().double())
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    report = fxnorm.report_of(folded, fxnorm.FoldReport)
    assert [(f.name, f.into, f.evidence) for f in report.folded] == [("bn", "same.conv", "observed")]
    assert isinstance(folded.bn, nn.Identity) and type(folded) is Glue and folded.tail == "none"
    assert rel_err(folded(_x()), reference) < 1e-5
    other = torch.randn(1, 3, 12, 12)  # another input size takes the other padding branch
    assert rel_err(folded(other), copy.deepcopy(model).double()(other.double())) < 1e-5
    assert isinstance(model.bn, nn.BatchNorm2d)  # the input model is untouched


def test_same_pad_conv_subclass_overriding_forward_is_not_a_plain_producer():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = SamePadConv(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if float(x.sum()) > -1e30 else x

    model = randomize_norms(Net(), seed=1).eval()
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    (skipped,) = fxnorm.report_of(folded, fxnorm.FoldReport).skipped
    assert skipped.name == "bn" and "conv/linear" in skipped.reason
    assert rel_err(folded(_x()), model(_x())) == 0.0


def test_without_example_inputs_the_reason_names_the_remedy():
    folded = fxnorm.fold(_model())
    (skipped,) = fxnorm.report_of(folded, fxnorm.FoldReport).skipped
    assert skipped.name == "bn" and "example_inputs" in skipped.reason
    assert isinstance(folded.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("tail", ["add", "return"])
def test_another_reader_of_the_producer_output_blocks_the_fold(tail):
    model = _model(tail)
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    (skipped,) = fxnorm.report_of(folded, fxnorm.FoldReport).skipped
    assert "also read elsewhere" in skipped.reason
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert rel_err(folded(_x()), model(_x())) == 0.0


def test_outputs_that_disagree_take_the_fold_back():
    model = _model("noise")  # the model's own output changes from run to run
    weight = model.same.conv.weight.detach().clone()
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    report = fxnorm.report_of(folded, fxnorm.FoldReport)
    assert report.folded == [] and report.skipped[0].reason == DISAGREED
    assert isinstance(folded.bn, nn.BatchNorm2d) and torch.equal(folded.same.conv.weight, weight)


def test_strict_refuses_observed_folds_and_changes_nothing():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxnorm.FoldError, match=r"bn \(BatchNorm2d\).*seen in the example run"):
        fxnorm.fold(model, example_inputs=(_x(),), strict=True, inplace=True)
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_find_norms_reports_what_fold_does():
    model = _model()
    (site,) = fxnorm.find_norms(model, example_inputs=(_x(),))
    assert (site.name, site.op, site.fold, site.fold_into, site.evidence, site.reason) == (
        "bn", "eager", "into_producer", "same.conv", "observed", None)
    (site,) = fxnorm.find_norms(model)
    assert site.fold is None and "example_inputs" in (site.reason or "")


def test_a_producer_feeding_two_norms_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) < -1e30:
                return x
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    model = randomize_norms(Twice(), seed=2).eval()
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    report = fxnorm.report_of(folded, fxnorm.FoldReport)
    assert report.folded == [] and len(report.skipped) == 2
    assert rel_err(folded(_x()), model(_x())) == 0.0


def test_norms_under_numbered_containers():
    model = nn.Sequential(_model()).eval()  # qualified names start with a digit: "0.bn"
    folded = fxnorm.fold(model, example_inputs=(_x(),))
    (f,) = fxnorm.report_of(folded, fxnorm.FoldReport).folded
    assert (f.name, f.into, f.evidence) == ("0.bn", "0.same.conv", "observed")
    assert rel_err(folded(_x()), model(_x())) < 1e-5
