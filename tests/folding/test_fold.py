"""fxnorm.fold on hand-built models: what must fold (outputs equal), what must not (left, with its
reason), numerics (dtypes, memory formats), the report, and the user's model never touched.

Every case randomizes BN statistics and affine parameters so that no fold is an identity.
"""

from __future__ import annotations

import copy

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from devices import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.optimization import fuse
from zoo import randomize_norms, rel_err

from fxnorm import FoldError, ChannelAffine, fold, find_norms, report_of, FoldReport
from fxnorm.folding.modules import NormRemainder
from fxnorm.graph.kinds import BN_KINDS

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def bns_left(model: nn.Module) -> list:
    return [s for s in find_norms(model) if s.kind in BN_KINDS]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def check_fold(model: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5, **kwargs) -> nn.Module:
    """Fold a copy, check the original is untouched and the outputs match; return the folded model."""
    saved = state(model)
    with torch.no_grad():
        ref = model(*inputs)
        folded = fold(model, **kwargs)
        out = folded(*inputs)
    assert same_state(model, saved)
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err}"
    return folded


class Residual(nn.Module):
    """conv output feeds a BN and the residual add: the conv must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class TwoSites(nn.Module):
    """One conv called at two sites, each followed by its own BN (pytorch #104593)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class FunctionalBN(nn.Module):
    """F.batch_norm with buffers as constants, after a conv (pytorch #122070)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.gamma = nn.Parameter(torch.rand(5) + 0.5)
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3).relu()


class BNReLU(nn.BatchNorm2d):
    """A BN subclass whose forward adds an activation: folding it as a plain BN would drop the ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class BNTimesTwo(nn.BatchNorm2d):
    """A BN subclass with an unknown forward that does not call batch_norm with constants."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + self.running_mean[None, :, None, None]


# ---------------------------------------------------------------- what must fold


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,stride,dilation,padding,mode", [
    (1, 1, 1, 0, "zeros"),
    (2, 2, 1, 1, "zeros"),
    (4, 1, 2, 2, "reflect"),
    (1, 2, 1, 1, "circular"),
    (2, 1, 1, 1, "replicate"),
])
def test_conv_bn_folds(device, dim, bias, groups, stride, dilation, padding, mode):
    torch.manual_seed(dim)
    conv = CONV[dim](4, 8, 3, stride=stride, dilation=dilation, padding=padding, padding_mode=mode, groups=groups,
                     bias=bias)
    model = randomize_norms(nn.Sequential(conv, BN[dim](8), nn.ReLU()).eval(), seed=dim).to(device)
    x = torch.randn(2, 4, *([9] * dim), device=device)
    folded = check_fold(model, x, example_inputs=(x,))  # Conv1d -> BatchNorm1d needs the rank (3, not 2)
    assert bns_left(folded) == []
    (entry,) = report_of(folded, FoldReport).folded
    assert (entry.name, entry.kind, entry.mode, entry.into) == ("1", f"BatchNorm{dim}d", "into_producer", "0")
    assert folded.get_submodule("0").bias.dtype == torch.float32


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_conv_transpose_bn_folds_per_group(dim, groups):
    """Pitfall 2: the BN scale belongs on weight axis 1, per group. Shapes chosen so that Cin == Cout
    and a scale broadcast on axis 0 would silently run (and be wrong)."""
    torch.manual_seed(groups)
    channels = 6
    layer = CONVT[dim](channels, channels, 3, stride=2, padding=1, output_padding=1, groups=groups)
    model = randomize_norms(nn.Sequential(layer, BN[dim](channels)).eval(), seed=groups)
    x = torch.randn(2, channels, *([5] * dim))
    folded = check_fold(model, x, example_inputs=(x,))
    assert bns_left(folded) == []
    if groups == 1 and dim == 2:  # torch's fuse leaves ConvTranspose alone
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fuse(model).modules()) == 1


def test_naive_transposed_fold_is_wrong_for_groups():
    """Show the pitfall: scaling a grouped ConvTranspose weight along axis 0 (the input channels) runs
    without error when Cin == Cout, and gives a wrong answer; fxnorm's fold is exact."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(6, 6, 3, groups=3)
    bn = randomize_norms(nn.BatchNorm2d(6)).eval()
    model = nn.Sequential(layer, bn).eval()
    x = torch.randn(1, 6, 5, 5)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    naive = copy.deepcopy(layer)
    with torch.no_grad():
        naive.weight.mul_(scale.reshape(-1, 1, 1, 1))  # axis 0: runs, since Cin == Cout
        naive.bias.copy_((naive.bias - bn.running_mean) * scale + bn.bias)
        assert rel_err(naive(x), model(x)) > 1e-2
    check_fold(model, x)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_bn1d_folds_on_2d_input(device):
    model = randomize_norms(nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.BatchNorm1d(7)).eval()).to(device)
    folded = check_fold(model, torch.randn(5, 3, 4, device=device))
    assert [(f.mode, f.into) for f in report_of(folded, FoldReport).folded] == [("into_producer", "1")]


def test_linear_bn1d_rank_decided_by_example_inputs():
    """BatchNorm1d on (N, C, L) normalizes dim 1, the Linear's features are the last dim: no fold."""
    model = randomize_norms(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)).eval())
    x3 = torch.randn(2, 6, 6)
    folded = check_fold(model, x3, example_inputs=(x3,))
    (skip,) = report_of(folded, FoldReport).skipped
    assert "at rank 3 the BatchNorm1d channels (dim 1) are not the Linear channels" in skip.reason
    folded = check_fold(model, x3)  # rank unknown without example inputs: refused
    assert "is not known" in report_of(folded, FoldReport).skipped[0].reason
    x2 = torch.randn(4, 6)
    folded = check_fold(model, x2, example_inputs=(x2,))
    assert report_of(folded, FoldReport).skipped == [] and bns_left(folded) == []


def test_functional_batch_norm_folds():
    model = nn.Sequential(FunctionalBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = check_fold(model, x, example_inputs=(x,))  # conv2d -> batch_norm: the rank decides (4, not 3)
    assert bns_left(folded) == []
    report = report_of(folded, FoldReport)
    (entry,) = report.folded
    assert entry.kind == "batch_norm" and entry.into == "0.conv" and report.forwards == ["0"]
    assert type(folded[0]) is FunctionalBN and set(folded[0].state_dict()) == {"conv.weight", "conv.bias"}
    assert not any(torch.equal(b, model[0].mean) for b in folded.buffers())  # the constants are gone


def test_frozen_batch_norm_folds():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(8)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), frozen, nn.ReLU()))
    x = torch.randn(1, 3, 10, 10)
    # on an unbatched (3-D) conv output its (1, C, 1, 1) scale would add a dim: the rank must be known
    assert "is not known" in report_of(check_fold(model, x), FoldReport).skipped[0].reason
    folded = check_fold(model, x, example_inputs=(x,))
    assert [f.kind for f in report_of(folded, FoldReport).folded] == ["FrozenBatchNorm2d"]
    assert bns_left(folded) == []


def test_conv_subclass_folds_and_torch_fuse_misses_it():
    from torchvision.models.video.resnet import Conv3DSimple

    model = randomize_norms(nn.Sequential(Conv3DSimple(3, 8), nn.BatchNorm3d(8)).eval())
    folded = check_fold(model, torch.randn(1, 3, 4, 6, 6))
    assert bns_left(folded) == []
    assert len(bns_left(fuse(model))) == 1  # exact-type matching misses the subclass


def test_bn_subclass_with_activation_folds_as_functional_and_keeps_relu():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), BNReLU(4)).eval())
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert bool((model(x) == 0).any())  # the ReLU matters for this input
    folded = check_fold(model, x)  # BatchNorm2d's own rank check makes the rank 4
    (entry,) = report_of(folded, FoldReport).folded
    assert entry.kind == "batch_norm" and entry.name == "1"
    assert bns_left(folded) == [] and isinstance(folded[1], NormRemainder) and folded[1].of == "BNReLU"


def test_conv_bn_bn_chain_folds_both():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval())
    folded = check_fold(model, torch.randn(1, 3, 6, 6))
    assert [(f.name, f.into) for f in report_of(folded, FoldReport).folded] == [("1", "0"), ("2", "0")]


def test_shared_bn_module_folds_at_each_site():
    bn = nn.BatchNorm2d(4)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), bn).eval())
    folded = check_fold(model, torch.randn(1, 3, 5, 5))
    assert [f.into for f in report_of(folded, FoldReport).folded] == ["0", "2"] and bns_left(folded) == []


# ---------------------------------------------------------------- BN before a conv


@pytest.mark.parametrize("padding,mode,zero_shift,folds", [
    (0, "zeros", False, True),
    (1, "reflect", False, True),
    (1, "replicate", False, True),
    (1, "zeros", False, False),  # zeros padded after the shift would be wrong at the border
    (1, "zeros", True, True),  # ... unless the BN has no shift
])
@pytest.mark.parametrize("groups", [1, 2])
def test_bn_into_next_conv(padding, mode, zero_shift, folds, groups):
    bn = randomize_norms(nn.BatchNorm2d(4))
    if zero_shift:
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.bias.zero_()
    model = nn.Sequential(nn.ReLU(), bn, nn.Conv2d(4, 6, 3, padding=padding, padding_mode=mode, groups=groups)).eval()
    folded = check_fold(model, torch.randn(2, 4, 7, 7))
    report = report_of(folded, FoldReport)
    if folds:
        assert [(f.mode, f.into) for f in report.folded] == [("into_consumer", "2")]
        assert bns_left(folded) == []
    else:
        assert report.folded == [] and "pads with zeros" in report.skipped[0].reason
        assert len(bns_left(folded)) == 1


def test_bn_into_next_linear_and_maxvit_pattern():
    model = randomize_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval())
    folded = check_fold(model, torch.randn(4, 5), example_inputs=(torch.randn(4, 5),))
    assert [f.mode for f in report_of(folded, FoldReport).folded] == ["into_consumer"]
    # maxvit's MBConv: pre_norm (BN) -> 1x1 conv; torch's fuse only looks for conv -> bn.
    from torchvision.models.maxvit import MBConv

    block = randomize_norms(MBConv(8, 8, expansion_ratio=2, squeeze_ratio=0.25, stride=1, activation_layer=nn.GELU,
                                   norm_layer=nn.BatchNorm2d, p_stochastic_dropout=0.0).eval())
    folded = check_fold(block, torch.randn(1, 8, 6, 6))
    assert bns_left(folded) == [] and len(bns_left(fuse(block))) == 1


# ---------------------------------------------------------------- what must not fold


def test_conv_called_at_two_sites_not_folded_and_torch_fuse_is_wrong():
    model = randomize_norms(TwoSites().eval())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(fuse(model)(x), ref) > 1e-2  # torch folds the shared conv twice: silently wrong
    folded = check_fold(model, x)
    report = report_of(folded, FoldReport)
    assert report.folded == []
    assert sorted(s.name for s in report.skipped) == ["bn_a", "bn_b"]
    assert all("called at 2 sites" in s.reason for s in report.skipped)
    assert len(bns_left(folded)) == 2


def test_conv_output_with_other_users_not_folded():
    folded = check_fold(randomize_norms(Residual().eval()), torch.randn(1, 4, 6, 6))
    (skip,) = report_of(folded, FoldReport).skipped
    assert skip.name == "bn" and "also used by" in skip.reason


class ShapeReads(nn.Module):
    """conv -> bn whose conv output's shape is read (``.shape``, ``.size()``, ``.dim()``, ``getattr``), and
    bn2 -> conv2 whose norm output's size is read: shape queries do not read values, both fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)  # no padding: the shift of bn2 may fold into it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        n, k, rank = c.shape[0], c.size(1), c.dim()
        z = self.bn2(torch.relu(self.bn(c)))
        h = self.conv2(z).reshape(n, -1)
        return h[:, : k * z.size(-1)] * rank + getattr(c, "ndim") + c.numel()


def test_shape_queries_do_not_block_folds():
    model = randomize_norms(ShapeReads().eval()).double()
    gm = torch.fx.symbolic_trace(model)
    conv_users = {u.name for n in gm.graph.nodes if n.target == "conv" for u in n.users}
    assert conv_users == {"getattr_1", "size", "dim", "bn", "getattr_2", "numel"}  # the model reads them
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded = check_fold(model, x, tol=1e-12, strict=True)
    report = report_of(folded, FoldReport)
    assert {f.name: (f.mode, f.into) for f in report.folded} == {
        "bn": ("into_producer", "conv"), "bn2": ("into_consumer", "conv2")}
    assert report.skipped == [] and bns_left(folded) == []
    sites = [(s.name, s.fold, s.fold_into) for s in find_norms(model)]
    assert sites == [("bn", "into_producer", "conv"), ("bn2", "into_consumer", "conv2")]
    x2 = torch.randn(3, 3, 10, 10, dtype=torch.float64)  # the shapes are still read at run time
    with torch.no_grad():
        assert rel_err(folded(x2), model(x2)) < 1e-12


def test_norm_affine_ignores_shape_queries():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return self.fc(h).reshape(h.shape[0], -1) * h.size(-1)

    model = randomize_norms(Block().eval()).double()
    folded = check_fold(model, torch.randn(2, 3, 6, dtype=torch.float64), tol=1e-12, norm_affine=True)
    assert [(f.name, f.into) for f in report_of(folded, FoldReport).folded] == [("ln", "fc")]
    assert folded.get_submodule("ln").weight is None


def test_unknown_bn_subclass_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNTimesTwo(4)).eval()
    folded = check_fold(model, torch.randn(1, 3, 5, 5))
    report = report_of(folded, FoldReport)
    assert report.folded == []
    (skip,) = report.skipped
    assert skip.name == "1" and skip.kind == "BatchNorm2d" and "BNTimesTwo overrides forward()" in skip.reason
    with pytest.raises(FoldError, match="BNTimesTwo"):
        fold(model, strict=True)


@pytest.mark.parametrize("case", ["training", "no_stats"])
def test_bn_without_constant_statistics(case):
    bn = nn.BatchNorm2d(4) if case == "training" else nn.BatchNorm2d(4, track_running_stats=False)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU()))
    model.eval()
    if case == "training":
        bn.train()
    saved = state(model)
    with pytest.raises(FoldError, match=r"(?s)1 batch norm.*- 1 \(BatchNorm2d\).*(model.eval|track_running_stats)"):
        fold(model, strict=True)
    with pytest.raises(FoldError):
        fold(model, strict=True, inplace=True)  # strict raises before changing anything, even in place
    assert same_state(model, saved) and isinstance(model, nn.Sequential) and model[1] is bn
    if case == "training":  # folding a model left in training mode changes nothing: say so
        with pytest.warns(UserWarning, match=r"1 batch norm\(s\) in training mode were not folded \(1\); call "
                          "model.eval"):
            folded = fold(model)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            folded = fold(model)
    (skip,) = report_of(folded, FoldReport).skipped
    assert skip.name == "1" and ("training mode" in skip.reason or "track_running_stats" in skip.reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = fold(model, standalone="affine")  # no constant statistics: never an affine either
    assert report_of(folded, FoldReport).folded == []
    assert same_state(model, saved)
    folded.eval() if case == "no_stats" else None
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


def test_strict_passes_when_everything_folds():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    assert len(report_of(fold(model, strict=True), FoldReport).folded) == 1


# ---------------------------------------------------------------- standalone affine


def test_standalone_affine_chain_of_unfoldable_norms():
    model = randomize_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Sigmoid()).eval())
    x = torch.randn(2, 3, 4, 4)
    folded = check_fold(model, x, standalone="affine")
    assert [(f.name, f.mode) for f in report_of(folded, FoldReport).folded] == [("1", "affine"), ("2", "affine")]
    with torch.no_grad():
        ref = model(x)
        same = fold(model, standalone="affine", inplace=True)
        assert same is model and isinstance(model[1], ChannelAffine) and rel_err(model(x), ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standalone_affine(dtype):
    model = randomize_norms(Residual().eval()).to(dtype)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    folded = check_fold(model, x, standalone="affine", tol=1e-5 if dtype == torch.float32 else 1e-12)
    (entry,) = report_of(folded, FoldReport).folded
    assert entry.mode == "affine" and report_of(folded, FoldReport).skipped == []
    affine = folded.get_submodule(entry.into)
    assert isinstance(affine, ChannelAffine) and affine.scale.dtype == dtype
    assert bns_left(folded) == [] and folded(x).dtype == dtype


def test_standalone_affine_leaves_functional_bn():
    """standalone="affine" replaces norm modules; a functional batch_norm stays, with its reason."""
    class Pre(FunctionalBN):  # BN before a zero-padding conv: no exact fold
        def forward(self, x):
            y = F.batch_norm(x.relu(), self.mean[:3], self.var[:3], None, None, False, 0.1, 1e-5)
            return F.conv2d(y, self.conv.weight, padding=1)

    folded = check_fold(nn.Sequential(Pre()).eval(), torch.randn(1, 3, 6, 6), standalone="affine")
    report = report_of(folded, FoldReport)
    assert report.folded == [] and [s.kind for s in report.skipped] == ["batch_norm"]


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_conv_without_bias(device, dtype):
    """Pitfall 3: fold in float32 and cast back; a conv without bias gets a bias of its own dtype."""
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16)).eval())
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        exact = model.double()(x.double())
        low = model.to(device, dtype)
        folded = fold(low)
        conv = folded.get_submodule("0")
        assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
        err_folded = rel_err(folded(x.to(device, dtype)), exact)
        err_plain = rel_err(low(x.to(device, dtype)), exact)
    # The folded model is as accurate as the unfolded one in that dtype (one rounding of the weights).
    assert err_folded < 3 * err_plain + (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_float64_model_is_exact_to_1e10():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8),
                                          nn.Conv2d(8, 4, 1)).eval()).double()
    folded = check_fold(model, torch.randn(2, 3, 9, 9, dtype=torch.float64), tol=1e-10)
    assert folded.get_submodule("0").weight.dtype == torch.float64 and bns_left(folded) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_weights_keep_their_format(device, dim, fmt):
    model = randomize_norms(nn.Sequential(CONV[dim](4, 8, 3), BN[dim](8)).eval()).to(device, memory_format=fmt)
    assert model[0].weight.is_contiguous(memory_format=fmt)
    x = torch.randn(2, 4, *([6] * dim), device=device).to(memory_format=fmt)
    folded = check_fold(model, x)
    weight = folded.get_submodule("0").weight
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()


# ---------------------------------------------------------------- the user's model and the report


def test_user_model_untouched_and_nothing_shared():
    model = randomize_norms(torchvision.models.resnet18().eval())
    saved = state(model)
    folded = check_fold(model, torch.randn(1, 3, 32, 32))
    theirs = {t.data_ptr() for t in model.state_dict().values()}
    assert not any(t.data_ptr() in theirs for t in folded.state_dict().values())
    assert same_state(model, saved)
    assert len(report_of(folded, FoldReport).folded) == 20 and bns_left(folded) == []


def test_inplace_changes_the_model_layers():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    old = model[0].weight
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
        folded = fold(model, inplace=True)
        assert rel_err(folded(x), ref) < 1e-5
    assert folded.get_submodule("0") is model[0] and model[0].weight is not old


def test_tied_weight_keeps_old_tensor():
    a, b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    b.weight = a.weight  # tied
    model = randomize_norms(nn.Sequential(a, nn.BatchNorm2d(3), b).eval())
    folded = check_fold(model, torch.randn(1, 3, 4, 4))
    assert torch.equal(folded.get_submodule("2").weight, model[2].weight)
    assert not torch.equal(folded.get_submodule("0").weight, model[0].weight)


def test_report_and_find_norms_of_folded_model():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval())
    folded = fold(model)
    report = report_of(folded, FoldReport)
    data = report.to_dict()
    assert data["counts"] == {"folded": 1, "skipped": 1, "untraced": 0}
    assert data["folded"][0] == {"name": "1", "kind": "BatchNorm2d", "mode": "into_producer", "into": "0",
                                 "evidence": "proven"}
    assert data["skipped"][0]["name"] == "3" and "not a conv" in data["skipped"][0]["reason"]
    assert [s.name for s in bns_left(folded)] == ["3"]
    assert not [k for k in vars(folded) if "fxnorm" in k]  # the report is kept beside the model, not on it
    with pytest.raises(FoldError, match="what fxnorm.fold"):
        report_of(copy.deepcopy(folded), FoldReport)  # a copy is not what fold returned
    with pytest.raises(FoldError, match="what fxnorm.fold"):
        report_of(model, FoldReport)


def test_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(FoldError, match="standalone"):
        fold(model, standalone="remove")
    with pytest.raises(FoldError, match="nn.Module"):
        fold(lambda x: x)  # type: ignore[arg-type]
    saved = state(model)
    with pytest.raises(FoldError, match="example_inputs do not run"):
        fold(model, example_inputs=(torch.randn(1, 5, 8, 8),))
    with pytest.raises(FoldError, match="example_inputs must be a tuple"):
        fold(model, example_inputs=[[1]][0][0])  # type: ignore[arg-type]
    assert same_state(model, saved)


def test_partly_traced_model_folds_in_its_parts():
    class Glue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            self.loose = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.body(x)
            if y.sum() > 1e9:  # data-dependent control flow: the model itself does not trace
                y = -y
            y = self.loose(y)
            return self.head(y.mean((2, 3)))

    model = randomize_norms(Glue().eval())
    x = torch.randn(2, 3, 6, 6)
    folded = check_fold(model, x, example_inputs=(x,))
    report = report_of(folded, FoldReport)
    assert sorted((f.name, f.into) for f in report.folded) == [("body.1", "body.0"), ("head.1", "head.0")]
    assert [s.name for s in report.skipped] == ["loose"] and "untraced" in report.skipped[0].reason
    assert report.untraced[0].name == ""
    with pytest.raises(FoldError, match="loose"):
        fold(model, strict=True)


# ---------------------------------------------------------------- property-based


@st.composite
def chains(draw):
    dim = draw(st.sampled_from([0, 1, 2, 3]))  # 0: Linear
    transposed = dim > 0 and draw(st.booleans())
    groups = 1 if dim == 0 else draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = 1 if transposed else draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    channels_last = dim in (2, 3) and draw(st.booleans())
    before = not transposed and dim > 0 and draw(st.booleans())  # also a BN before the layer
    seed = draw(st.integers(0, 2**16))
    return dim, transposed, groups, cin, cout, kernel, stride, dilation, padding, bias, dtype, channels_last, before, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_random_chains_fold_exactly(spec):
    dim, transposed, groups, cin, cout, kernel, stride, dilation, padding, bias, dtype, channels_last, before, seed = spec
    torch.manual_seed(seed)
    if dim == 0:
        layer: nn.Module = nn.Linear(cin, cout, bias=bias)
        norm_cls = nn.BatchNorm1d
        x = torch.randn(3, cin)
    elif transposed:
        layer = CONVT[dim](cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
        norm_cls = BN[dim]
        x = torch.randn(2, cin, *([4] * dim))
    else:
        layer = CONV[dim](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                          bias=bias)
        norm_cls = BN[dim]
        x = torch.randn(2, cin, *([5] * dim))
    mods = ([norm_cls(cin)] if before else []) + [layer, norm_cls(cout)]
    model = randomize_norms(nn.Sequential(*mods).eval(), seed=seed).to(dtype)
    x = x.to(dtype)
    if channels_last:
        fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        x = x.to(memory_format=fmt)
    folded = check_fold(model, x, tol=1e-5 if dtype == torch.float32 else 1e-10, example_inputs=(x,))
    expect_left = 1 if before and padding else 0  # a shifted BN before a zero-padding conv stays
    assert len(bns_left(folded)) == expect_left
    weight = folded.get_submodule(str(len(mods) - 2)).weight
    assert weight.dtype == dtype
    if channels_last:
        assert weight.is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------- norm_affine: LayerNorm / RMSNorm / GroupNorm


class Block(nn.Module):
    """A toy pre-norm transformer block: LN -> MultiheadAttention(q=k=v), LN -> MLP, RMSNorm -> two Linears,
    and a LayerNorm whose output also feeds an add (its affine part cannot move)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.rms = nn.RMSNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        h = self.rms(x)
        x = x + self.q(h) * self.k(h)
        y = self.ln_out(x)
        return self.head(y) + y.mean(-1, keepdim=True)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_affine_toy_transformer_block(device):
    torch.manual_seed(0)
    model = randomize_norms(Block().eval()).to(device)
    x = torch.randn(2, 5, 16, device=device)
    folded = check_fold(model, x, norm_affine=True)
    report = report_of(folded, FoldReport)
    got = {f.name: (f.mode, f.into) for f in report.folded}
    assert got == {
        "ln1": ("norm_affine_into_consumer", "attn"),
        "ln2": ("norm_affine_into_consumer", "fc1"),
        "rms": ("norm_affine_into_consumer", "q, k"),
    }
    for name in ("ln1", "ln2"):
        norm = folded.get_submodule(name)
        assert isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and norm.weight is None
    assert folded.get_submodule("rms").weight is None
    assert folded.get_submodule("ln_out").weight is not None
    (skip,) = report.skipped
    assert skip.name == "ln_out" and "affine part not folded" in skip.reason and "mean" in skip.reason
    assert report_of(fold(model), FoldReport).folded == []  # only with norm_affine=True


@pytest.mark.parametrize("padding,mode,folds", [(0, "zeros", True), (1, "reflect", True), (1, "zeros", False)])
def test_norm_affine_group_norm_into_conv(padding, mode, folds):
    model = randomize_norms(nn.Sequential(nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 3, padding=padding,
                                                                         padding_mode=mode)).eval())
    folded = check_fold(model, torch.randn(2, 8, 6, 6), norm_affine=True)
    report = report_of(folded, FoldReport)
    if folds:
        assert [(f.name, f.into) for f in report.folded] == [("0", "1")]
        assert not folded.get_submodule("0").affine
    else:
        assert report.folded == [] and "pads with zeros" in report.skipped[0].reason


def test_norm_affine_functional_layer_norm():
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(F.layer_norm(x, (8,), self.w, self.b, 1e-6))

    model = nn.Sequential(Fn()).eval()
    folded = check_fold(model, torch.randn(3, 8), norm_affine=True)
    report = report_of(folded, FoldReport)
    assert [f.kind for f in report.folded] == ["layer_norm"] and report.forwards == ["0"]
    assert type(folded[0]) is Fn and "self.w" not in folded[0].forward.args[0].source  # weight no longer passed


def test_norm_affine_small_vit_and_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = randomize_norms(VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                            mlp_dim=128).eval())
    folded = check_fold(vit, torch.randn(2, 3, 32, 32), norm_affine=True)
    # per encoder layer: ln_1 -> self_attention (packed in_proj), ln_2 -> mlp.0; the final ln feeds x[:, 0]
    assert sorted(f.into.rsplit(".", 1)[-1] for f in report_of(folded, FoldReport).folded) == ["0", "0", "self_attention",
                                                                                       "self_attention"]
    swin = randomize_norms(SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 2],
                                           window_size=[4, 4]).eval())
    folded = check_fold(swin, torch.randn(1, 3, 32, 32), norm_affine=True)
    folded_names = [f.name for f in report_of(folded, FoldReport).folded]
    # norm2 -> mlp.0 in each of the 4 blocks and PatchMerging's norm -> reduction fold; norm1 feeds the
    # (zero-padding) window attention function
    assert sorted(folded_names) == sorted([f"features.{i}.{j}.norm2" for i in (1, 3) for j in (0, 1)]
                                          + ["features.2.norm"])
    assert all("shifted_window_attention" in s.reason for s in report_of(folded, FoldReport).skipped if s.name.endswith("norm1"))
