"""torch.export accepts what fxnorm.fold returns, and the exported program keeps a batch-norm op only
where no fold was possible (the count equals what the fold report lists as skipped, and what
find_norms said could not fold). Outputs of the exported program match the unfolded model.

CI runs one torchvision classification model per architecture family (:data:`SUBSET`); the full
sweep over every classification model is marked ``slow`` (``pytest -m slow`` runs it)
(figures in docs/quantization.md).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from devices import DEVICES

import zoo
from fxnorm import (
    FoldError,
    FoldReport,
    FxNormError,
    TraceError,
    batch_norm_nodes,
    count_batch_norm_ops,
    export_folded,
    export_for_quantization,
    find_norms,
    fold,
    norms_with_affine,
    report_of,
)
from fxnorm.export import skipped_batch_norms
from fxnorm.graph.kinds import BN_KINDS

TOL = 1e-4

#: One classification model per architecture family (export takes seconds per model on two cores).
#: densenet121 is the one whose pre-activation norms (after torch.cat, before a ReLU) cannot fold.
SUBSET = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "regnet_x_400mf",
          "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_0", "googlenet", "vgg11_bn", "vit_b_16"]
REST = [n for n in zoo.FAMILIES["classification"] if n not in SUBSET]

#: Batch norms with no exact fold, by hand: a densenet's dense layers each have a norm1 after a
#: torch.cat and before a ReLU, and so do its 3 transition norms and norm5. Every other BN folds.
EXPECTED_LEFT = {"densenet121": (6 + 12 + 24 + 16) + 3 + 1, "densenet161": (6 + 12 + 36 + 24) + 3 + 1,
                 "densenet169": (6 + 12 + 32 + 32) + 3 + 1, "densenet201": (6 + 12 + 48 + 32) + 3 + 1}


def _bn_sites_not_foldable(model: nn.Module) -> int:
    return sum(1 for s in find_norms(model) if s.kind in BN_KINDS and s.fold is None)


def _check_zoo_model(name: str, *, export_unfolded: bool) -> None:
    model = zoo.build(name)
    x = zoo.example_inputs(name, 2)
    if export_unfolded:  # the sweep: torch.export must accept the folded model wherever it accepts the model
        try:
            plain = torch.export.export(model, x)
        except Exception as err:  # pragma: no cover - depends on the torch version
            pytest.skip(f"torch.export rejects {name} unfolded: {type(err).__name__}: {err}")
        bn_sites = sum(1 for s in find_norms(model) if s.kind in BN_KINDS)
        assert count_batch_norm_ops(plain) == bn_sites  # the counter sees every batch norm op
    program = export_folded(model, x)
    report = report_of(program, FoldReport)
    left = count_batch_norm_ops(program)
    assert left == EXPECTED_LEFT.get(name, 0), batch_norm_nodes(program)
    assert left == len([s for s in report.skipped if s.kind in BN_KINDS]), batch_norm_nodes(program)
    assert left <= _bn_sites_not_foldable(model)  # fold also folds chains find_norms sees one step at a time
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < TOL


@pytest.mark.parametrize("name", SUBSET)
def test_export_folded_zoo_subset(name: str) -> None:
    _check_zoo_model(name, export_unfolded=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", REST)
def test_export_folded_full_classification_zoo(name: str) -> None:
    _check_zoo_model(name, export_unfolded=True)


def test_unfolded_and_decomposed_programs_count_every_batch_norm() -> None:
    """The counter against a hand count: resnet18 has 20 BatchNorm2d."""
    model = zoo.build("resnet18")
    x = zoo.example_inputs("resnet18")
    plain = torch.export.export(model, x)
    assert count_batch_norm_ops(plain) == 20
    decomposed = plain.run_decompositions()
    names = batch_norm_nodes(decomposed)
    assert len(names) == 20 and all("_native_batch_norm_legit_no_training" in n for n in names)
    assert count_batch_norm_ops(export_folded(model, x)) == 0


class FunctionalNorm(nn.Module):
    """A batch norm written with F.batch_norm in a module's own forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(channels) * 0.5)
        self.register_buffer("var", torch.rand(channels) + 0.5)
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.1, 1e-5)


class Mixed(nn.Module):
    """conv->bn (folds into the conv), bn->conv (folds into the consumer), a functional batch norm after a
    conv, linear->bn1d on 2-D input, one batch norm after a cat and before a relu (cannot fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.bn_pre, self.conv2 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fbn = FunctionalNorm(4)
        self.bn_cat = nn.BatchNorm2d(8)
        self.fc, self.bn_fc = nn.Linear(8, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(self.bn_pre(torch.relu(self.bn1(self.conv1(x)))))
        b = self.fbn(self.conv3(a))
        c = torch.relu(self.bn_cat(torch.cat([a, b], 1)))
        return self.bn_fc(self.fc(c.mean((2, 3))))


def _mixed(device: str = "cpu") -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = Mixed()
    return zoo.randomize_norms(model, seed=3).eval().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_every_kind_of_fold_leaves_no_batch_norm_op(device: str) -> None:
    model = _mixed(device)
    x = (torch.randn(3, 3, 8, 8, device=device),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_batch_norm_ops(torch.export.export(model, x)) == 5
    program = export_folded(model, x)
    report = report_of(program, FoldReport)
    assert batch_norm_nodes(program) == ["batch_norm"]  # bn_cat alone: its input is a cat, a relu follows
    assert [s.name for s in report.skipped] == ["bn_cat"]
    assert {f.name: f.mode for f in report.folded} == {
        "bn1": "into_producer", "bn_pre": "into_consumer", "fbn": "into_producer", "bn_fc": "into_producer"}
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed


def test_standalone_affine_exports_without_any_batch_norm() -> None:
    model = _mixed()
    x = (torch.randn(3, 3, 8, 8),)
    program = export_folded(model, x, standalone="affine")
    assert count_batch_norm_ops(program) == 0
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < 1e-5


def test_training_mode_batch_norm_is_counted_as_left() -> None:
    model = _mixed()
    model.bn1.train()
    x = (torch.randn(3, 3, 8, 8),)
    program = export_folded(model, x)
    report = report_of(program, FoldReport)
    assert sorted(s.name for s in report.skipped) == ["bn1", "bn_cat"]
    assert count_batch_norm_ops(program) == 2


def test_already_folded_model_is_exported_as_is() -> None:
    model = _mixed()
    x = (torch.randn(2, 3, 8, 8),)
    folded = fold(model, example_inputs=x)
    program = export_folded(folded, x)
    report = report_of(program, FoldReport)
    assert report is report_of(folded, FoldReport)
    assert count_batch_norm_ops(program) == 1 and [s.name for s in skipped_batch_norms(folded)] == ["bn_cat"]
    with pytest.raises(FoldError, match="bn_cat"):
        export_folded(model, x, strict=True)


def test_frozen_batch_norm_left_is_not_a_batch_norm_op() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = zoo.randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), FrozenBatchNorm2d(4)), seed=2).eval()
    x = (torch.randn(2, 3, 4, 4),)
    program = export_folded(model, x)
    report = report_of(program, FoldReport)
    assert [(s.name, s.kind) for s in report.skipped] == [("2", "FrozenBatchNorm2d")]
    assert count_batch_norm_ops(program) == 0  # it runs as a mul and an add
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < 1e-6


def test_dynamic_batch_size() -> None:
    model = _mixed()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = export_folded(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    y = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        assert zoo.rel_err(program.module()(y), model(y)) < 1e-5
    with pytest.raises(Exception, match="batch|7|64|range"):
        program.module()(torch.randn(65, 3, 8, 8))  # the batch dim really is a checked symbol


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm -> attention, RMSNorm -> MLP, and a GroupNorm -> 1x1 conv."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.RMSNorm(d), nn.Linear(d, 32), nn.Linear(32, d)
        self.gn, self.conv = nn.GroupNorm(2, d), nn.Conv2d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.conv(self.gn(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 2, -1)))


def test_norm_affine_fold_exports_norms_without_weight_or_bias() -> None:
    model = zoo.randomize_norms(Block(), seed=1).eval()
    x = (torch.randn(2, 6, 16),)
    plain = torch.export.export(model, x)
    assert norms_with_affine(plain) == {"layer_norm": ["weight", "bias"], "rms_norm": ["weight"],
                                        "group_norm": ["weight", "bias"]}
    program = export_folded(model, x, norm_affine=True)
    ops = sorted(str(n.target) for n in program.graph.nodes if "norm" in str(n.target))
    assert ops == ["aten.group_norm.default", "aten.layer_norm.default", "aten.rms_norm.default"]
    assert norms_with_affine(program) == {}
    assert norms_with_affine(program.run_decompositions()) == {}
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < 1e-5


def test_export_for_quantization_recalibrates_a_copy() -> None:
    model = _mixed()
    model.train()
    data = [torch.randn(4, 3, 8, 8) * 2 + 1 for _ in range(3)]
    x = (torch.randn(2, 3, 8, 8),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = export_for_quantization(model, x, calibration_data=data)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert count_batch_norm_ops(gm) == 1  # bn_cat
    from fxnorm import recalibrate

    expected = recalibrate(_mixed(), data).eval()  # the same model, recalibrated in eager mode
    with torch.no_grad():
        assert zoo.rel_err(gm(*x), expected(*x)) < 1e-5
        assert zoo.rel_err(gm(*x), model.eval()(*x)) > 1e-2  # the statistics did change


def test_export_errors_name_the_cause() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if float(y.sum()) > 0 else -y  # data-dependent: torch.export rejects it

    with pytest.raises(TraceError, match="rejects Branchy itself"):
        export_folded(Branchy().eval(), (torch.randn(1, 3, 4, 4),))
    with pytest.raises(FxNormError, match="example_inputs must be a tuple"):
        export_folded(_mixed(), {"x": torch.randn(1, 3, 4, 4)})
    with pytest.raises(FxNormError, match="expects an ExportedProgram"):
        count_batch_norm_ops(object())
