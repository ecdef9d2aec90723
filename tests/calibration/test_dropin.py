"""Recalibration is a drop-in: it runs the user's own model (issue 13). The patterns that broke when
modules were replaced by traced copies — a parent reading a child's property, iterating a child
container, an optional ``None`` argument, class-specific forward hooks, a BN + activation subclass, a
subclass that transposes or splits the batch, functional ``batch_norm`` calls in any module — each
recalibrate exactly (float64 statistics of what every norm received) and leave everything but the
norms' statistics bitwise unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (STAT_BUFFERS, assert_model_unchanged, capture_norm_inputs, float64_moments, model_snapshot,
                     randomize_norms)

from fxnorm import CalibrationReport, finish_recalibration, prepare_recalibration, recalibrate, report_of
from fxnorm.calibration.selection import stat_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(shape: tuple[int, ...], sizes: tuple[int, ...] = (6, 6, 3), seed: int = 0) -> list[torch.Tensor]:
    """Unshuffled batches drifting apart, the last one short."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=gen) * (1 + 0.3 * i) + 0.5 * i for i, n in enumerate(sizes)]


def assert_stats(norm: nn.Module, inputs: list[torch.Tensor], channel_dim: int = 1, tol: float = 1e-6) -> None:
    """The norm's running statistics are the float64 pooled statistics of ``inputs``."""
    mean, var, _ = float64_moments(inputs, channel_dim=channel_dim, unbiased=True)
    mean_err = ((norm.running_mean.double() - mean).abs() / var.sqrt()).max().item()
    var_err = ((norm.running_var.double() - var).abs() / var).max().item()
    assert mean_err <= tol and var_err <= tol, (mean_err, var_err)
    assert norm.num_batches_tracked.item() == len(inputs)


def recalibrated(model: nn.Module, data: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """``recalibrate(model, data)`` with the inputs of every norm module captured by pre-hooks, and
    everything but the norms' statistics checked unchanged."""
    snap = model_snapshot(model)
    with capture_norm_inputs(model) as seen:
        assert recalibrate(model, data) is model
    assert_model_unchanged(model, snap, except_buffers={name: STAT_BUFFERS for name, _ in stat_norms(model)})
    return seen


def reference_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """A copy of ``model`` with its norms in training mode and every other module in eval mode (what a
    calibration forward emulates), run on ``x``; returns its output and the copy."""
    ref = copy.deepcopy(model).eval()
    for _, norm in stat_norms(ref):
        norm.train()
    with torch.no_grad():
        return ref(x), ref


# ------------------------------------------------------------------ a parent reads a child's property
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)

    @property
    def output_stride(self) -> int:
        return self.conv.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Conv2d(6, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head_bn(self.head(self.encoder(x)))
        return F.interpolate(y, scale_factor=self.encoder.output_stride)


def test_parent_reads_a_property_of_a_child():
    model = randomize_norms(Segmenter()).train()
    data = batches((3, 8, 8))
    seen = recalibrated(model, data)
    with torch.no_grad():
        convs = [model.encoder.conv(x) for x in data]
    assert all(torch.equal(a, b) for a, b in zip(seen["encoder.bn"], convs))
    assert_stats(model.encoder.bn, convs)
    assert_stats(model.head_bn, seen["head_bn"])
    assert model.encoder.output_stride == 2 and all(m.training for m in model.modules())


# ------------------------------------------------------------------ a parent iterates a child container
class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
                                    for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x) + (x if i < len(self.blocks) - 1 else 0)
        return x


def test_parent_iterates_a_child_container():
    model = randomize_norms(Stack()).eval()
    data = batches((4, 10))
    seen = recalibrated(model, data)
    x_ref = data
    for i, block in enumerate(model.blocks):  # the inputs of each block's norm, computed block by block
        with torch.no_grad():
            convs = [block[0](x) for x in x_ref]
            x_ref = [F.batch_norm(c, None, None, block[1].weight, block[1].bias, True, 0.0, block[1].eps).relu() + x
                     for c, x in zip(convs, x_ref)]
        assert_stats(block[1], convs)
        assert max((a - b).abs().max().item() for a, b in zip(seen[f"blocks.{i}.1"], convs)) <= 1e-5


# ------------------------------------------------------------------ an optional None argument
class Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if skip is None else y + skip


class UNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Up(), Up()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x, skip=None)
        return self.second(y, skip=x)


def test_optional_none_argument():
    model = randomize_norms(UNetish()).eval()
    data = batches((4, 6, 6))
    seen = recalibrated(model, data)
    with torch.no_grad():
        first = [model.first.conv(x) for x in data]
        second = [model.second.conv(F.batch_norm(c, None, None, model.first.bn.weight, model.first.bn.bias, True,
                                                 0.0, model.first.bn.eps)) for c in first]
    assert_stats(model.first.bn, first)
    assert_stats(model.second.bn, seen["second.bn"])
    assert max((a - b).abs().max().item() for a, b in zip(seen["second.bn"], second)) <= 1e-5


# ------------------------------------------------------------------ class-specific forward hooks
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)).relu()) + x


def test_class_specific_forward_hooks_fire_and_see_what_the_norms_compute():
    """A library hooks every ``Block`` (hidden states) and every ``BatchNorm2d``: during recalibration
    the hooks fire on every batch and see the values of a forward in which the norms normalize with
    their batch statistics and every other module is in eval mode (no dropout), every module's
    ``training`` flag reading False; the norm's own hooks see its real input and output. They stay
    registered and fire the same after it."""
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block())).train()
    data = batches((3, 6, 6))
    states: list[tuple[str, bool, torch.Tensor]] = []
    norm_io: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    for name, m in model.named_modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda mod, args, out, name=name: states.append((name, mod.training, out.clone())))
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, args, out: norm_io.append((mod, args[0].clone(), out.clone())))
    expected = []
    for x in data:  # a reference forward per batch (a copy: the same hooks capture its block outputs)
        reference_forward(model, x)
        expected.append(states[-2:])
        states.clear()
        norm_io.clear()
    recalibrated(model, data)
    assert [(name, training) for name, training, _ in states] == [("1", False), ("2", False)] * len(data)
    for i, pair in enumerate(expected):
        for (_, _, got), (_, _, want) in zip(states[2 * i: 2 * i + 2], pair):
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert [bn for bn, _, _ in norm_io] == [model[1].bn, model[2].bn] * len(data)
    for bn, x, out in norm_io:  # a norm's forward hook sees its input and its batch-normalized output
        with torch.no_grad():
            ref = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    states.clear()
    with torch.no_grad():
        model.eval()(data[0])
    assert [name for name, _, _ in states] == ["1", "2"]


# ------------------------------------------------------------------ norm subclasses with their own forward
class BNAct(nn.BatchNorm2d):
    """BatchNorm + activation in one module (timm's BatchNormAct2d style)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ChannelsLast1d(nn.BatchNorm1d):
    """A BatchNorm1d over (N, L, C) sequences: transposes to (N, C, L) around the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class GhostBN(nn.BatchNorm2d):
    """Normalizes each half of the batch with its own statistics (ghost batch norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(GhostBN, self).forward(part) for part in x.chunk(2)])


class Sequence(nn.Module):
    """A transposing subclass and a plain BatchNorm1d applied to (N, L, C) data through a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = ChannelsLast1d(6)
        self.plain = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.fc(x))
        return self.plain(y.transpose(1, 2)).transpose(1, 2)


def test_bn_activation_subclass():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4), nn.Conv2d(4, 4, 1), BNAct(4))).eval()
    data = batches((3, 7, 7))
    seen = recalibrated(model, data)
    with torch.no_grad():
        convs = [model[0](x) for x in data]
        second = [model[2](F.silu(F.batch_norm(c, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-5)))
                  for c in convs]
    assert_stats(model[1], convs)
    assert_stats(model[3], seen["3"])
    assert max((a - b).abs().max().item() for a, b in zip(seen["3"], second)) <= 1e-5
    assert type(model[1]) is BNAct and isinstance(model[1].act, nn.SiLU)


def test_transposing_subclass_and_batchnorm1d_on_sequences():
    model = randomize_norms(Sequence()).eval()
    data = batches((7, 5))  # (N, L, C) sequences
    seen = recalibrated(model, data)
    with torch.no_grad():
        fc = [model.fc(x) for x in data]  # (N, L, 6): channels last
        normed = [F.batch_norm(y.transpose(1, 2), None, None, model.norm.weight, model.norm.bias, True, 0.0,
                               model.norm.eps).transpose(1, 2) for y in fc]
    assert all(torch.equal(a, b) for a, b in zip(seen["norm"], fc))  # the module receives (N, L, C)
    assert_stats(model.norm, fc, channel_dim=2)
    assert_stats(model.plain, [y.transpose(1, 2) for y in normed], tol=1e-5)


def test_split_batch_subclass_pools_every_part():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), GhostBN(4))).eval()
    data = batches((3, 6, 6), sizes=(6, 4))
    with torch.no_grad():
        convs = [model[0](x) for x in data]
    recalibrated_model = recalibrate(model, data)
    parts = [part for c in convs for part in c.chunk(2)]
    mean, var, count = float64_moments(parts, unbiased=True)
    assert ((recalibrated_model[1].running_var.double() - var).abs() / var).max().item() <= 1e-6
    assert model[1].num_batches_tracked.item() == len(parts) == 4
    assert report_of(model, CalibrationReport).layers[0].count == count


# ------------------------------------------------------------------ functional batch_norm in a custom module
class Functional(nn.Module):
    """Normalizes with the buffers of norms it owns but never calls: ``F.batch_norm`` (statistics
    before weight) and ``torch.batch_norm`` (weight and bias *before* the statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_f = nn.BatchNorm2d(4)
        self.bn_t = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bn_f, self.bn_t
        y = F.batch_norm(self.conv(x), a.running_mean, a.running_var, a.weight, a.bias, a.training, a.momentum, a.eps)
        return torch.batch_norm(y.relu(), b.weight, b.bias, b.running_mean, b.running_var, b.training, 0.1, b.eps,
                                False)


def test_functional_batch_norm_calls_with_a_norms_buffers():
    model = randomize_norms(Functional()).eval()
    data = batches((3, 6, 6))
    recalibrated(model, data)
    with torch.no_grad():
        convs = [model.conv(x) for x in data]
        second = [F.batch_norm(c, None, None, model.bn_f.weight, model.bn_f.bias, True, 0.0, 1e-5).relu()
                  for c in convs]
    assert_stats(model.bn_f, convs)
    assert_stats(model.bn_t, second, tol=1e-5)
    report = report_of(model, CalibrationReport)
    assert [s.name for s in report.layers] == ["bn_f", "bn_t"] and not report.unsupported and not report.unreached


def test_select_a_functional_norm_only():
    model = randomize_norms(Functional()).eval()
    before = copy.deepcopy(model.bn_f.state_dict())
    data = batches((3, 6, 6))
    with torch.no_grad():  # bn_f is not chosen: it normalizes with its own running statistics
        second = [F.batch_norm(model.conv(x), model.bn_f.running_mean, model.bn_f.running_var, model.bn_f.weight,
                               model.bn_f.bias, False, 0.0, 1e-5).relu() for x in data]
    recalibrate(model, data, select="bn_t")
    assert all(torch.equal(v, before[k]) for k, v in model.bn_f.state_dict().items())
    assert_stats(model.bn_t, second, tol=1e-5)


def test_two_models_share_nothing_but_run_in_one_forward():
    """A model calling another model that has its own session: each session gathers its own norms."""
    inner = randomize_norms(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    outer = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    data = batches((3, 5, 5))
    with prepare_recalibration(outer) as first, prepare_recalibration(inner) as second, torch.inference_mode():
        for x in data:
            inner(outer(x))
        finish_recalibration(first)
        finish_recalibration(second)
    with torch.no_grad():
        convs = [outer[0](x) for x in data]
        inner_in = [inner[0](F.batch_norm(c, None, None, outer[1].weight, outer[1].bias, True, 0.0, 1e-5))
                    for c in convs]
    assert_stats(outer[1], convs)
    assert_stats(inner[1], inner_in, tol=1e-5)
