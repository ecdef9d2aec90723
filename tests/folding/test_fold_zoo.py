"""fxnorm.fold on every torchvision classification, segmentation, video and detection model.

Each model is built without weights, with randomized BN statistics and affine parameters (and its
dormant parameters woken up: ViT's zero head, ConvNeXt's 1e-6 layer scales), then folded in place
with ``norm_affine=True`` (batch norms, and the affine part of LayerNorms into the Linears after them):

- outputs match the unfolded model: relative error < 1e-5 in float32, < 1e-10 in float64. Detection
  models end in data-dependent post-processing (top-k, NMS, thresholds) that turns 1e-6 differences
  into different proposals, so for them every traced part (backbone + FPN, heads) is compared on the
  inputs it received in the reference run; the untraced glue is unchanged code.
- every batch norm reached by the forward is either folded or left, and the count left is the count
  that has no exact fold, derived by hand from the architecture (:data:`EXPECTED_LEFT`).
- the number of LayerNorm affine folds is also derived by hand (:data:`EXPECTED_NORM_AFFINE`).

CI budget (measured: both fold test files take ~150 s of single-thread CPU): the three models of
:data:`EXPENSIVE` (LayerNorm-only; 632M parameters, or inputs of 16x224x224 fixed by their builders)
run their CPU forward check only under ``pytest -m slow`` (marked ``slow``); in CI they are
folded on the meta device (no weights, no forward) and their fold counts checked. Their CUDA
variants always run on a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
from torchvision import models as tvm

import zoo
from fxnorm import fold, find_norms, trace, report_of, FoldReport, TraceReport
from fxnorm.graph.kinds import BN_KINDS, norm_kind

FAMILIES = ("classification", "segmentation", "video", "detection")
MODELS = [name for family in FAMILIES for name in zoo.FAMILIES[family]]
TOL32, TOL64 = 1e-5, 1e-10

#: Models whose full CPU check costs most and that have no batch norm (single-thread CPU seconds:
#: vit_h_14 9.1 (632M parameters), mvit_v1_b 7.2 and mvit_v2_s 6.6 (16x224x224 input fixed by their
#: builders)). In CI they get the structure check on the meta device below; the full check runs with
#: pytest -m slow. regnet_y_128gf (645M parameters, 6.2 GB peak RSS, 12.2 s) runs fully: its batch norms
#: need real statistics, so a structure check would cost as much. Every other model < 6.1 s.
EXPENSIVE = frozenset({"vit_h_14", "mvit_v1_b", "mvit_v2_s"})


def _densenet_left(blocks: tuple[int, ...]) -> int:
    # Pre-activation: every dense layer's norm1 reads a torch.cat and feeds a ReLU, so do the three
    # transition norms and the final norm5; each layer's norm2 folds into its conv1.
    return sum(blocks) + 3 + 1


#: Batch norms with no exact fold (every other reached BN must fold).
EXPECTED_LEFT: dict[str, int] = {
    "densenet121": _densenet_left((6, 12, 24, 16)),
    "densenet161": _densenet_left((6, 12, 36, 24)),
    "densenet169": _densenet_left((6, 12, 32, 32)),
    "densenet201": _densenet_left((6, 12, 48, 32)),
}


def _vit(layers: int) -> int:
    return 2 * layers  # ln_1 -> self_attention's packed in_proj, ln_2 -> mlp.0; the final ln feeds x[:, 0]


def _swin(depths: tuple[int, ...]) -> int:
    # norm2 -> mlp.0 in every block, PatchMerging's norm -> reduction; norm1 feeds the window attention
    # function (zero padding, windows) and the final norm a permute.
    return sum(depths) + len(depths) - 1


def _convnext(depths: tuple[int, ...]) -> int:
    return sum(depths)  # the block's LayerNorm -> Linear; LayerNorm2d are functional over channels


#: LayerNorm affine folds (``norm_affine=True``), derived from each architecture.
EXPECTED_NORM_AFFINE: dict[str, int] = {
    "vit_b_16": _vit(12), "vit_b_32": _vit(12), "vit_l_16": _vit(24), "vit_l_32": _vit(24), "vit_h_14": _vit(32),
    "swin_t": _swin((2, 2, 6, 2)), "swin_s": _swin((2, 2, 18, 2)), "swin_b": _swin((2, 2, 18, 2)),
    "swin3d_t": _swin((2, 2, 6, 2)), "swin3d_s": _swin((2, 2, 18, 2)), "swin3d_b": _swin((2, 2, 18, 2)),
    # swin v2 is post-norm: its norms feed stochastic depth / the residual; PatchMergingV2 norms run
    # after the reduction Linear.
    "swin_v2_t": 0, "swin_v2_s": 0, "swin_v2_b": 0,
    "convnext_tiny": _convnext((3, 3, 9, 3)), "convnext_small": _convnext((3, 3, 27, 3)),
    "convnext_base": _convnext((3, 3, 27, 3)), "convnext_large": _convnext((3, 3, 27, 3)),
    # MaxViT: 11 blocks x 2 partition layers x (attention LN -> to_qkv, MLP LN -> Linear) + the classifier LN.
    "maxvit_t": 11 * 2 * 2 + 1,
    # MViT: 16 blocks x (norm1 -> attention qkv, norm2 -> mlp); the final norm feeds x[:, 0].
    "mvit_v1_b": 16 * 2, "mvit_v2_s": 16 * 2,
}


def _counts(report: Any) -> tuple[list[str], int]:
    bn = [f.name for f in report.folded if f.kind in BN_KINDS]
    affine = sum(1 for f in report.folded if f.mode == "norm_affine_into_consumer")
    return bn, affine


def _hook_parts(model: nn.Module, names: list[str]) -> tuple[dict[str, list], list]:
    calls: dict[str, list] = {name: [] for name in names}

    def make(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if len(calls[name]) < 4:
                calls[name].append((args, kwargs, out))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n), with_kwargs=True) for n in names]
    return calls, handles


def _classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}


def check_zoo_model(name: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Fold in place and check the drop-in contract and the outputs (see the module doc)."""
    family = zoo.family_of(name)
    model = zoo.randomize_dormant(zoo.build(name)).to(device, dtype)
    inputs = zoo.example_inputs(name, device=device, dtype=dtype)
    tol = TOL64 if dtype == torch.float64 else TOL32
    bn_names = {id(m): n for n, m in model.named_modules() if norm_kind(m) in BN_KINDS}
    reached: dict[str, None] = {}
    handles = [m.register_forward_hook(lambda mod, a, o: reached.setdefault(bn_names[id(mod)]))
               for m in model.modules() if id(m) in bn_names]
    with torch.no_grad():
        ref = model(*inputs)
    for h in handles:
        h.remove()
    parts: dict[str, list] = {}
    if family == "detection":
        # Which parts trace can depend on state set by a first forward (MultiScaleRoIAlign caches its
        # scales): list them after one, then capture what each part receives and returns.
        graphs = [g for g in report_of(trace(model), TraceReport).graphs if g]
        parts, handles = _hook_parts(model, graphs)
        with torch.no_grad():
            ref = model(*inputs)
        for h in handles:
            h.remove()
    classes, model_type = _classes(model), type(model)

    # detection models trace part by part: the example run shows eager code does not touch the folds
    folded = fold(model, inplace=True, norm_affine=True, example_inputs=inputs if parts else None)

    assert folded is model and type(folded) is model_type
    report = report_of(folded, FoldReport)
    gone = {f.name for f in report.folded if f.mode != "norm_affine_into_consumer"}
    changed = {n for n, cls in _classes(folded).items() if classes.get(n) is not cls}
    assert changed <= gone, f"{name}: modules that changed class without folding: {sorted(changed - gone)}"
    with torch.no_grad():
        out = folded(*inputs)
        if family == "detection":
            assert parts and all(parts.values())
            for part_name, calls in parts.items():
                part = folded.get_submodule(part_name)
                for args, kwargs, expected in calls:
                    err = zoo.rel_err(part(*args, **kwargs), expected)
                    assert err < tol, f"{name}: part {part_name} relative error {err}"
            assert len(zoo.flatten_outputs(out)) == len(zoo.flatten_outputs(ref))
            assert {f.evidence for f in report.folded} <= {"counted"}
        else:
            err = zoo.rel_err(out, ref)
            assert err < tol, f"{name}: relative error {err}"
            assert {f.evidence for f in report.folded} <= {"proven"}
    left = [s.name for s in find_norms(folded) if s.kind in BN_KINDS]
    folded_bn, affine = _counts(report)
    assert len(left) == EXPECTED_LEFT.get(name, 0), report.skipped
    assert sorted(folded_bn + left) == sorted(reached)
    assert sorted(s.name for s in report.skipped if s.kind in BN_KINDS) == sorted(left)
    assert affine == EXPECTED_NORM_AFFINE.get(name, 0)


CPU_MODELS = [n if n not in EXPENSIVE else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]


@pytest.mark.parametrize("name", CPU_MODELS)
def test_fold_zoo_cpu(name: str) -> None:
    check_zoo_model(name, "cpu")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fold_zoo_cuda(name: str) -> None:
    check_zoo_model(name, "cuda")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "r3d_18"])
def test_fold_zoo_float64(name: str) -> None:
    check_zoo_model(name, "cpu", torch.float64)


def _meta_build(name: str) -> nn.Module:
    fn = tvm.get_model_builder(name)
    args: dict[str, Any] = {"weights": None, **zoo._BUILD_KWARGS.get(name, {})}
    with torch.device("meta"):
        return fn(**args).eval()


@pytest.mark.parametrize("name", sorted(EXPENSIVE))
def test_fold_zoo_expensive_structure(name: str) -> None:
    """The CI check of :data:`EXPENSIVE`: fold decisions and counts without a CPU forward."""
    model = _meta_build(name)
    reached = [n for n, m in model.named_modules() if norm_kind(m) in BN_KINDS]
    folded = fold(model, inplace=True, norm_affine=True)
    report = report_of(folded, FoldReport)
    folded_bn, affine = _counts(report)
    assert folded is model
    assert [s.name for s in find_norms(folded) if s.kind in BN_KINDS] == []
    assert sorted(folded_bn) == sorted(reached)
    assert affine == EXPECTED_NORM_AFFINE.get(name, 0)
    assert all(s.reason for s in report.skipped)
