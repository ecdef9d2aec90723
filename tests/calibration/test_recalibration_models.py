"""fxnorm.recalibrate end to end on torchvision models (small inputs, random weights, randomized norms).

Recalibration runs on the user's own model: nothing but the norms' statistics may change (every
parameter, buffer, attribute, hook, class and child is compared bitwise), and user hooks on the norms
see what the norms receive. Two references per model:

- the estimator: every norm's new statistics equal the float64 pooled statistics of the inputs the
  norm received (captured by forward pre-hooks on the norms during the same run), to 1e-6;
- the semantics: a copy of the model with only its norms in training mode and every other module in
  eval mode (what recalibration must emulate), whose norm inputs are captured by hooks. Deep random
  networks amplify float32 rounding differences between the two forwards, hence a looser tolerance;
  running dropout or stochastic depth, or normalizing with the wrong statistics, is orders of
  magnitude above it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import zoo
from devices import DEVICES

from helpers import STAT_BUFFERS, assert_model_unchanged, capture_norm_inputs, float64_moments, model_snapshot
from fxnorm import recalibrate, report_of, CalibrationReport
from fxnorm.calibration.selection import stat_norms

pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "r3d_18", "fasterrcnn_mobilenet_v3_large_320_fpn"]



def errors(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> tuple[float, float]:
    """|mean error| / std and |var error| / var, worst channel (channels with var > 1e-12)."""
    live = var > 1e-12
    got_mean, got_var = norm.running_mean.double().cpu()[live], norm.running_var.double().cpu()[live]
    mean, var = mean[live], var[live]
    return ((got_mean - mean).abs() / var.sqrt()).max().item(), ((got_var - var).abs() / var).max().item()


def batches_for(name: str, device: str) -> list[tuple]:
    """Three unshuffled batches drifting apart, the last one short (detection: lists of images)."""
    out = []
    for i, n in enumerate((3, 3, 2)):
        size = (64, 64) if zoo.family_of(name) == "classification" else None
        (x,) = zoo.example_inputs(name, n, seed=i, device=device, size=size)
        out.append(([im * (1 + 0.1 * i) for im in x],) if isinstance(x, list) else (x * (1 + 0.2 * i) + 0.3 * i,))
    return out


def train_mode_reference(model: nn.Module, batches: list[tuple]) -> dict[str, list[torch.Tensor]]:
    """Norm inputs of a copy whose norms alone are in training mode."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, norm in stat_norms(ref):
        norm.train()
        norm.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            ref(batch[0])
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_recalibrates_end_to_end(name, device):
    if device == "cuda" and name != "resnet18":
        pytest.skip("one CUDA model is enough")
    model = zoo.build(name).to(device).train()  # recalibration must not run it in training mode
    batches = batches_for(name, device)
    reference = train_mode_reference(model, batches)
    model.eval()
    with torch.no_grad():  # what a forward sets up lazily (a detection model's RoI pooling scales)
        model(batches[0][0])
    snap = model_snapshot(model.train())

    with capture_norm_inputs(model) as captured:
        out = recalibrate(model, batches)  # (x,) batches: model(x)
    seen = {k: v for k, v in captured.items() if v}
    report = report_of(out, CalibrationReport)

    assert out is model
    assert_model_unchanged(model, snap, except_buffers={name: STAT_BUFFERS for name, _ in stat_norms(model)})
    assert not report.unsupported and not report.skipped_batches
    assert sorted(s.name for s in report.layers) == sorted(reference) == sorted(seen)
    assert report.unreached == [n for n, _ in stat_norms(model) if n not in reference]
    worst_estimator = worst_semantics = 0.0
    compared = 0
    for layer in report.layers:
        norm = model.get_submodule(layer.name)
        assert norm.num_batches_tracked.item() == layer.batches == len(seen[layer.name])
        worst_estimator = max(worst_estimator, *errors(norm, *float64_moments(seen[layer.name], unbiased=True)[:2]))
        # with a few values per channel in a batch, batch statistics magnify rounding differences
        # between the two forwards (1x1 feature maps of 2-3 samples): compare where they are well posed
        if min(x.numel() // x.shape[1] for x in reference[layer.name]) >= 8:
            worst_semantics = max(worst_semantics, *errors(norm, *float64_moments(reference[layer.name], unbiased=True)[:2]))
            compared += 1
    assert worst_estimator <= 1e-6
    assert compared >= len(report.layers) // 2 and worst_semantics <= 1e-4
