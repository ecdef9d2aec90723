"""Tests for fxnorm.calibration.recalibration on toy models: statistics against hand-computed float64
references, reset semantics, batch formats, the pitfalls of update_bn, and transactional failures."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from devices import DEVICES
from torch.optim.swa_utils import update_bn

from fxnorm.calibration import observers as observers
from helpers import (assert_model_unchanged, capture_norm_inputs, float64_moments, model_snapshot,
                     randomize_norms)
from fxnorm import (
    finish_recalibration,
    prepare_recalibration,
    recalibrate,
    reset,
    CalibrationError,
    DataError,
    report_of,
    CalibrationReport,
    ResetReport,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers




def assert_stats(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor, tol: float = 1e-6) -> None:
    """|mean error| / std and |var error| / var below ``tol`` in every channel."""
    got_mean, got_var = norm.running_mean.double().cpu(), norm.running_var.double().cpu()
    mean_err = ((got_mean - mean.cpu()).abs() / var.cpu().sqrt()).max().item()
    var_err = ((got_var - var.cpu()).abs() / var.cpu()).max().item()
    assert mean_err <= tol and var_err <= tol, (mean_err, var_err)


def batch_norm_train(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Training-mode batch norm by hand, in float64 (biased batch variance, like PyTorch)."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    y = (x - mean) / (var + bn.eps).sqrt()
    return y * bn.weight.double().view(shape) + bn.bias.double().view(shape)


def run_session(model: nn.Module, batches: list, **kwargs) -> dict[str, list[torch.Tensor]]:
    """prepare_recalibration, the batches through the model itself (inputs of every norm module captured
    by forward pre-hooks), finish_recalibration; returns the captured inputs by norm name."""
    with capture_norm_inputs(model) as seen, prepare_recalibration(model, **kwargs) as session:
        with torch.inference_mode():
            for b in batches:
                model(b)
        finish_recalibration(session)
    return {name: xs for name, xs in seen.items() if xs}


def snapshot(model: nn.Module) -> dict:
    return model_snapshot(model)


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    assert_model_unchanged(model, snap)


def drifting(sizes: tuple[int, ...], shape: tuple[int, ...], step: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    """Unshuffled batches whose mean drifts by ``step`` per batch, of the given batch sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=gen) * (1 + 0.2 * i) + step * i for i, n in enumerate(sizes)]


SIZES = (8, 8, 8, 3)  # the last batch is short

# ---------------------------------------------------------------------------------------------
# statistics


def test_two_norms_against_hand_computed_float64_reference():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.BatchNorm2d(5))).eval()
    batches = drifting(SIZES, (3, 6, 6))
    conv, bn1, bn2 = model[0], model[1], model[3]
    with torch.no_grad():
        first = [F.conv2d(x.double(), conv.weight.double(), conv.bias.double()) for x in batches]
        second = [batch_norm_train(y, bn1).relu() for y in first]  # bn1 normalizes with each batch's statistics
    model = recalibrate(model, batches)
    for bn, inputs in ((bn1, first), (bn2, second)):
        mean, var, count = float64_moments(inputs, unbiased=True)
        assert_stats(bn, mean, var)
        assert bn.num_batches_tracked.item() == len(batches)
    assert count == sum(SIZES) * 16


def test_unbiased_running_var_by_hand():
    bn = nn.BatchNorm1d(1)
    recalibrate(bn, [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [7.0], [9.0]])])
    # values 1, 3, 5, 7, 9: mean 5, squared deviations 16 + 4 + 0 + 4 + 16 = 40, unbiased 40 / 4
    assert bn.running_mean.item() == pytest.approx(5.0, rel=1e-7)
    assert bn.running_var.item() == pytest.approx(10.0, rel=1e-7)
    assert bn.num_batches_tracked.item() == 2


def test_update_bn_is_off_on_an_unshuffled_loader_and_we_are_exact():
    """update_bn averages per-batch variances with equal weight: it loses the spread of the batch
    means and overweights the short last batch (pitfall 2)."""
    model = randomize_norms(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
    batches = drifting(SIZES, (6,))
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]
    mean, var, _ = float64_moments(inputs, unbiased=True)
    theirs = copy.deepcopy(model)
    update_bn(batches, theirs)
    their_err = ((theirs[1].running_var.double() - var).abs() / var).max().item()
    assert their_err > 0.05
    recalibrate(model, batches)
    assert_stats(model[1], mean, var)


@pytest.mark.parametrize("where", ["dropout", "stochastic_depth"])
def test_dropout_and_stochastic_depth_are_off(where):
    """update_bn calls model.train(): dropout and stochastic depth run while it gathers (pitfall 1)."""
    torch.manual_seed(0)
    drop = nn.Dropout(0.5) if where == "dropout" else torchvision.ops.StochasticDepth(0.5, "row")
    model = randomize_norms(nn.Sequential(nn.Linear(6, 4), drop, nn.BatchNorm1d(4))).train()
    batches = drifting(SIZES, (6,))
    with torch.no_grad():
        mean, var, _ = float64_moments([model[0](x) for x in batches], unbiased=True)
    theirs = copy.deepcopy(model)
    update_bn(batches, theirs)
    assert ((theirs[2].running_var.double() - var).abs() / var).max().item() > 0.1
    model = recalibrate(model, batches)
    assert_stats(model[2], mean, var)
    assert all(m.training for m in model.modules())  # the original modes are back


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


@pytest.mark.parametrize("case", ["bn1d_2d", "bn1d_3d", "bn2d", "bn3d", "channels_last", "float64"])
def test_ranks_layouts_and_dtypes_against_captured_inputs(case):
    torch.manual_seed(0)
    if case == "bn1d_2d":
        model, shape = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (5,)
    elif case == "bn1d_3d":
        model, shape = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (3, 9)
    elif case == "bn3d":
        model, shape = nn.Sequential(nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6)), (3, 4, 5, 5)
    else:
        model, shape = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6)), (3, 7, 7)
    model = randomize_norms(model).eval()
    batches = drifting(SIZES, shape)
    if case == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    if case == "float64":
        model, batches = model.double(), [b.double() for b in batches]
    seen = run_session(model, batches)
    assert len(seen) == (1 if case.startswith("bn1d") or case == "bn3d" else 2)
    for name, inputs in seen.items():
        mean, var, _ = float64_moments(inputs, unbiased=True)
        assert_stats(model.get_submodule(name), mean, var, tol=1e-12 if case == "float64" else 1e-6)
        assert model.get_submodule(name).running_var.dtype == batches[0].dtype


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_batches_than_the_scratch_table_holds(layout):
    """Statistics wait in a table of ROWS batches and are merged when it is full: cross it twice."""
    count = 2 * observers.ROWS + 3
    sizes = tuple(3 + i % 4 for i in range(count))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    batches = [b.contiguous(memory_format=fmt) for b in drifting(sizes, (3, 4, 4), step=0.2)]
    bn = nn.BatchNorm2d(3)
    recalibrate(bn, batches)
    assert_stats(bn, *float64_moments(batches, unbiased=True)[:2])
    assert bn.num_batches_tracked.item() == count
    bad = [b.clone() for b in batches]
    bad[count - 4][0, 1, 0, 0] = float("nan")
    snap = snapshot(bn)
    expected = rf"batch {count - 4}: the input of norm '<BatchNorm2d>' has NaN/Inf statistics in channel\(s\) 1 "
    with pytest.raises(DataError, match=expected):
        recalibrate(bn, bad)
    assert_unchanged(bn, snap)


def test_large_offset_has_no_cancellation():
    """Inputs whose mean is 1e3 standard deviations away from 0: squares about the mean are needed."""
    bn = nn.BatchNorm2d(3)
    batches = [torch.randn(4, 3, 8, 8) * 0.01 + 10.0 + i for i in range(4)]
    recalibrate(bn, batches)
    mean, var, _ = float64_moments(batches, unbiased=True)
    assert_stats(bn, mean, var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_its_dtype(dtype):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    model = model.to(dtype)
    batches = [b.to(dtype) for b in drifting(SIZES, (3, 6, 6))]
    seen = run_session(model, batches)
    assert len(seen) == 2
    for name, inputs in seen.items():
        bn = model.get_submodule(name)
        mean, var, _ = float64_moments(inputs, unbiased=True)  # the half inputs themselves, in float64
        assert bn.running_mean.dtype == bn.running_var.dtype == dtype
        torch.testing.assert_close(bn.running_mean, mean.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, var.to(dtype), rtol=0, atol=0)


def test_instance_norm_with_running_stats_normalizes_per_instance_and_pools_per_channel():
    model = randomize_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.BatchNorm2d(4))).eval()
    batches = drifting(SIZES, (3, 6, 6))
    inorm, bn = model[1], model[2]
    with torch.no_grad():
        first = [model[0](x).double() for x in batches]
        second = [F.instance_norm(y, weight=inorm.weight.double(), bias=inorm.bias.double(), eps=inorm.eps)
                  for y in first]
    recalibrate(model, batches)
    for norm, inputs in ((inorm, first), (bn, second)):
        mean, var, _ = float64_moments(inputs, unbiased=True)
        assert_stats(norm, mean, var)


def test_sync_batch_norm_on_one_process():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))).eval()
    batches = drifting(SIZES, (3, 6, 6))
    with torch.no_grad():
        mean, var, _ = float64_moments([model[0](x) for x in batches], unbiased=True)
    recalibrate(model, batches)
    assert_stats(model[1], mean, var)


class BNReLU(nn.BatchNorm2d):
    """A BN subclass whose forward adds an activation: its batch_norm call is caught inside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).relu()


class Branchy(nn.Module):
    """Data-dependent control flow (no tracer gets through it) and a norm it never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), BNReLU(4))
        self.never = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() < -1e9:  # never true
            y = self.never(y)
        return self.block(y)


def test_data_dependent_forward_subclass_and_unreached_norm():
    model = randomize_norms(Branchy()).eval()
    batches = drifting(SIZES, (3, 6, 6))
    with torch.no_grad():
        first = [F.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double()) for x in batches]
        second = [F.conv2d(batch_norm_train(y, model.bn), model.block[0].weight.double(),
                           model.block[0].bias.double()) for y in first]
    never = copy.deepcopy(model.never.state_dict())
    model = recalibrate(model, batches)
    report = report_of(model, CalibrationReport)
    for norm, inputs in ((model.bn, first), (model.block[1], second)):
        mean, var, _ = float64_moments(inputs, unbiased=True)
        assert_stats(norm, mean, var)
        assert norm.num_batches_tracked.item() == len(batches)
    assert report.unreached == ["never"]
    assert all(torch.equal(v, never[k]) for k, v in model.never.state_dict().items())
    assert [s.name for s in report.layers] == ["bn", "block.1"]
    assert type(model) is Branchy and type(model.block[1]) is BNReLU


class ByHand(nn.BatchNorm2d):
    """A BN subclass that normalizes by hand with its running statistics (no batch_norm call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (x - self.running_mean.view(shape)) / (self.running_var.view(shape) + self.eps).sqrt()


def test_subclass_without_a_batch_norm_call_is_reported_and_left_alone():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), ByHand(4))).eval()
    before = copy.deepcopy(model[2].state_dict())
    batches = drifting(SIZES, (3, 6, 6))
    model = recalibrate(model, batches)
    report = report_of(model, CalibrationReport)
    assert list(report.unsupported) == ["2"]
    assert f"ByHand ran {len(batches)} time(s) without calling batch_norm" in report.unsupported["2"]
    assert all(torch.equal(v, before[k]) for k, v in model[2].state_dict().items())
    assert [s.name for s in report.layers] == ["1"] and report.unreached == []


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(x)))


def test_norm_called_twice_pools_both_calls():
    model = randomize_norms(Twice()).eval()
    batches = drifting(SIZES, (3, 5, 5))
    bn = model.bn
    with torch.no_grad():
        second = [F.conv2d(batch_norm_train(x.double(), bn), model.conv.weight.double(), model.conv.bias.double())
                  for x in batches]
    model = recalibrate(model, batches)
    report = report_of(model, CalibrationReport)
    mean, var, count = float64_moments([x.double() for x in batches] + second, unbiased=True)
    assert_stats(bn, mean, var)
    assert bn.num_batches_tracked.item() == 2 * len(batches)
    assert report.layers[0].count == count and report.layers[0].batches == 2 * len(batches)


def test_one_value_per_channel_is_skipped_counted_and_reported():
    """Training-mode BN raises on a batch of one (N, C) sample (pitfall 5): skip it for that layer."""
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 4),
                                    nn.BatchNorm1d(4))).eval()
    batches = drifting((6, 5, 1), (3, 4, 4))
    with torch.no_grad():
        conv = [model[0](x).double() for x in batches]
        fc = [F.linear(batch_norm_train(y, model[1]).flatten(1), model[3].weight.double(), model[3].bias.double())
              for y in conv]
    model = recalibrate(model, batches)
    report = report_of(model, CalibrationReport)
    assert_stats(model[1], *float64_moments(conv, unbiased=True)[:2])  # 2x2 values per channel: the batch of one counts
    assert_stats(model[4], *float64_moments(fc[:2], unbiased=True)[:2])  # one value per channel: skipped
    assert report.skipped_batches == {"4": 1}
    assert model[4].num_batches_tracked.item() == 2 and model[1].num_batches_tracked.item() == 3


def test_select_updates_only_chosen_norms_and_others_run_in_eval_mode():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.BatchNorm2d(4))).train()
    batches = drifting(SIZES, (3, 6, 6))
    first = copy.deepcopy(model[1].state_dict())
    with torch.no_grad():  # the unselected first norm normalizes with its own running statistics
        second = [torch.tanh(F.batch_norm(model[0](x), model[1].running_mean, model[1].running_var, model[1].weight,
                                      model[1].bias, False, 0.0, model[1].eps)) for x in batches]
    model = recalibrate(model, batches, select="3")
    report = report_of(model, CalibrationReport)
    assert all(torch.equal(v, first[k]) for k, v in model[1].state_dict().items())
    assert_stats(model[3], *float64_moments(second, unbiased=True)[:2])
    assert [s.name for s in report.layers] == ["3"] and model.training


def test_batch_size_one_biases_deeper_norms_and_select_recalibrates_level_by_level():
    """At batch size 1 every earlier norm normalizes with the statistics of one sample, so a deeper
    norm receives other inputs than at inference (pitfall 9: too little variance, or here too much):
    its statistics are exact for what it received, not for what it gets in eval mode. Recalibrating one norm at a time in forward order
    with ``select`` (the others run in eval mode with their new statistics) gives every norm the
    statistics of its eval-mode input."""
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                                          nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6))).eval()
    data = drifting((1,) * 12, (3, 9, 9), step=0.3)

    def eval_inputs(m: nn.Module) -> dict[str, list[torch.Tensor]]:
        with capture_norm_inputs(m) as seen, torch.no_grad():
            for x in data:
                m(x)
        return seen

    joint = recalibrate(copy.deepcopy(model), data)
    mean, var, _ = float64_moments(eval_inputs(joint)["7"], unbiased=True)
    assert ((joint[7].running_var.double() - var).abs() / var).max().item() > 0.05  # not its eval-mode input
    for name in ("1", "4", "7"):  # forward order
        recalibrate(model, data, select=name)
    for name, inputs in eval_inputs(model).items():
        assert_stats(model.get_submodule(name), *float64_moments(inputs, unbiased=True)[:2])


def test_num_batches_limits_the_data():
    bn = nn.BatchNorm1d(3)
    batches = drifting((4, 4, 4, 4), (3,))
    recalibrate(bn, iter(batches), num_batches=2)
    assert_stats(bn, *float64_moments(batches[:2], unbiased=True)[:2])
    assert bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("fmt", ["tensor", "tuple", "list", "dict", "forward", "single_tensor"])
def test_batch_formats(fmt):
    model = randomize_norms(Net1d()).eval()
    batches = drifting(SIZES, (5,))
    labels = torch.zeros(8)
    forward = None
    if fmt == "tuple":
        data = [(x, labels) for x in batches]
    elif fmt == "list":
        data = [[x, labels] for x in batches]
    elif fmt == "dict":
        data = [{"x": x} for x in batches]
    elif fmt == "forward":
        data = [{"inputs": x, "labels": labels} for x in batches]
        forward = lambda m, b: m(b["inputs"])  # noqa: E731
    elif fmt == "single_tensor":
        data = batches = torch.cat(batches)
        batches = [batches]
    else:
        data = batches
    with torch.no_grad():
        mean, var, _ = float64_moments([model.fc(x) for x in batches], unbiased=True)
    model = recalibrate(model, data, forward=forward)
    report = report_of(model, CalibrationReport)
    assert_stats(model.bn, mean, var)
    assert report.num_batches == len(batches) and report.num_samples == sum(b.shape[0] for b in batches)


class TwoInputs(nn.Module):
    """A forward of two inputs, one of them raising a TypeError of its own on a wrong dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor")
        return self.bn(self.fc(x * mask))


@pytest.mark.parametrize("fmt", ["dict_extra_key", "dict_missing_key", "tuple", "tensor", "inside"])
def test_a_batch_that_does_not_fit_the_forward_is_a_data_error_naming_forward(fmt):
    """A batch whose structure does not bind to the model's forward is the data's fault: a DataError
    that names the batch, the signature and the remedy (forward=); a TypeError raised inside the
    forward stays the model's (CalibrationError, cause chained). Nothing changes either way."""
    model = randomize_norms(TwoInputs()).eval()
    snap = snapshot(model)
    x, mask = torch.randn(8, 5), torch.ones(8, 1, dtype=torch.bool)
    data = {"dict_extra_key": [{"x": x, "mask": mask, "labels": torch.zeros(8)}],
            "dict_missing_key": [{"x": x}], "tuple": [(x, mask)], "tensor": [x],
            "inside": [{"x": x, "mask": mask.float()}]}[fmt]
    if fmt == "inside":
        with pytest.raises(CalibrationError, match="batch 0: the model raised TypeError: mask must be a bool") as info:
            recalibrate(model, data)
        assert not isinstance(info.value, DataError)
    else:
        with pytest.raises(DataError, match=r"batch 0 is a .* which does not fit TwoInputs\.forward\(x, mask\) "
                                            r"\(.*\): pass forward=lambda model, batch: \.\.\."):
            recalibrate(model, data)
    assert_unchanged(model, snap)
    fitted = recalibrate(model, [(x, mask)], forward=lambda m, b: m(*b))  # the remedy
    assert report_of(fitted, CalibrationReport).num_batches == 1


def test_progress_bar_counts_batches(capsys):
    recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2) for _ in range(3)], progress=True)
    assert "3/3" in capsys.readouterr().err


def test_runs_under_inference_mode_without_autograd_state():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    modes = []
    model[0].register_forward_hook(lambda m, a, out: modes.append((torch.is_inference_mode_enabled(), out.grad_fn)))
    recalibrate(model, [torch.randn(4, 4) for _ in range(2)])
    assert modes == [(True, None), (True, None)]
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# reset


def test_reset_matches_reset_running_stats_and_select_forms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.LayerNorm(4), nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4)))
    cases = [
        (None, ["1", "2", "4.0", "4.1"]),
        ("4.*", ["4.0", "4.1"]),
        (["1", "4.1"], ["1", "4.1"]),
        (nn.BatchNorm2d, ["1", "4.1"]),
        ((nn.BatchNorm1d, nn.InstanceNorm2d), ["2", "4.0"]),
        (lambda name, m: name.endswith("0"), ["4.0"]),
    ]
    for sel, expected in cases:
        randomize_norms(model)
        ref = copy.deepcopy(model)
        for name in expected:
            ref.get_submodule(name).reset_running_stats()
        with torch.no_grad():
            out = reset(model, select=sel)
            names = report_of(out, ResetReport).names
        assert out is model and names == expected
        for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), (sel, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_reset_keeps_dtype_under_inference_mode(dtype):
    model = randomize_norms(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))).to(dtype)
    with torch.inference_mode():
        reset(model)
    bn = model[1]
    assert bn.running_mean.dtype == dtype and torch.equal(bn.running_mean, torch.zeros(3, dtype=dtype))
    assert torch.equal(bn.running_var, torch.ones(3, dtype=dtype)) and bn.num_batches_tracked.item() == 0


def test_reset_leaves_frozen_and_lazy_norms_alone():
    frozen = torchvision.ops.FrozenBatchNorm2d(3)
    randomize_norms(frozen)
    model = randomize_norms(nn.Sequential(nn.BatchNorm2d(3), frozen)).append(nn.LazyBatchNorm2d())
    before = frozen.running_mean.clone()
    names = report_of(reset(model), ResetReport).names
    assert names == ["0"] and torch.equal(frozen.running_mean, before)


@pytest.mark.parametrize("fn", ["reset", "recalibrate"])
@pytest.mark.parametrize("bad", ["no_norms", "layer_norm_only", "select_matches_nothing", "select_malformed"])
def test_bad_model_or_select_changes_nothing(fn, bad):
    model = randomize_norms(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    sel = None
    if bad == "no_norms":
        model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    elif bad == "layer_norm_only":
        model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    elif bad == "select_matches_nothing":
        sel = "layer9.*"
    else:
        sel = 3.5
    snap = snapshot(model)
    with pytest.raises(CalibrationError) as info:
        if fn == "reset":
            reset(model, select=sel)
        else:
            recalibrate(model, [torch.randn(4, 3)], select=sel)
    message = str(info.value)
    expected = {"no_norms": "no normalization layer", "layer_norm_only": "LayerNorm",
                "select_matches_nothing": "matches none", "select_malformed": "not understood"}[bad]
    assert expected in message
    assert_unchanged(model, snap)


def test_lazy_norm_must_be_initialized_before_prepare():
    with pytest.raises(CalibrationError, match="not initialized"):
        prepare_recalibration(nn.Sequential(nn.Linear(2, 3), nn.LazyBatchNorm1d()))


# ---------------------------------------------------------------------------------------------
# failures leave the model exactly as it was


class Flaky(nn.Module):
    """Raises on its ``fail_at``-th call (untraceable, so the model is traced part by part)."""

    def __init__(self, fail_at: int, error: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.dim() and self.calls == self.fail_at:
            raise self.error("boom")
        return x


def failing_model() -> nn.Module:
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), Flaky(0),
                                   nn.BatchNorm2d(4))).train()


def bad_batches(kind: str) -> list[torch.Tensor]:
    batches = drifting(SIZES, (3, 6, 6))
    batches[1] = batches[1].clone()
    batches[1][0, 0, 0, 0] = float("nan") if kind == "nan" else float("inf")
    return batches


def test_model_raising_mid_way():
    model = failing_model()
    model[3].fail_at = 3
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="batch 2: the model raised RuntimeError: boom") as info:
        recalibrate(model, drifting(SIZES, (3, 6, 6)))
    assert isinstance(info.value.__cause__, RuntimeError)
    model[3].calls = 0
    assert_unchanged(model, snap)


def test_interrupt_mid_way_restores_modes():
    model = failing_model()
    model[3].fail_at, model[3].error = 2, KeyboardInterrupt
    snap = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, drifting(SIZES, (3, 6, 6)))
    model[3].calls = 0
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_batch_names_batch_and_layer(kind):
    model = failing_model()
    snap = snapshot(model)
    expected = r"batch 1: the input of norm '1' has NaN/Inf statistics in channel\(s\) 0, 1, 2, 3 \(4 of 4\)"
    with pytest.raises(DataError, match=expected):
        recalibrate(model, bad_batches(kind))
    model[3].calls = 0  # Flaky counts its calls
    assert_unchanged(model, snap)


def test_non_finite_batch_in_prepare_convert_flow_is_a_calibration_error_too():
    model = failing_model()
    snap = snapshot(model)
    with prepare_recalibration(model) as session:
        for b in bad_batches("nan"):
            model(b)
        with pytest.raises(CalibrationError, match="batch 1: .* norm '1'"):
            finish_recalibration(session)
    model[3].calls = 0  # Flaky counts its calls
    assert_unchanged(model, snap)


def test_statistics_that_overflow_the_buffer_dtype():
    """Half inputs up to ~4000 are finite, but their variance (~1e6) is not a float16."""
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(2)).half()
    batches = [(torch.randn(8, 2) * 1000).half() for _ in range(2)]
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="norm '1': the recalibrated statistics do not fit in torch.float16"):
        recalibrate(model, batches)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kind", ["empty", "iterator_raises", "not_iterable", "bad_batch", "bad_num_batches"])
def test_bad_data(kind):
    model = failing_model()
    snap = snapshot(model)
    kwargs = {}
    if kind == "empty":
        data, match = [], "yielded no batch"
    elif kind == "iterator_raises":
        def gen():
            yield torch.randn(4, 3, 6, 6)
            raise OSError("disk gone")
        data, match = gen(), "reading calibration batch 1 failed: OSError: disk gone"
    elif kind == "not_iterable":
        data, match = 42, "must be an iterable"
    elif kind == "bad_batch":
        data, match = [torch.randn(4, 3, 6, 6), "oops"], "batch 1 is a str"
    else:
        data, match, kwargs = [torch.randn(4, 3, 6, 6)], "num_batches must be a positive int", {"num_batches": 0}
    with pytest.raises(DataError, match=match):
        recalibrate(model, data, **kwargs)
    model[3].calls = 0  # Flaky counts its calls
    assert_unchanged(model, snap)


def test_failed_forward_in_prepare_flow_blocks_convert():
    model = failing_model()
    model[3].fail_at = 2
    snap = snapshot(model)
    session = prepare_recalibration(model)
    model(torch.randn(4, 3, 6, 6))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(4, 3, 6, 6))
    assert [m.training for m in model.modules()] == [True] * 6  # the flags are back after the failed forward
    model(torch.randn(4, 3, 6, 6))
    with pytest.raises(CalibrationError, match="forward of batch 1 raised"):
        finish_recalibration(session)
    assert session.closed
    model[3].calls = 0
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# report


def test_report_figures_by_hand():
    bn = nn.BatchNorm1d(2)  # mean 0, var 1
    bn = recalibrate(bn, [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[5.0, 4.0], [7.0, 4.0]])])
    report = report_of(bn, CalibrationReport)
    (layer,) = report.layers
    # new mean (4, 2), unbiased var (20/3, 16/3); old mean 0, var 1
    assert layer.mean_shift == pytest.approx(4.0 / math.sqrt(1 + bn.eps))
    assert layer.var_ratio == pytest.approx(math.log((20 / 3 + bn.eps) / (1 + bn.eps)))
    assert (layer.count, layer.batches, layer.kind) == (4, 2, "BatchNorm1d")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == "" and data["num_samples"] == 4 and report.moved_most(1) == [layer]


# ---------------------------------------------------------------------------------------------
# distributed


def run_ranks(monkeypatch, jobs: list) -> list:
    """Run ``jobs`` (one callable per simulated rank) in threads whose ``dist.all_reduce`` sums over
    them and ``dist.all_gather`` gathers by rank; return what each returned or raised (the real
    multi-process runs are in test_distributed.py)."""
    world = len(jobs)
    barrier, lock, pending = threading.Barrier(world, timeout=60), threading.Lock(), {}

    def exchange(tensor):
        with lock:
            pending[int(threading.current_thread().name)] = tensor.clone()
        barrier.wait()
        gathered = [pending[r] for r in range(world)]
        barrier.wait()
        with lock:
            pending.clear()
        barrier.wait()
        return gathered

    def all_reduce(tensor, group=None):
        tensor.copy_(sum(exchange(tensor)))

    def all_gather(out, tensor, group=None):
        for o, t in zip(out, exchange(tensor)):
            o.copy_(t)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    results: list = [None] * world

    def rank(i):
        try:
            results[i] = jobs[i]()
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=rank, args=(i,), name=str(i)) for i in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    return results


def ranks_calibrating(models: list[nn.Module], shards: list[list[torch.Tensor]]) -> list:
    sessions = [prepare_recalibration(m) for m in models]

    def job(i):
        def run():
            with sessions[i], torch.inference_mode():  # the batches run in this thread
                for b in shards[i]:
                    models[i](b)
                return finish_recalibration(sessions[i])
        return run

    return [job(i) for i in range(len(models))]


def test_all_reduce_over_simulated_ranks_equals_one_process(monkeypatch):
    """Two ranks (threads) with unequal shards; sums and counts are all-reduced (pitfall 6)."""
    base = randomize_norms(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4))).eval()
    batches = drifting((8, 8, 8, 3, 5), (5,))
    models = [copy.deepcopy(base) for _ in range(2)]
    results = run_ranks(monkeypatch, ranks_calibrating(models, [batches[:2], batches[2:]]))
    assert results[0] is models[0] and results[1] is models[1]
    single = recalibrate(copy.deepcopy(base), batches)
    with torch.no_grad():
        mean, var, _ = float64_moments([base[0](x) for x in batches], unbiased=True)
    for m in models:
        assert_stats(m[1], mean, var)
        assert m[1].num_batches_tracked.item() == len(batches)
        for (k, v), v2 in zip(m.state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(v, v2, rtol=1e-6, atol=1e-7, msg=k)


def test_a_failing_rank_fails_every_rank_and_changes_nothing(monkeypatch):
    base = randomize_norms(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).eval()
    batches = drifting((8, 8, 8), (5,))
    bad = batches[2].clone()
    bad[0, 0] = float("nan")
    models = [copy.deepcopy(base) for _ in range(2)]
    snaps = [snapshot(m) for m in models]
    results = run_ranks(monkeypatch, ranks_calibrating(models, [batches[:2], [bad]]))
    assert isinstance(results[1], DataError) and "batch 0" in str(results[1])
    assert isinstance(results[0], CalibrationError) and "process(es) 1 of 2 failed" in str(results[0])
    for m, snap in zip(models, snaps):
        assert_unchanged(m, snap)


def test_convert_can_wait_for_batches_but_not_be_retried_after_merging():
    bn = nn.BatchNorm1d(2)
    session = prepare_recalibration(bn)
    with pytest.raises(DataError, match="no batch"):
        finish_recalibration(session)
    assert not session.closed  # nothing merged: more batches may come
    bn(torch.randn(4, 2))
    assert finish_recalibration(session) is bn and bn.num_batches_tracked.item() == 1
    half = nn.BatchNorm1d(2).half()
    session = prepare_recalibration(half)
    half((torch.randn(8, 2) * 1000).half())
    with pytest.raises(CalibrationError, match="do not fit in torch.float16"):
        finish_recalibration(session)
    assert session.closed
    with pytest.raises(CalibrationError, match=r"finish_recalibration\(\) failed \(NonFiniteStatistics\)"):
        finish_recalibration(session)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_all_reduce_through_a_real_gloo_group_of_one(tmp_path):
    base = randomize_norms(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).eval()
    batches = drifting(SIZES, (5,))
    expected = recalibrate(copy.deepcopy(base), batches)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        got = recalibrate(copy.deepcopy(base), batches, all_reduce=True)
    finally:
        dist.destroy_process_group()
    for (k, v), v2 in zip(got.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=1e-12, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("device", DEVICES)
def test_batches_are_moved_to_the_model_device(device):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    model = model.eval().to(device)
    batches = drifting(SIZES, (3, 6, 6))  # on the CPU
    reference = copy.deepcopy(model)
    seen = run_session(reference, [b.to(device) for b in batches])
    expected = {name: float64_moments(xs, unbiased=True)[:2] for name, xs in seen.items()}
    model = recalibrate(model, batches)
    for name, (mean, var) in expected.items():
        assert model.get_submodule(name).running_mean.device.type == device
        assert_stats(model.get_submodule(name), mean, var)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_model_with_device_argument_and_half(dtype):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval().cuda().to(dtype)
    batches = [b.to(dtype) for b in drifting(SIZES, (3, 6, 6))]
    with torch.no_grad():
        mean, var, _ = float64_moments([model[0](b.cuda()) for b in batches], unbiased=True)
    recalibrate(model, batches, device="cuda")
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert_stats(model[1], mean, var, tol=tol)
    assert model[1].running_var.dtype == dtype
