"""find_norms on every torchvision classification, segmentation, video and detection model.

For a model with batch norms, the BN sites must be exactly the BatchNorm modules whose forward runs
in one eval forward on small inputs (googlenet/inception aux heads do not run in eval), one site
each. Detection models do not trace as a whole: their untraced parts are reported and the BNs of the
traced backbone/FPN/heads are still found in graphs.

Speed (the whole zoo runs in CI on two cores): one intra-op thread (tiny inputs, many small ops),
and random initialisation, which dominates building the big models, replaced by tiling a small random
block (the values of conv/linear weights do not matter here; norms are randomized by ``zoo.build``).

Models without any batch norm (ViT, Swin, ConvNeXt, MViT, VGG...) are built on the meta device (no
weights allocated, no forward): their sites must be their norm modules, none of them a BN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn
from torchvision import models as tvm

import zoo
from fxnorm.graph.kinds import BN_KINDS, norm_kind
from fxnorm import find_norms, trace, report_of, TraceReport

FAMILIES = ("classification", "segmentation", "video", "detection")
MODELS = [name for family in FAMILIES for name in zoo.FAMILIES[family]]


#: Keep the detection heads small: few proposals and detections (their heads run once per box).
_FEW_DETECTIONS: dict[str, dict[str, int]] = {
    **{prefix: {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 10, "box_detections_per_img": 5}
       for prefix in ("fasterrcnn", "maskrcnn", "keypointrcnn")},
    **{prefix: {"topk_candidates": 50, "detections_per_img": 5} for prefix in ("retinanet", "fcos")},
    **{prefix: {"topk_candidates": 50, "detections_per_img": 5} for prefix in ("ssd300", "ssdlite320")},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def _cheap_random_init(block: int = 4096) -> Iterator[None]:
    """Make ``Tensor.uniform_``/``normal_`` tile one small random block instead of drawing every value."""
    originals = {"uniform_": torch.Tensor.uniform_, "normal_": torch.Tensor.normal_}

    def tiled(method: str) -> Any:
        draw = originals[method]

        def fill(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            n = self.numel()
            if n <= block or not self.is_contiguous():
                return draw(self, *args, **kwargs)
            small = draw(torch.empty(block, dtype=self.dtype, device=self.device), *args, **kwargs)
            with torch.no_grad():
                self.view(-1).copy_(small.repeat((n + block - 1) // block)[:n])
            return self

        return fill

    try:
        for method in originals:
            setattr(torch.Tensor, method, tiled(method))
        yield
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)


def _meta_build(name: str) -> nn.Module | None:
    """The model built on the meta device (instant, no memory), or None if its builder needs data."""
    fn = tvm.get_model_builder(name)
    args: dict[str, Any] = {"weights": None, **zoo._BUILD_KWARGS.get(name, {})}
    if zoo._builder_accepts(fn, "weights_backbone"):
        args["weights_backbone"] = None
    try:
        with torch.device("meta"):
            return fn(**args).eval()
    except (NotImplementedError, RuntimeError):  # regnets compute widths with .tolist()
        return None


def _norm_modules(model: nn.Module) -> dict[str, str]:
    return {name: kind for name, m in model.named_modules() if (kind := norm_kind(m)) is not None}


def _reached_batch_norms(model: nn.Module, inputs: tuple) -> list[str]:
    names = {id(m): name for name, m in model.named_modules() if norm_kind(m) in BN_KINDS}
    reached: dict[str, None] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: reached.setdefault(names[id(mod)]))
             for m in model.modules() if id(m) in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return list(reached)


@pytest.mark.parametrize("name", MODELS)
def test_find_norms_finds_every_reached_batch_norm(name: str) -> None:
    family = zoo.family_of(name)
    meta = _meta_build(name)
    if meta is not None and not any(kind in BN_KINDS for kind in _norm_modules(meta).values()):
        sites = find_norms(meta)
        assert [s for s in sites if s.kind in BN_KINDS] == []
        assert all(s.fold is None and s.reason for s in sites)  # per-sample norms never fold
        # every norm module is found, by its qualified name (LayerNorm2d & co. as functional calls)
        assert {s.name for s in sites} == set(_norm_modules(meta))
        return

    with _cheap_random_init():
        model = zoo.build(name, **_FEW_DETECTIONS.get(name.split("_")[0], {}))
    reached = _reached_batch_norms(model, zoo.example_inputs(name))
    assert reached, f"{name} has BatchNorm modules but none ran"
    traced = trace(model)
    report = report_of(traced, TraceReport)
    sites = find_norms(traced)
    bn = [s for s in sites if s.kind in BN_KINDS]
    assert sorted(s.name for s in bn) == sorted(reached)  # same modules, one site each
    assert all(s.op == "call_module" and s.graph is not None for s in bn)  # all in traced graphs
    assert all(s.num_features and s.num_batches_tracked == 10 and s.health == [] for s in bn)
    assert all((s.fold is None) == (s.reason is not None) for s in bn)
    if family == "detection":
        untraced = {u.name: u for u in report.untraced}
        assert "" in untraced and untraced[""].reason.startswith("TraceError")
        assert "backbone" in report.graphs
        assert any(s.name.startswith("backbone.") for s in bn)
    else:
        assert report.complete
    # the user's model was not changed by tracing
    assert not any(isinstance(m, torch.fx.GraphModule) for m in model.modules())
