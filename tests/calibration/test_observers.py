"""Tests for fxnorm.observers and the observer placement of fxnorm.calib_graph: the CPU fast path
(per-plane sums, the cancellation fallback, normalization written over a fresh conv output) against
training-mode batch norm and float64 statistics, and the cases where the input must not be overwritten."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from helpers import float64_moments
from fxnorm import finish_recalibration, prepare_recalibration
from fxnorm.calibration.observers import NormObserver, NormTarget, Session


pytestmark = pytest.mark.usefixtures("one_thread")


def observers_of(prepared: nn.Module) -> dict[str, NormObserver]:
    return {obs.target.name: obs for obs in prepared.modules() if isinstance(obs, NormObserver)}



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
    obs = NormObserver(target, Session(), module=bn)
    with torch.inference_mode():
        out = obs(x)
        expected = bn.train()(x.clone())
    bn.eval()
    scale = max(1.0, expected.abs().max().item())
    assert (out - expected).abs().max().item() <= 2e-3 * scale if offset >= 1e4 else 1e-5 * scale
    target.flush()
    mean, var = float64_moments([x])[:2]
    assert torch.allclose(target.moments.mean, mean, rtol=1e-6, atol=1e-6 * var.sqrt().max().item())
    assert ((target.moments.variance() - var).abs() / var).max().item() < 1e-6


def test_fresh_conv_outputs_are_overwritten_on_resnet18() -> None:
    """Every batch norm of resnet18 reads a conv output nothing else reads: all observers may write
    over their input, and the recalibrated statistics equal those of the out-of-place path."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    batches = [torch.randn(2, 3, 64, 64) + 0.1 * i for i in range(3)]
    prepared = prepare_recalibration(model)
    flags = {name: obs.overwrite_input for name, obs in observers_of(prepared).items()}
    assert len(flags) == 20 and all(flags.values())
    with torch.inference_mode():
        outs = [prepared(b) for b in batches]
    finish_recalibration(prepared)
    fast = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    plain = torchvision.models.resnet18(weights=None).eval()
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None).eval()
    prepared = prepare_recalibration(plain)
    for obs in observers_of(prepared).values():
        obs.overwrite_input = False
    with torch.inference_mode():
        slow_outs = [prepared(b) for b in batches]
    finish_recalibration(prepared)
    for a, b in zip(outs, slow_outs):
        assert torch.equal(a, b)
    for key, value in fast.items():
        assert torch.equal(value, plain.state_dict()[key]), key


def test_conv_output_read_elsewhere_is_not_overwritten() -> None:
    """conv -> bn with the conv output also added to the result: the observer must leave it alone."""
    torch.manual_seed(1)
    model = ConvBN(residual=True).eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_recalibration(model)
    assert not observers_of(prepared)["bn"].overwrite_input
    with torch.inference_mode():
        out = prepared(x)
        y = model.conv(x)
        expected = model.bn.train()(y) + y
    model.bn.eval()
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("hook", ["module", "global"])
def test_forward_hooks_keep_the_conv_output(hook: str) -> None:
    """A forward hook may keep the conv output (feature extraction): it must still hold the conv
    output after the observer ran, not the normalized tensor."""
    torch.manual_seed(2)
    model = ConvBN().eval()
    kept: list[torch.Tensor] = []
    if hook == "module":
        handle = model.conv.register_forward_hook(lambda m, args, out: kept.append(out) if m is model.conv else None)
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: kept.append(out) if m is model.conv else None)
    try:
        prepared = prepare_recalibration(model)
        assert observers_of(prepared)["bn"].overwrite_input  # placed, but refused at run time
        x = torch.randn(4, 3, 8, 8)
        with torch.inference_mode():
            prepared(x)
    finally:
        handle.remove()
    with torch.no_grad():
        assert len(kept) == 1 and torch.equal(kept[0], model.conv(x))


def test_overwrite_is_refused_under_autograd() -> None:
    """With gradients enabled the conv output requires grad: it is normalized out of place (an
    ``out=`` write would raise), the output is training-mode batch norm's and backward runs."""
    torch.manual_seed(3)
    model = ConvBN().eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_recalibration(model)
    assert observers_of(prepared)["bn"].overwrite_input
    out = prepared(x)
    assert out.requires_grad
    out.square().sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        reference = model.bn.train()(model.conv(x))
    model.bn.eval()
    assert torch.allclose(out, reference, atol=1e-5)


def test_functional_conv_producer_is_overwritten() -> None:
    """A functional conv (call_function) feeding a batch norm module counts as a fresh output."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.nn.functional.conv2d(x, self.weight))

    torch.manual_seed(4)
    model = Functional().eval()
    prepared = prepare_recalibration(model)
    assert isinstance(prepared, fx.GraphModule)
    assert observers_of(prepared)["bn"].overwrite_input
    x = torch.randn(3, 3, 9, 9) + 2.0
    with torch.inference_mode():
        out = prepared(x)
    finish_recalibration(prepared)
    y = torch.nn.functional.conv2d(x, model.weight.detach())
    mean, var = float64_moments([y])[:2]
    n = y.numel() // y.shape[1]
    assert torch.allclose(model.bn.running_mean.double(), mean, atol=1e-5)
    assert ((model.bn.running_var.double() - var * n / (n - 1)).abs() / var).max() < 1e-5
    expected = (y - mean.float().view(1, -1, 1, 1)) / (var.float().view(1, -1, 1, 1) + 1e-5).sqrt()
    expected = expected * model.bn.weight.detach().view(1, -1, 1, 1) + model.bn.bias.detach().view(1, -1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-4)


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
def test_shifted_producers_keep_statistics_exact(offsets: tuple[float, ...]) -> None:
    """Batches 2+ are shifted by the last batch mean at the producer; the recorded statistics are the
    float64 statistics of the producers' real outputs (a sudden jump of 1e4 falls back to recentring)
    and the outputs are training-mode batch norm's."""
    torch.manual_seed(5)
    model = Producers().eval()
    with torch.no_grad():
        for conv in (model.plain, model.biased, model.left, model.right):
            conv.weight.abs_()  # positive weights on positive inputs: channel means far from zero
    batches = [torch.rand(6, 3, 7, 7) * 2 + 3 + off for off in offsets]
    prepared = prepare_recalibration(model)
    shifted = [m for m in prepared.modules() if type(m).__name__ == "ShiftedProducer"]
    assert len(shifted) == 5
    expected: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for b in batches:
            outs = prepared(b)
            for name, values in producer_outputs(model, b).items():
                expected.setdefault(name, []).extend(values)
            reference, resolution = [], 0.0
            for name, values in producer_outputs(model, b).items():
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
    assert all(obs.shift is not None for obs in observers_of(prepared).values())
    finish_recalibration(prepared)
    for name, values in expected.items():
        mean, var = float64_moments([torch.cat(values)])[:2]
        n = sum(v.numel() // v.shape[1] for v in values)
        bn = model.get_submodule(name)
        assert ((bn.running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6, name
        assert ((bn.running_var.double() - var * n / (n - 1)).abs() / var).max() < 1e-6, name


def test_producer_with_a_hook_is_called_unshifted() -> None:
    """A hook on the producer sees its real output on every batch (no shift, no overwrite)."""
    torch.manual_seed(6)
    model = ConvBN().eval()
    seen: list[torch.Tensor] = []
    model.conv.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    batches = [torch.randn(4, 3, 8, 8) + i for i in range(3)]
    prepared = prepare_recalibration(model)
    with torch.inference_mode():
        for b in batches:
            prepared(b)
    finish_recalibration(prepared)
    with torch.no_grad():
        real = [model.conv._conv_forward(b, model.conv.weight, model.conv.bias) for b in batches]
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, real))
    mean, var = float64_moments([torch.cat(real)])[:2]
    assert ((model.bn.running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6


def test_linear_on_sequences_is_not_shifted() -> None:
    """A Linear on (N, L, F) inputs feeding a BatchNorm1d(L) has its features last, not at dim 1:
    the producer must run unshifted (a shift over the wrong dimension would corrupt the statistics,
    silently when L == F)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)).eval()
    batches = [torch.randn(4, 5, 5) * 0.1 + 3 + i for i in range(3)]
    prepared = prepare_recalibration(model)
    assert observers_of(prepared)["1"].shiftable
    with torch.inference_mode():
        for b in batches:
            prepared(b)
    assert not observers_of(prepared)["1"].shifted
    finish_recalibration(prepared)
    with torch.no_grad():
        real = torch.cat([model[0](b) for b in batches])
    mean, var = float64_moments([real])[:2]
    n = real.numel() // real.shape[1]
    assert ((model[1].running_mean.double() - mean).abs() / var.sqrt()).max() < 1e-6
    assert ((model[1].running_var.double() - var * n / (n - 1)).abs() / var).max() < 1e-6
