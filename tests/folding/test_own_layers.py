"""Conv/linear subclasses with their own forward (fxnorm.folding.own_layers, issue 16): a
TF-"same" padding conv (pad, then ``F.conv2d(x, self.weight, self.bias, ...)``) takes the fold of
the norm after it; a masked or binarized weight refuses it. Float64, exact to 1e-9."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import fold_exactly, randomize_norms

from fxnorm import FoldReport, fold

pytestmark = pytest.mark.usefixtures("one_thread")


class SameConv(nn.Conv2d):
    """TF "same" padding for a known image size (EfficientNet's Conv2dStaticSamePadding): pad
    asymmetrically for the stride, then an unpadded conv."""

    def __init__(self, *args, image_size: int = 9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        (k, _), (s, _) = self.kernel_size, self.stride
        pad = max((-(-image_size // s) - 1) * s + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSameConv(nn.Conv2d):
    """TF "same" padding computed from the input's shape with Python's max (timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaskedConv(nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.5).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class BinaryConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, torch.sign(self.weight), self.bias, self.stride, self.padding)


class TwoConvCalls(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.weight, None), self.weight, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * 0.5, self.weight, self.bias)


def folded_report(model: nn.Module, x: torch.Tensor) -> FoldReport:
    model = randomize_norms(model, seed=11).double().eval()
    return fold_exactly(model, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_same_padding_conv_folds(bias, stride):
    model = nn.Sequential(SameConv(3, 6, 3, stride=stride, bias=bias), nn.BatchNorm2d(6), nn.ReLU())
    report = folded_report(model, torch.randn(2, 3, 9, 9))
    assert [(f.name, f.mode, f.into) for f in report.folded] == [("1", "into_producer", "0")]
    folded = fold(model.eval())
    assert type(folded[0]) is SameConv  # drop-in: the subclass and its forward stay


def test_linear_subclass_preparing_its_input_folds():
    report = folded_report(nn.Sequential(ScaledLinear(4, 6), nn.BatchNorm1d(6)), torch.randn(5, 4))
    assert [(f.name, f.into) for f in report.folded] == [("1", "0")]


@pytest.mark.parametrize("layer, why", [
    (MaskedConv(3, 4, 3), "weight computed in its forward (mul)"),
    (BinaryConv(3, 4, 3), "weight computed in its forward (sign)"),
    (TwoConvCalls(4, 4, 1), "2 conv/linear calls"),
])
def test_computed_weights_refuse(layer, why):
    report = folded_report(nn.Sequential(layer, nn.BatchNorm2d(4)), torch.randn(2, layer.in_channels, 7, 7))
    assert not report.folded
    assert why in report.skipped[0].reason, report.skipped[0].reason


def test_padding_computed_with_python_control_flow_is_not_traced():
    """Known limit: Python's max() on a traced shape stops the trace; the norm stays, and says why."""
    report = folded_report(nn.Sequential(DynamicSameConv(3, 4, 3, stride=2), nn.BatchNorm2d(4)), torch.randn(2, 3, 9, 9))
    assert not report.folded
    assert "control flow" in report.skipped[0].reason
