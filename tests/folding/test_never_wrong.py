"""Regression tests for the silent wrong folds and broken promises of fxnorm 0.1 (issue "Never wrong").

Each test builds the trap the way a real model would, folds it in float64 and checks that the fold is
exact or refused with its reason, that ``find_norms`` predicted it, and that a refusal or an error
leaves the user's model as it was. Every one of them failed on ``v0.1``.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_norms, rel_err

import fxnorm
from fxnorm import FoldError, FoldReport, FxNormError, find_norms, fold, report_of

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    """Everything that must not change: tensors by name, and module classes by name."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    classes = {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}
    return tensors, classes


def unchanged(model: nn.Module, snap: tuple[dict, dict]) -> bool:
    tensors, classes = snapshot(model)
    return (classes == snap[1] and tensors.keys() == snap[0].keys()
            and all(torch.equal(tensors[k], snap[0][k]) for k in tensors))


def fold_checked(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[nn.Module, FoldReport]:
    """Fold a float64 copy: the original is unchanged, the output exact, find_norms predicted it."""
    model = randomize_norms(model).double().eval()
    x = x.double()
    if "example_inputs" in kwargs:
        kwargs["example_inputs"] = tuple(t.double() for t in kwargs["example_inputs"])
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(x)
        predicted = {s.name: s.fold for s in find_norms(model, **{k: v for k, v in kwargs.items()
                                                                    if k in ("example_inputs", "allow_hooks")})}
        folded = fold(model, **kwargs)
        err = rel_err(folded(x), ref)
    assert unchanged(model, snap)
    assert err < 1e-9, f"relative error {err}"
    report = report_of(folded, FoldReport)
    assert {f.name: f.mode for f in report.folded} == {k: v for k, v in predicted.items() if v is not None}
    return folded, report


# 1 ------------------------------------------------------------------------------------------------
class TorchBatchNorm(nn.Module):
    """torch.batch_norm(input, weight, bias, running_mean, running_var, ...): weight and bias first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(self.conv(x), self.w, self.b, self.rm, self.rv, False, 0.1, 1e-5, False)


def test_1_torch_batch_norm_is_read_with_its_own_argument_order():
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_checked(nn.Sequential(TorchBatchNorm()), x, example_inputs=(x,))
    assert [(f.name, f.into) for f in report.folded] == [("0", "0.conv")]


# 2 ------------------------------------------------------------------------------------------------
class FlattenedBN1dIntoLinear(nn.Module):
    """BatchNorm1d on x.flatten(1, 2) of a 4-D tensor: rank 3, its channels are dim 1, not the
    Linear's input features (the last dim), even though both are 6 wide."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.flatten(start_dim=1, end_dim=2)))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_2_flatten_with_end_dim_keeps_rank_three(with_inputs):
    x = torch.randn(3, 2, 3, 6)
    _, report = fold_checked(FlattenedBN1dIntoLinear(), x, **({"example_inputs": (x,)} if with_inputs else {}))
    (skip,) = report.skipped
    assert report.folded == [] and "at rank 3 the BatchNorm1d channels" in skip.reason


# 3 ------------------------------------------------------------------------------------------------
class WeightReadInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class SharedWeightFunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


@pytest.mark.parametrize("model", [WeightReadInForward, SharedWeightFunctionalConv])
def test_3_a_weight_read_elsewhere_is_not_folded_into(model):
    _, report = fold_checked(model(), torch.randn(2, 3, 6, 6))
    (skip,) = report.skipped
    assert report.folded == [] and "the weight of producer conv is also read by" in skip.reason


# 4 ------------------------------------------------------------------------------------------------
class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class EagerCallsTheConv(nn.Module):
    """The body traces; the glue does not (data-dependent branch) and also calls body.conv directly."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if float(y.sum()) > -1e30:
            y = y + self.body.conv(x)
        return y


def test_4_a_layer_eager_code_also_calls_is_refused_with_example_inputs():
    x = torch.randn(2, 3, 5, 5)
    _, report = fold_checked(EagerCallsTheConv(), x, example_inputs=(x.double(),))
    (skip,) = report.skipped
    assert report.folded == [] and "eager code calls it too" in skip.reason


def test_4_without_example_inputs_the_fold_is_unverified_and_strict_refuses_it():
    model = randomize_norms(EagerCallsTheConv()).eval()
    sites = find_norms(model)
    assert [(s.name, s.evidence) for s in sites] == [("body.bn", "unverified")]
    snap = snapshot(model)
    with pytest.raises(FoldError, match="body.bn.*example_inputs"):
        fold(model, strict=True, inplace=True)
    assert unchanged(model, snap)


# 5 ------------------------------------------------------------------------------------------------
class HeldInAList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.norms = [self.bn]  # a plain list: not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[0](self.conv(x))


class CachedBoundMethod(nn.Module):
    """A cached bound method of the norm: code outside the forward (a library helper) may call it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.normalize = self.bn.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("model, where", [(HeldInAList, "norms"), (CachedBoundMethod, "normalize")])
def test_5_a_norm_held_outside_the_module_tree_is_refused(model, where):
    _, report = fold_checked(model(), torch.randn(2, 3, 6, 6))
    assert report.folded == [] and any(f"held outside the module tree ({where})" in s.reason for s in report.skipped)


# 6 ------------------------------------------------------------------------------------------------
def test_6_a_forward_replaced_on_the_instance_is_never_a_plain_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bn = model[1]
    bn.forward = lambda x: nn.BatchNorm2d.forward(bn, x) * 2  # type: ignore[method-assign]
    (site,) = find_norms(randomize_norms(model).eval())
    assert site.fold is None and "replaced on the instance" in site.reason
    _, report = fold_checked(model, torch.randn(2, 3, 6, 6))
    assert report.folded == []


# 7 ------------------------------------------------------------------------------------------------
def _weight_norm(conv: nn.Module) -> nn.Module:
    return torch.nn.utils.parametrizations.weight_norm(conv)


def _old_weight_norm(conv: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.utils.weight_norm(conv)


@pytest.mark.parametrize("wrap, why", [(_weight_norm, "parametrized"), (_old_weight_norm, "weight_norm")])
def test_7_a_parametrized_producer_is_refused_with_the_reason(wrap, why):
    model = nn.Sequential(wrap(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    _, report = fold_checked(model, torch.randn(2, 3, 6, 6))
    assert report.folded == [] and why in report.skipped[0].reason


# 8 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, why", [(-2.0, "running_var + eps is not positive"), (float("nan"), "NaN/Inf")])
def test_8_unhealthy_statistics_are_refused_by_find_norms_and_fold_alike(value, why):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double().eval()
    model[1].running_var[1] = value
    (site,) = find_norms(model)
    folded = fold(model)
    assert site.fold is None and why in site.reason
    assert report_of(folded, FoldReport).folded == [] and why in report_of(folded, FoldReport).skipped[0].reason


def test_8_find_norms_predicts_a_chain_of_folds():
    x = torch.randn(2, 3, 6, 6)
    _, report = fold_checked(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)), x)
    assert [(f.name, f.into) for f in report.folded] == [("1", "0"), ("2", "0")]


def test_a_chain_of_norms_before_a_conv_folds_nearest_first():
    """bn_a -> bn_b -> conv: bn_b folds into the conv first, then bn_a (found by the fuzzer: in the
    other order the bias of the conv is wrong)."""
    x = torch.randn(2, 4, 5, 5)
    _, report = fold_checked(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)), x)
    assert [(f.name, f.mode) for f in report.folded] == [("1", "into_consumer"), ("2", "into_consumer")]


# 9 ------------------------------------------------------------------------------------------------
class PartlyTraced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.loose = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.loose(y) if float(y.sum()) > -1e30 else y


def test_9_strict_in_place_on_a_part_by_part_model_changes_nothing():
    model = randomize_norms(PartlyTraced()).eval()
    children = dict(model.named_children())
    snap = snapshot(model)
    with pytest.raises(FoldError, match="loose"):
        fold(model, inplace=True, strict=True, example_inputs=(torch.randn(1, 3, 4, 4),))
    assert unchanged(model, snap) and dict(model.named_children()) == children


# 11 -----------------------------------------------------------------------------------------------
def test_11_meta_models_are_inspected_and_folded():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    (site,) = find_norms(model)
    assert site.fold == "into_producer" and site.health == []
    folded = fold(model)
    assert folded[0].weight.is_meta and isinstance(folded[1], nn.Identity)


def test_11_torchscript_is_refused_with_what_to_pass_instead():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    for call in (find_norms, fold, fxnorm.trace):
        with pytest.raises(FxNormError, match="TorchScript"):
            call(scripted)


def test_failed_folds_leave_in_place_models_intact_on_errors_from_the_commit(monkeypatch):
    """A failure (here an interrupt) while changing the module tree puts everything back."""
    model = randomize_norms(nn.Sequential(nn.Sequential(TorchBatchNorm()), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    children = {name: m for name, m in model.named_modules()}
    snap = snapshot(model)
    from fxnorm.folding import changes

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(changes, "install_forward", interrupted)  # the last kind of change made
    with pytest.raises(KeyboardInterrupt):
        fold(model, inplace=True, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert unchanged(model, snap) and {name: m for name, m in model.named_modules()} == children
    assert "forward" not in vars(model[0][0])
