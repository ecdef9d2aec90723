"""``recalibrate(..., order="sequential")`` and its levels (:mod:`fxnorm.calibration.sequential`):
every norm ends with the statistics of exactly what it receives at inference (checked in float64
against the eval model run up to each norm), at any batch size; one pass per depth level; the
model is unchanged when any pass fails. Also the small-batch warning of the joint order."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from fxnorm import CalibrationError, CalibrationReport, CalibrationWarning, DataError, recalibrate, report_of
from fxnorm.calibration.observers import NormTarget
from fxnorm.calibration.sequential import DependencyTracker, levels
from helpers import assert_model_unchanged, capture_norm_inputs, float64_moments, model_snapshot, randomize_norms


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus a downsampling conv-bn branch, added: bn1 and the branch's bn share a level."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.down(x))


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(4, 6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    return randomize_norms(model, 0).to(dtype).eval()


LEVELS = [["1"], ["3.bn1", "3.down.1"], ["3.bn2"], ["7"]]


def data(batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 8, 8, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    return list(torch.split(x, batch))


def test_levels_of_a_residual_block():
    model = net()
    targets = [NormTarget.for_module(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    with DependencyTracker(targets) as tracker, torch.no_grad():
        model(data(4)[0])
    assert tracker.depends_on == {"1": set(), "3.bn1": {"1"}, "3.down.1": {"1"}, "3.bn2": {"3.bn1"},
                                  "7": {"3.bn2", "3.down.1"}}
    assert [[t.name for t in level] for level in levels(targets, tracker.depends_on)] == LEVELS
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_levels_of_a_cycle_go_last():
    ts = [NormTarget.for_module(n, nn.BatchNorm1d(2)) for n in "abc"]
    got = levels(ts, {"a": set(), "b": {"a", "c"}, "c": {"b"}})
    assert [[t.name for t in level] for level in got] == [["a"], ["b", "c"]]


@pytest.mark.parametrize("batch", [1, 4, 12])
def test_sequential_statistics_are_what_every_norm_sees_at_inference(batch):
    """Reference by hand: the recalibrated model, in eval mode, run on all the data; every norm's
    input captured; its float64 mean and unbiased variance must be the norm's new statistics."""
    model = recalibrate(net(), data(batch), order="sequential")
    report = report_of(model, CalibrationReport)
    assert report.passes == len(LEVELS) and report.levels == LEVELS
    assert report.num_batches == len(data(batch)) and report.num_samples == 12
    with capture_norm_inputs(model) as seen, torch.no_grad():
        for x in data(batch):
            model(x)
    for name, inputs in seen.items():
        mean, var, _ = float64_moments(inputs, unbiased=True)
        norm = model.get_submodule(name)
        torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-12, msg=name)
        assert int(norm.num_batches_tracked) == len(data(batch)), name


def test_sequential_does_not_depend_on_the_batch_size_and_joint_does():
    one, four = (recalibrate(net(), data(b), order="sequential").state_dict() for b in (1, 4))
    for key, value in one.items():
        if "running" in key:
            torch.testing.assert_close(four[key], value, rtol=1e-12, atol=1e-12, msg=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        joint = recalibrate(net(), data(4)).state_dict()
    assert not torch.allclose(joint["3.bn2.running_var"], four["3.bn2.running_var"], rtol=1e-3)
    torch.testing.assert_close(joint["1.running_var"], four["1.running_var"], rtol=1e-12, atol=1e-12)  # level 0


def test_sequential_in_float32_is_float32_noise_away():
    reference = recalibrate(net(), data(4), order="sequential").state_dict()
    got = recalibrate(net(torch.float32), [x.float() for x in data(4)], order="sequential").state_dict()
    for key, value in reference.items():
        if "running" in key:
            torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-5, msg=key)


def test_small_batches_warn_in_the_joint_order_only():
    with pytest.warns(CalibrationWarning, match='fewer than|at most 4 sample.*order="sequential"'):
        recalibrate(net(), data(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        recalibrate(net(), data(4), order="sequential")
        recalibrate(net(), data(12))


def test_a_failing_later_pass_leaves_the_model_unchanged():
    class Flaky:
        """Iterable twice (the first two passes), then reading its second batch fails."""

        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for i, x in enumerate(data(4)):
                if self.passes > 2 and i == 1:
                    raise OSError("disk gone")
                yield x

    model = net()
    snap = model_snapshot(model)
    with pytest.raises(DataError, match="disk gone"):
        recalibrate(model, Flaky(), order="sequential")
    assert_model_unchanged(model, snap)


def test_sequential_needs_data_it_can_iterate_again():
    model = net()
    snap = model_snapshot(model)
    with pytest.raises(DataError, match="iterated again"):
        recalibrate(model, iter(data(4)), order="sequential")
    with pytest.raises(CalibrationError, match="order must be 'joint' or 'sequential'"):
        recalibrate(model, data(4), order="layerwise")  # type: ignore[arg-type]
    assert_model_unchanged(model, snap)


def test_select_is_kept_in_the_sequential_order():
    model = net()
    before = model.state_dict()
    model = recalibrate(model, data(4), order="sequential", select=["3.*"])
    report = report_of(model, CalibrationReport)
    assert report.levels == [["3.bn1", "3.down.1"], ["3.bn2"]]
    for key in ("1.running_mean", "7.running_var"):
        assert torch.equal(model.state_dict()[key], before[key])


def test_later_passes_end_each_forward_once_their_level_ran():
    """The linear layer feeds only the last level's norm: passes 2 and 3 never run it (their forwards
    end after their level's norms), the first and the last run it on every batch."""
    model = net()
    calls = []
    model[6].register_forward_hook(lambda *args: calls.append(1))
    recalibrate(model, data(4), order="sequential")
    assert len(calls) == 2 * len(data(4))
    with capture_norm_inputs(model, ["7"]) as seen, torch.no_grad():
        for x in data(4):
            model(x)
    mean, var, _ = float64_moments(seen["7"], unbiased=True)
    torch.testing.assert_close(model[7].running_var, var, rtol=1e-12, atol=1e-12)


def test_a_norm_called_a_varying_number_of_times_disables_the_early_end():
    class Varying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn1(x)
            return sum(self.bn2(y * (i + 1)) for i in range(x.shape[0] % 3))  # 1 or 2 calls, by batch size

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=gen, dtype=torch.float64) + 1 for n in (4, 5, 4)]
    model = recalibrate(Varying().double().eval(), batches, order="sequential")
    with capture_norm_inputs(model, ["bn2"]) as seen, torch.no_grad():
        for x in batches:
            model(x)
    mean, var, count = float64_moments(seen["bn2"], unbiased=True)
    assert count == 4 + 2 * 5 + 4 and int(model.bn2.num_batches_tracked) == 4
    torch.testing.assert_close(model.bn2.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bn2.running_var, var, rtol=1e-12, atol=1e-12)
