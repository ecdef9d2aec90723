"""fxnorm.inspection.sites.find_norms on a hand-built toy zoo: every NormSite field that matters, asserted."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from devices import DEVICES
from fxnorm import NormSite, find_norms, trace
from fxnorm.inspection.sites import health_flags
from zoo import randomize_norms


class FunctionalBN(nn.Module):
    """A batch norm written with F.batch_norm on the module's own buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("rm", torch.randn(6))
        self.register_buffer("rv", torch.rand(6) + 0.5)
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, False, 0.3, 1e-3)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fbn = FunctionalBN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(self.fbn.conv(x), None, None, self.fbn.rm, self.fbn.rv, False, 0.1, 1e-5, False)


class BNAct(nn.BatchNorm2d):
    """BatchNorm fused with an activation: forward differs from the base."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(super().forward(x))


class MyBN(nn.BatchNorm2d):
    """Only __init__ differs: a plain norm."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-4, momentum=0.05)


class ConvReused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.extra = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if y.sum() > 0:
            y = self.extra(y)
        return y


def _eval(model: nn.Module) -> nn.Module:
    return randomize_norms(model.eval(), seed=1)


def _by_name(sites: list[NormSite]) -> dict[str, NormSite]:
    return {s.name: s for s in sites}


def test_conv_bn_fields() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3, momentum=0.2), nn.ReLU()))
    [site] = find_norms(model)
    assert (site.name, site.node, site.graph, site.kind, site.op, site.module_type) == (
        "1", "_1", "", "BatchNorm2d", "call_module", "BatchNorm2d")
    assert (site.num_features, site.eps, site.momentum) == (8, 1e-3, 0.2)
    assert site.affine and site.track_running_stats and not site.training
    assert site.num_batches_tracked == 10  # randomize_norms sets it
    assert (site.producer, site.producer_op, site.producer_type) == ("_0", "call_module", "Conv2d")
    assert site.consumers == ["_2"]
    assert (site.fold, site.fold_into, site.reason) == ("into_producer", "0", None)
    assert site.foldable and site.health == []
    d = site.to_dict()
    assert d["name"] == "1" and d["consumers"] == ["_2"] and d["health"] == []


def test_functional_batch_norm() -> None:
    model = _eval(FunctionalBN())
    [site] = find_norms(model)
    assert (site.kind, site.op, site.node) == ("batch_norm", "call_function", "batch_norm")
    assert site.name == "batch_norm"  # top-level functional norm: named by its node
    assert (site.num_features, site.eps, site.momentum) == (6, 1e-3, 0.3)
    assert site.affine and site.track_running_stats and not site.training
    assert site.num_batches_tracked is None
    assert (site.producer, site.producer_type) == ("conv", "Conv2d")
    assert site.fold is None and "the rank of conv is not known" in site.reason
    x = torch.randn(1, 3, 8, 8)
    [site] = find_norms(model, example_inputs=(x,))
    assert site.fold is None and "the model's own forward calls batch_norm" in site.reason  # never the root's
    [site] = find_norms(nn.Sequential(model), example_inputs=(x,))  # in a submodule, with the rank known
    assert (site.name, site.fold, site.fold_into, site.evidence) == ("0", "into_producer", "0.conv", "proven")


def test_functional_norm_inside_a_submodule_is_named_by_its_scope() -> None:
    model = nn.Sequential(nn.Identity(), Inner()).eval()
    [site] = find_norms(model, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert site.kind == "batch_norm" and site.name == "1"
    assert site.module_type == "Inner"
    assert not site.affine and site.num_features == 6 and site.eps == 1e-5
    assert site.producer_type == "Conv2d" and site.fold == "into_producer" and site.fold_into == "1.fbn.conv"


def test_bn_subclass_with_activation_is_never_a_plain_norm() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), BNAct(4), nn.Conv2d(4, 2, 1), MyBN(2)))
    sites = find_norms(model)
    assert [s.name for s in sites] == ["1", "3"]
    act, mine = sites
    # BNAct: traced through, seen as the functional batch_norm it computes, the activation after it
    assert (act.kind, act.op, act.module_type) == ("batch_norm", "call_function", "BNAct")
    assert act.node == "batch_norm" and act.consumers == ["hardswish"]
    assert act.num_features == 4 and act.num_batches_tracked == 10
    assert (act.fold, act.fold_into) == ("into_producer", "0")
    # MyBN only changes __init__: a plain call_module norm of its base's kind
    assert (mine.kind, mine.op, mine.module_type) == ("BatchNorm2d", "call_module", "MyBN")
    assert (mine.eps, mine.momentum) == (1e-4, 0.05)
    assert (mine.fold, mine.fold_into) == ("into_producer", "2")


def test_conv_reused_twice_cannot_fold() -> None:
    sites = _by_name(find_norms(_eval(ConvReused())))
    assert sites["bn1"].fold is None and sites["bn2"].fold is None
    assert sites["bn1"].reason.startswith("conv is called at 2 sites that are not all followed (or preceded) by the "
                                          "same norm")
    assert sites["bn2"].producer == "conv_1"


def test_conv_output_with_two_users_cannot_fold() -> None:
    [site] = find_norms(_eval(TwoUsers()))
    assert site.fold is None
    assert site.reason.startswith("conv output also used by add")
    assert site.consumers == ["add"]


def test_untracked_bn() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    [site] = find_norms(model)
    assert not site.track_running_stats and site.num_batches_tracked is None
    assert site.fold is None and site.reason.startswith("track_running_stats=False")
    assert site.health == []


@pytest.mark.parametrize(
    "norm,kind,features",
    [
        (nn.GroupNorm(2, 4), "GroupNorm", 4),
        (nn.LayerNorm([4, 3, 3]), "LayerNorm", 36),
        (nn.InstanceNorm2d(4, affine=True), "InstanceNorm2d", 4),
    ]
    + ([(nn.RMSNorm([4, 3, 3]), "RMSNorm", 36)] if hasattr(nn, "RMSNorm") else []),
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_per_sample_norms_do_not_fold(norm: nn.Module, kind: str, features: int) -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm))
    [site] = find_norms(model)
    assert (site.kind, site.num_features, site.op) == (kind, features, "call_module")
    assert site.fold is None and not site.track_running_stats
    if kind.startswith("InstanceNorm"):
        assert site.reason.startswith("track_running_stats=False")
    else:
        assert site.reason == f"{kind} normalizes each input with its own statistics; only its affine part can fold"


def test_tracked_instance_norm_folds_in_eval() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)))
    [site] = find_norms(model)
    assert site.track_running_stats and site.fold == "into_producer"


@pytest.mark.parametrize("functional", [F.layer_norm, F.group_norm, F.instance_norm])
def test_functional_per_sample_norms(functional: object) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if functional is F.layer_norm:
                return F.layer_norm(y, [4, 2, 2])
            if functional is F.group_norm:
                return F.group_norm(y, 2)
            return F.instance_norm(y)

    [site] = find_norms(Net().eval())
    assert site.kind == functional.__name__ and site.op == "call_function"
    assert site.fold is None and site.reason.startswith(f"functional {functional.__name__}")


def test_pre_activation_norm_folds_into_consumer_or_explains() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
                                nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")))
    sites = _by_name(find_norms(model))
    assert (sites["2"].fold, sites["2"].fold_into, sites["2"].producer_type) == ("into_consumer", "3", "ReLU")
    five = sites["5"]
    assert five.fold is None
    assert five.reason.startswith("producer _4 (ReLU) is not a conv/linear; consumer _6 (Conv2d) pads with zeros")
    assert (sites["8"].fold, sites["8"].fold_into) == ("into_consumer", "9")


def test_linear_bn1d_and_rank() -> None:
    flat = _eval(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)))
    [site] = find_norms(flat)
    assert (site.kind, site.producer_type, site.fold) == ("BatchNorm1d", "Linear", "into_producer")
    # a Linear whose input rank is unknown: its features are channels only for 2-D input
    unknown = _eval(nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4)))
    [site] = find_norms(unknown)
    assert site.fold is None and "the rank of _0 is not known" in site.reason
    [site] = find_norms(unknown, example_inputs=(torch.randn(5, 12),))
    assert site.fold == "into_producer"


def test_transposed_conv_producer() -> None:
    model = _eval(nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4)))
    [site] = find_norms(model)
    assert (site.producer_type, site.fold, site.fold_into) == ("ConvTranspose2d", "into_producer", "0")


def test_channel_mismatch_cannot_fold() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x).expand(-1, 4, -1, -1))

    [site] = find_norms(_eval(Odd()))
    assert site.fold is None and site.producer_op == "call_method" and site.producer_type == "expand"


def test_training_mode_and_frozen_and_sync() -> None:
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                          FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4)))
    model.train()
    sites = _by_name(find_norms(model))
    assert sites["1"].training and sites["1"].reason == "in training mode: call model.eval() before folding"
    # FrozenBatchNorm2d is constant whatever the mode
    frozen = sites["3"]
    assert frozen.kind == "FrozenBatchNorm2d" and not frozen.training and frozen.fold == "into_producer"
    assert frozen.num_features == 4 and frozen.momentum is None and frozen.num_batches_tracked is None
    assert sites["5"].kind == "SyncBatchNorm" and sites["5"].fold is None
    model.eval()
    # SyncBatchNorm takes any rank >= 2: the conv's channels are its channels only on batched input
    assert "not known" in _by_name(find_norms(model))["5"].reason
    assert _by_name(find_norms(model, example_inputs=(torch.randn(1, 3, 4, 4),)))["5"].fold == "into_producer"


def test_lazy_norm_is_reported_not_crashed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()).eval()
    [site] = find_norms(model)
    assert site.kind == "BatchNorm2d" and site.module_type == "LazyBatchNorm2d"
    assert site.num_features is None and site.fold is None and "lazy" in site.reason
    assert site.health == ["uninitialized (lazy module): run one forward first"]
    model(torch.randn(1, 3, 2, 2))  # materializes it
    [site] = find_norms(model)
    assert site.num_features == 4 and site.fold == "into_producer"


def test_norms_in_untraced_code_are_reported_as_eager() -> None:
    model = _eval(Untraceable())
    sites = find_norms(model)
    assert [(s.name, s.op) for s in sites] == [("stem.1", "call_module"), ("extra", "eager")]
    graph_site, eager = sites
    assert graph_site.graph == "stem" and graph_site.fold == "into_producer" and graph_site.fold_into == "stem.0"
    assert eager.node is None and eager.graph is None and eager.fold is None
    assert eager.reason.startswith("runs in untraced code of '<model>' (TraceError:")
    assert eager.num_features == 4 and eager.num_batches_tracked == 10


def test_graph_module_input_and_model_untouched() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    before = copy.deepcopy(model.state_dict())
    children = list(model.children())
    sites = find_norms(model)
    assert list(model.children()) == children and not isinstance(model, fx.GraphModule)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    from_gm = find_norms(fx.symbolic_trace(model))
    from_trace = find_norms(trace(model))
    assert [s.to_dict() for s in from_gm] == [s.to_dict() for s in sites] == [s.to_dict() for s in from_trace]


def test_leaf_modules_hide_norms_inside() -> None:
    model = _eval(nn.Sequential(nn.Conv2d(3, 4, 1), BNAct(4)))
    sites = find_norms(model, leaf_modules=(BNAct,))
    # a leaf BNAct is an opaque call: it is still a norm module, but not a plain one
    [site] = sites
    assert site.op == "call_module" and site.module_type == "BNAct"
    assert site.fold is None and "overrides forward()" in site.reason


@pytest.mark.parametrize("device", DEVICES)
def test_health_flags_on_modules(device: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    randomize_norms(model)
    with torch.no_grad():
        model[1].running_mean[2] = math.nan
        model[3].running_var[:2] = 1e-7
        model[5].weight[0] = math.inf
        model[5].bias[1] = math.nan
        model[7].reset_running_stats()
    model.to(device)
    sites = _by_name(find_norms(model))
    assert sites["1"].health == ["NaN/Inf in running_mean"]
    assert sites["3"].health == ["running_var below eps in 2 channel(s)"]
    assert sites["5"].health == ["NaN/Inf in weight", "NaN/Inf in bias"]
    assert sites["7"].health == ["statistics never updated"] and sites["7"].num_batches_tracked == 0


def test_health_flags_function() -> None:
    ones, zeros = torch.ones(3), torch.zeros(3)
    assert health_flags(zeros, ones, 1e-5, num_batches_tracked=0) == ["statistics never updated"]
    assert health_flags(zeros, ones, 1e-5, num_batches_tracked=5) == []  # updated, just happens to match
    assert health_flags(zeros + 0.1, ones, 1e-5, num_batches_tracked=0) == []  # loaded from a checkpoint
    assert health_flags(zeros, torch.tensor([1.0, 0.0, 1e-6]), 1e-5, num_batches_tracked=3) == [
        "running_var below eps in 2 channel(s)"]
    assert health_flags(zeros, torch.tensor([1.0, math.inf, 1.0]), 1e-5, num_batches_tracked=3) == [
        "NaN/Inf in running_var"]
    assert health_flags(None, None, None) == []
