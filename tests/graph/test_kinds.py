"""fxnorm.kinds: which modules/functions are norms, which layers a norm folds into, plain vs overridden."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.video.resnet import Conv3DSimple
from torchvision.ops.misc import FrozenBatchNorm2d

from fxnorm.graph.kinds import (
    BN_KINDS,
    functional_norm_kind,
    has_running_stats,
    is_plain,
    is_plain_norm,
    known_base,
    layer_kind,
    norm_kind,
)


class MyBN(nn.BatchNorm2d):
    """Subclass that only changes __init__: behaves like its base."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-3)


class BNAct(nn.BatchNorm2d):
    """Subclass that overrides forward (BN fused with an activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class GrandChild(MyBN):
    pass


NORMS = [
    (nn.BatchNorm1d(4), "BatchNorm1d"),
    (nn.BatchNorm2d(4), "BatchNorm2d"),
    (nn.BatchNorm3d(4), "BatchNorm3d"),
    (nn.LazyBatchNorm1d(), "BatchNorm1d"),
    (nn.LazyBatchNorm2d(), "BatchNorm2d"),
    (nn.LazyBatchNorm3d(), "BatchNorm3d"),
    (nn.SyncBatchNorm(4), "SyncBatchNorm"),
    (nn.InstanceNorm1d(4), "InstanceNorm1d"),
    (nn.InstanceNorm2d(4, affine=True), "InstanceNorm2d"),
    (nn.InstanceNorm3d(4), "InstanceNorm3d"),
    (nn.LazyInstanceNorm2d(), "InstanceNorm2d"),
    (nn.GroupNorm(2, 4), "GroupNorm"),
    (nn.LayerNorm(4), "LayerNorm"),
    (FrozenBatchNorm2d(4), "FrozenBatchNorm2d"),
    (MyBN(4), "BatchNorm2d"),
    (GrandChild(4), "BatchNorm2d"),
    (BNAct(4), "BatchNorm2d"),
]
if hasattr(nn, "RMSNorm"):
    NORMS.append((nn.RMSNorm(4), "RMSNorm"))


@pytest.mark.parametrize("module,kind", NORMS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v)
def test_norm_kind_of_every_norm(module: nn.Module, kind: str) -> None:
    assert norm_kind(module) == kind
    assert layer_kind(module) is None


LAYERS = [
    (nn.Conv1d(2, 2, 1), "Conv1d"),
    (nn.Conv2d(2, 2, 1), "Conv2d"),
    (nn.Conv3d(2, 2, 1), "Conv3d"),
    (nn.ConvTranspose1d(2, 2, 1), "ConvTranspose1d"),
    (nn.ConvTranspose2d(2, 2, 1), "ConvTranspose2d"),
    (nn.ConvTranspose3d(2, 2, 1), "ConvTranspose3d"),
    (nn.Linear(2, 2), "Linear"),
    (nn.LazyConv2d(2, 1), "Conv2d"),
    (nn.LazyLinear(2), "Linear"),
    (Conv3DSimple(2, 2, 2), "Conv3d"),
]


@pytest.mark.parametrize("module,kind", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v)
def test_layer_kind(module: nn.Module, kind: str) -> None:
    assert layer_kind(module) == kind
    assert norm_kind(module) is None
    assert is_plain(module)  # Conv3DSimple only changes __init__


@pytest.mark.parametrize("module", [nn.ReLU(), nn.Sequential(), nn.Dropout(), nn.Identity(), nn.Embedding(3, 2)])
def test_non_norm_non_layer(module: nn.Module) -> None:
    assert norm_kind(module) is None
    assert layer_kind(module) is None
    assert known_base(module) is None
    assert not is_plain(module)
    assert not is_plain_norm(module)


def test_plain_vs_overridden_subclass() -> None:
    assert is_plain(MyBN(3)) and is_plain(GrandChild(3))
    assert is_plain_norm(MyBN(3))
    assert not is_plain(BNAct(3))
    assert not is_plain_norm(BNAct(3))
    # the kind still names the base so that reports say what it derives from
    assert known_base(BNAct(3)) == (nn.BatchNorm2d, "BatchNorm2d")
    assert known_base(GrandChild(3)) == (nn.BatchNorm2d, "BatchNorm2d")


def test_known_base_picks_most_specific_class() -> None:
    # SyncBatchNorm derives from _BatchNorm only, LazyBatchNorm2d from BatchNorm2d
    assert known_base(nn.SyncBatchNorm(2))[0] is nn.SyncBatchNorm
    assert known_base(nn.LazyBatchNorm2d())[0] is nn.LazyBatchNorm2d
    assert known_base(FrozenBatchNorm2d(2))[0] is FrozenBatchNorm2d


@pytest.mark.parametrize(
    "module,expected",
    [
        (nn.BatchNorm2d(3), True),
        (nn.BatchNorm2d(3, track_running_stats=False), False),
        (nn.InstanceNorm2d(3), False),
        (nn.InstanceNorm2d(3, track_running_stats=True), True),
        (FrozenBatchNorm2d(3), True),
        (nn.GroupNorm(1, 3), False),
        (nn.LayerNorm(3), False),
    ],
)
def test_has_running_stats(module: nn.Module, expected: bool) -> None:
    assert has_running_stats(module) is expected


@pytest.mark.parametrize(
    "target,kind",
    [
        (F.batch_norm, "batch_norm"),
        (torch.batch_norm, "batch_norm"),
        (F.layer_norm, "layer_norm"),
        (torch.layer_norm, "layer_norm"),
        (F.group_norm, "group_norm"),
        (torch.group_norm, "group_norm"),
        (F.instance_norm, "instance_norm"),
        (torch.instance_norm, "instance_norm"),
        (F.relu, None),
        (torch.add, None),
        ("batch_norm", None),
    ],
)
def test_functional_norm_kind(target: object, kind: str | None) -> None:
    assert functional_norm_kind(target) == kind


def test_functional_norm_kind_unhashable_target() -> None:
    assert functional_norm_kind([F.batch_norm]) is None


def test_bn_kinds_are_the_batch_norm_family() -> None:
    assert {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "FrozenBatchNorm2d", "batch_norm"} == set(BN_KINDS)
    assert "LayerNorm" not in BN_KINDS and "GroupNorm" not in BN_KINDS
