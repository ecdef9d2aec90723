"""Tests for fxnorm.calibration.observers and fast_path: the answer to an intercepted batch-norm call
(per-plane sums on the CPU, the cancellation fallback, the training-mode kernel elsewhere) against
training-mode batch norm and float64 statistics, and what the rest of the model sees."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from helpers import capture_norm_inputs, float64_moments
from fxnorm import finish_recalibration, prepare_recalibration, recalibrate
from fxnorm.calibration.observers import NormTarget, Tally, observe_batch_norm


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    """conv -> bn, optionally with the conv output also used by a residual add."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = self.bn(y)
        return out + y if self.residual else out


@pytest.mark.parametrize("offset", [0.0, 1.5, 40.0, 1e4])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 7), (3, 5, 6, 6), (2, 5, 3, 4, 4)])
def test_observer_matches_training_mode_and_float64(shape: tuple[int, ...], offset: float) -> None:
    """Every channel offset regime (no cancellation, a few channels, all channels far from zero):
    the output is training-mode batch norm's and the recorded statistics are float64's."""
    gen = torch.Generator().manual_seed(len(shape))
    channel_offset = offset * torch.randn(shape[1], generator=gen)
    channel_offset[::2] = 0  # half the channels centred, half shifted
    x = torch.randn(shape, generator=gen) * 0.5 + channel_offset.view(1, -1, *([1] * (len(shape) - 2)))
    bn = nn.BatchNorm1d(5) if len(shape) < 4 else (nn.BatchNorm2d(5) if len(shape) == 4 else nn.BatchNorm3d(5))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    target = NormTarget.for_module("bn", bn)
    with torch.inference_mode():
        out = observe_batch_norm(target, Tally(), x, bn.weight, bn.bias, bn.eps)
        expected = bn.train()(x.clone())
    bn.eval()
    scale = max(1.0, expected.abs().max().item())
    assert (out - expected).abs().max().item() <= 2e-3 * scale if offset >= 1e4 else 1e-5 * scale
    target.flush()
    mean, var = float64_moments([x])[:2]
    assert torch.allclose(target.moments.mean, mean, rtol=1e-6, atol=1e-6 * var.sqrt().max().item())
    assert ((target.moments.variance() - var).abs() / var).max().item() < 1e-6


class Producers(nn.Module):
    """A conv without bias, a conv with bias and a linear, each read only by its batch norm; one
    batch norm shared by two call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 4, 3, bias=False)
        self.biased = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(12, 5)
        self.bn_plain, self.bn_biased, self.bn_fc = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm1d(5)
        self.left, self.right, self.shared = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = x.mean((2, 3)).repeat(1, 4)
        return (self.bn_plain(self.plain(x)), self.bn_biased(self.biased(x)), self.bn_fc(self.fc(pooled)),
                self.shared(self.left(x)) + self.shared(self.right(x)))


def producer_outputs(model: Producers, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        return {"bn_plain": [model.plain(x)], "bn_biased": [model.biased(x)],
                "bn_fc": [model.fc(x.mean((2, 3)).repeat(1, 4))], "shared": [model.left(x), model.right(x)]}


@pytest.mark.parametrize("offsets", [(0.0, 0.5, 1.0, 1.5), (0.0, 0.0, 1e4, 1e4)], ids=["drift", "jump"])
def test_channel_means_far_from_zero_keep_statistics_exact(offsets: tuple[float, ...]) -> None:
    """Positive weights on positive inputs put every channel mean many standard deviations from zero
    (the float32 sums of squares would cancel: the squares are taken about the mean), a sudden jump of
    1e4 included; the recorded statistics are the float64 statistics of the producers' real outputs and
    the outputs are training-mode batch norm's. A norm called at two sites pools both."""
    torch.manual_seed(5)
    model = Producers().eval()
    with torch.no_grad():
        for conv in (model.plain, model.biased, model.left, model.right):
            conv.weight.abs_()
    batches = [torch.rand(6, 3, 7, 7) * 2 + 3 + off for off in offsets]
    expected: dict[str, list[torch.Tensor]] = {}
    with prepare_recalibration(model) as session, torch.inference_mode():
        for b in batches:
            outs = model(b)
            reference, resolution = [], 0.0
            for name, values in producer_outputs(model, b).items():
                expected.setdefault(name, []).extend(values)
                # float32 resolves the inputs only to ~1e-7 of their magnitude: relative to their spread
                spread = [float(v.abs().max() / float64_moments([v])[:2][1].sqrt().min()) for v in values]
                resolution = max(resolution, *spread)
                bn = model.get_submodule(name)
                normalized = [torch.nn.functional.batch_norm(v, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                              for v in values]
                reference.append(normalized[0] if len(normalized) == 1 else normalized[0] + normalized[1])
            for got, want in zip(outs, reference):
                tol = 1e-4 + 1e-6 * resolution
                assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())
        finish_recalibration(session)
    for name, values in expected.items():
        mean, var = float64_moments([torch.cat(values)])[:2]
        n = sum(v.numel() // v.shape[1] for v in values)
        bn = model.get_submodule(name)
        assert ((bn.running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6, name
        assert ((bn.running_var.double() - var * n / (n - 1)).abs() / var).max() < 1e-6, name
    assert model.shared.num_batches_tracked.item() == 2 * len(batches)


def test_conv_output_read_elsewhere_keeps_its_values() -> None:
    """conv -> bn with the conv output also added to the result: the normalization must not be
    written over the conv output (the output is training-mode bn(y) + y)."""
    torch.manual_seed(1)
    model = ConvBN(residual=True).eval()
    x = torch.randn(4, 3, 8, 8)
    with prepare_recalibration(model), torch.inference_mode():
        out = model(x)
    with torch.no_grad():
        y = model.conv(x)
        expected = model.bn.train()(y) + y
    model.bn.eval()
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("hook", ["module", "global"])
def test_forward_hooks_keep_the_conv_output(hook: str) -> None:
    """A forward hook may keep the conv output (feature extraction): it must still hold the conv
    output after the norm ran, not the normalized tensor."""
    torch.manual_seed(2)
    model = ConvBN().eval()
    kept: list[torch.Tensor] = []
    if hook == "module":
        handle = model.conv.register_forward_hook(lambda m, args, out: kept.append(out) if m is model.conv else None)
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: kept.append(out) if m is model.conv else None)
    x = torch.randn(4, 3, 8, 8)
    try:
        recalibrate(model, [x])
    finally:
        handle.remove()
    with torch.no_grad():
        assert len(kept) == 1 and torch.equal(kept[0], model.conv(x))


def test_autograd_flows_through_the_intercepted_norm() -> None:
    """Outside inference mode the norm's output requires grad, equals training mode's, and backward
    reaches the conv; the statistics are still recorded without autograd state."""
    torch.manual_seed(3)
    model = ConvBN().eval()
    x = torch.randn(4, 3, 8, 8)
    with prepare_recalibration(model) as session:
        out = model(x)
        assert out.requires_grad
        out.square().sum().backward()
        finish_recalibration(session)
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        y = model.conv(x)
        reference = nn.functional.batch_norm(y, None, None, model.bn.weight, model.bn.bias, True, 0.0, model.bn.eps)
    assert torch.allclose(out, reference, atol=1e-5)
    mean, var = float64_moments([y])[:2]
    assert ((model.bn.running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6


def test_linear_on_sequences_normalizes_dim_one() -> None:
    """A Linear on (N, L, F) inputs feeding a BatchNorm1d(L): the channels are dim 1 (L), whatever
    the last dimension holds (here L == F, where a wrong axis would go unnoticed by the shapes)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)).eval()
    batches = [torch.randn(4, 5, 5) * 0.1 + 3 + i for i in range(3)]
    with capture_norm_inputs(model) as seen:
        recalibrate(model, batches)
    with torch.no_grad():
        real = torch.cat([model[0](b) for b in batches])
    assert torch.equal(torch.cat(seen["1"]), real)
    mean, var = float64_moments([real])[:2]
    n = real.numel() // real.shape[1]
    assert ((model[1].running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6
    assert ((model[1].running_var.double() - var * n / (n - 1)).abs() / var).max() < 1e-6
