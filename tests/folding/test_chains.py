"""Folds through what stands between a producer and its norm (fxnorm.folding.chains, issue 16):
producers joined by ``torch.cat`` along the channel dim, each taking its slice of the norm; and a
Linear whose output is reshaped/flattened to ``(N*L, C)`` (or transposed) for a BatchNorm1d and back.
Float64, exact to 1e-9 against the unfolded model, or refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import randomize_norms, rel_err

from fxnorm import FoldReport, find_norms, fold, report_of

pytestmark = pytest.mark.usefixtures("one_thread")


def folded_report(model: nn.Module, x: torch.Tensor, example: bool = True) -> FoldReport:
    """Fold a float64 copy; the output matches to 1e-9 and find_norms predicted the fold."""
    model = randomize_norms(model, seed=3).double().eval()
    x = x.double()
    kwargs = {"example_inputs": (x,)} if example else {}
    with torch.no_grad():
        ref = model(x)
        predicted = {s.name: (s.fold, s.fold_into) for s in find_norms(model, **kwargs) if s.fold}
        folded = fold(model, **kwargs)
        err = rel_err(folded(x), ref)
    assert err < 1e-9, f"relative error {err}"
    report = report_of(folded, FoldReport)
    assert predicted == {f.name: (f.mode, f.into) for f in report.folded}
    return report


def reason(report: FoldReport, name: str) -> str:
    return next(s.reason for s in report.skipped if s.name == name)


class Concat(nn.Module):
    """``bn(cat([conv_a(x), conv_b(x), ...], dim))``, a producer's output maybe read again."""

    def __init__(self, layers: list[nn.Module], channels: int, dim: int = 1, reread: bool = False,
                 norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.bn = norm(channels)
        self.dim, self.reread = dim, reread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [layer(x) for layer in self.layers]
        y = self.bn(torch.cat(outs, self.dim))
        return y + outs[0].mean() if self.reread else y


@pytest.mark.parametrize("example", [True, False])
@pytest.mark.parametrize("dim", [1, -3])
def test_concatenated_convs_each_take_their_channels(dim, example):
    model = Concat([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1, bias=False),
                    nn.Conv2d(3, 3, 1, groups=3)], 12, dim)
    report = folded_report(model, torch.randn(2, 3, 6, 6), example)
    assert [(f.name, f.mode, f.into) for f in report.folded] == [("bn", "into_producer", "layers.0, layers.1, layers.2")]


def test_concatenated_linears_and_transposed_convs_fold():
    report = folded_report(Concat([nn.Linear(3, 2), nn.Linear(3, 4)], 6, norm=nn.BatchNorm1d), torch.randn(5, 3))
    assert report.folded[0].into == "layers.0, layers.1"
    report = folded_report(Concat([nn.ConvTranspose2d(3, 2, 2, stride=2), nn.ConvTranspose2d(3, 2, 2, stride=2)], 4),
                           torch.randn(2, 3, 4, 4))
    assert report.folded[0].into == "layers.0, layers.1"


def test_concatenation_refusals():
    x = torch.randn(2, 3, 6, 6)
    report = folded_report(Concat([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1)], 9, reread=True), x)
    assert "layers.0 output also used by" in reason(report, "bn")
    report = folded_report(Concat([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)], 4, dim=2), x)
    assert "concatenates 8 channels, the norm has 4" in reason(report, "bn")
    report = folded_report(Concat([nn.Conv2d(3, 4, 1), nn.ReLU()], 7), x)
    assert "is not a conv/linear" in reason(report, "bn")
    # (N, L, C) linears concatenated on the last dim reach BatchNorm1d's dim 1 as L, not as channels
    report = folded_report(Concat([nn.Linear(3, 2), nn.Linear(3, 2)], 4, dim=-1, norm=nn.BatchNorm1d),
                           torch.randn(5, 4, 3))
    assert "do not stay the norm's channels" in reason(report, "bn")


@pytest.mark.parametrize("example", [True, False])
def test_linears_joined_along_the_sequence_dim_are_refused(example):
    """(N, L, C) Linear outputs joined along dim 1 give BatchNorm1d 2L "channels" that are positions,
    not the Linears' features (found by the fuzzer: without shapes only rank 2 was checked)."""
    model = Concat([nn.Linear(2, 3), nn.Linear(2, 3)], 6, norm=nn.BatchNorm1d)
    report = folded_report(model, torch.randn(5, 3, 2), example)
    assert not report.folded
    assert "channels" in reason(report, "bn")


def test_linears_joined_on_2d_inputs_fold_with_recorded_shapes_only():
    model = Concat([nn.Linear(2, 3), nn.Linear(2, 3)], 6, norm=nn.BatchNorm1d)
    assert folded_report(model, torch.randn(5, 2)).folded[0].into == "layers.0, layers.1"
    report = folded_report(model, torch.randn(5, 2), example=False)  # rank 3 would join positions
    assert "(pass example_inputs to record shapes)" in reason(report, "bn")


class CatOneLayerTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv(x), self.conv(2 * x)], 1))


def test_one_layer_concatenated_twice_is_refused():
    report = folded_report(CatOneLayerTwice(), torch.randn(2, 3, 5, 5))
    assert "called at 2 sites" in reason(report, "bn")


class Tokens(nn.Module):
    """Linear on (N, L, C), then BatchNorm1d over the C features by some rearrangement and back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.linear, self.bn, self.how = nn.Linear(6, 8), nn.BatchNorm1d(8), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        y = self.linear(x)
        if self.how == "reshape":
            return self.bn(y.reshape(n * length, -1)).reshape(n, length, -1)
        if self.how == "flatten":
            return self.bn(y.flatten(0, 1)).unflatten(0, (n, length))
        if self.how == "transpose":
            return self.bn(y.transpose(1, 2)).transpose(1, 2)
        return self.bn(y.flatten(1))  # "features": (N, L*C) reaches the norm, L*C != C


@pytest.mark.parametrize("how", ["reshape", "flatten", "transpose"])
def test_linear_reshaped_for_batchnorm1d_folds(how):
    report = folded_report(Tokens(how), torch.randn(2, 5, 6))
    assert [(f.name, f.mode, f.into) for f in report.folded] == [("bn", "into_producer", "linear")]


def test_reshape_that_mixes_the_channels_is_refused():
    model = Tokens("features")
    model.bn = nn.BatchNorm1d(40)
    report = folded_report(model, torch.randn(2, 5, 6))
    assert "producer linear has 8 outputs, the norm 40" in reason(report, "bn")
