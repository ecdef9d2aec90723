"""A batch norm before a classifier head folds into the Linear (fxnorm.folding.heads, issue 16):
``bn -> flatten -> Linear`` (each channel a block of input features) and ``bn -> pooling -> flatten
-> Linear`` (average pooling without counted zero padding or divisor_override, adaptive average
pooling, ``mean``; max pooling only when every scale is positive). Float64, exact to 1e-9, or
refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import fold_exactly, randomize_norms

from fxnorm import FoldReport, find_norms, fold

pytestmark = pytest.mark.usefixtures("one_thread")


def folded_report(model: nn.Module, x: torch.Tensor, negative: bool = False) -> FoldReport:
    """Fold a float64 copy (``negative``: one norm weight below zero); exact, and predicted by find_norms."""
    model = randomize_norms(model, seed=5).double().eval()
    if negative:
        with torch.no_grad():
            model.bn.weight[0] = -0.7
    return fold_exactly(model, x)


class Head(nn.Module):
    """conv -> relu -> bn -> [pool] -> flatten -> linear: the norm has no producer to fold into."""

    def __init__(self, pool: nn.Module | None, features: int, flatten: str = "module", norm_dim: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[norm_dim]
        self.conv = conv(3, 4, 3)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[norm_dim](4)
        self.pool = pool or nn.Identity()
        self.flatten, self.how = nn.Flatten(), flatten
        self.fc = nn.Linear(features, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.bn(torch.relu(self.conv(x))))
        if self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "mean":
            y = y.mean((2, 3))
        else:
            y = self.flatten(y)
        return self.fc(y)


X = torch.randn(2, 3, 8, 8)  # the conv makes (2, 4, 6, 6)


@pytest.mark.parametrize("pool, features, flatten", [
    (None, 4 * 36, "module"),
    (None, 4 * 36, "view"),
    (nn.AdaptiveAvgPool2d(1), 4, "module"),
    (nn.AdaptiveAvgPool2d((2, 3)), 4 * 6, "view"),
    (nn.AvgPool2d(2), 4 * 9, "module"),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), 4 * 9, "module"),
    (nn.MaxPool2d(2), 4 * 9, "module"),
    (nn.AdaptiveMaxPool2d(1), 4, "module"),
    (None, 4, "mean"),
])
def test_norm_folds_into_the_head_linear(pool, features, flatten):
    report = folded_report(Head(pool, features, flatten), X)
    assert [(f.name, f.mode, f.into) for f in report.folded] == [("bn", "into_consumer", "fc")]


@pytest.mark.parametrize("norm_dim, shape, pool, features", [
    (1, (2, 3, 9), nn.AdaptiveAvgPool1d(1), 4),
    (1, (2, 3, 9), None, 4 * 7),
    (3, (2, 3, 5, 5, 5), nn.AvgPool3d(3), 4),
])
def test_other_ranks_fold_into_the_head_linear(norm_dim, shape, pool, features):
    report = folded_report(Head(pool, features, norm_dim=norm_dim), torch.randn(*shape))
    assert [(f.name, f.into) for f in report.folded] == [("bn", "fc")]


@pytest.mark.parametrize("pool, features, negative, why", [
    (nn.AvgPool2d(2, padding=1), 4 * 16, False, "count_include_pad=True"),
    (nn.AvgPool2d(2, divisor_override=3), 4 * 9, False, "divisor_override=3"),
    (nn.MaxPool2d(2), 4 * 9, True, "only when every scale is positive"),
])
def test_head_refusals_say_why(pool, features, negative, why):
    report = folded_report(Head(pool, features), X, negative=negative)
    assert not report.folded
    assert why in report.skipped[0].reason


class Transposed(nn.Module):
    """bn -> permute -> flatten -> linear: feature f is not channel f // (H*W) any more."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).permute(0, 2, 3, 1).flatten(1))


class PoolReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.pool, self.fc = nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.bn(x))
        return self.fc(y.flatten(1)) + y.sum()


def test_channel_order_and_other_readers_refuse():
    report = folded_report(Transposed(), torch.randn(2, 4, 3, 3))
    assert not report.folded and "is not a conv or linear" in report.skipped[0].reason
    report = folded_report(PoolReadTwice(), torch.randn(2, 4, 3, 3))
    assert not report.folded and "has 2 users" in report.skipped[0].reason
