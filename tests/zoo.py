"""The torchvision model zoo for tests and benchmarks: build any model without weights, randomize
its normalization layers so that folds and resets are never identities, and make the smallest
inputs each model accepts (fast on two CPU cores).

Tests import it as ``from zoo import build, example_inputs`` (``tests/`` is on ``sys.path``).

Example:
    >>> import zoo
    >>> model = zoo.build("resnet18")
    >>> out = model(*zoo.example_inputs("resnet18"))
    >>> zoo.rel_err(out, out)
    0.0

Sizes: :data:`INPUT_SIZES` holds the smallest input each model family accepts. Some models need
their full resolution (``maxvit_t``: 224x224, its partitions are fixed at 7x7; ``s3d``: 16x224x224,
its final pooling is a fixed 2x7x7; ``mvit_*``: 16x224x224, their builders fix the positional
embedding size); vision transformers are *built* for a small input (``image_size`` builder argument). Detection models are built with
``min_size``/``max_size`` = 64 so their transform does not upscale the image to 800 pixels, except
the SSDs whose size is fixed by the architecture (300 and 320), and with fewer proposals and
detections (``_FEW_BOXES``: same layers, less post-processing work).

Build + forward time: :data:`HEAVY` lists the models above ~4 s (build dominated by
parameter initialisation; listed so that a test can mark them ``slow`` or share one build).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn
from helpers import flatten_outputs, randomize_norms, rel_err
from torchvision import models as tvm

__all__ = [
    "FAMILIES",
    "ALL_MODELS",
    "HEAVY",
    "INPUT_SIZES",
    "family_of",
    "input_size",
    "build",
    "randomize_norms",
    "randomize_dormant",
    "example_inputs",
    "flatten_outputs",
    "rel_err",
]


def _list(module: Any) -> list[str]:
    return sorted(tvm.list_models(module=module))


#: torchvision model names by family (quantized models excluded: they cannot hold a float BN).
FAMILIES: dict[str, list[str]] = {
    "classification": _list(tvm),
    "segmentation": _list(tvm.segmentation),
    "video": _list(tvm.video),
    "detection": _list(tvm.detection),
    "optical_flow": _list(tvm.optical_flow),
}

#: Every model of every family, in family order.
ALL_MODELS: list[str] = [name for names in FAMILIES.values() for name in names]

#: Models whose build + forward at the inputs below took more than ~4 s on two slow (shared) cores,
#: measured with ``python tests/zoo.py --time`` (build, forward; seconds):
#: regnet_y_128gf 14.1+3.4 (645M params), vit_h_14 8.9+3.5 (632M), mvit_v1_b 2.6+7.3 (16x224x224),
#: convnext_large 7.2+1.8, vit_l_16 5.3+2.3, vit_l_32 4.3+1.8, swin3d_s 5.7+2.3, maxvit_t 0.5+6.1 (224x224),
#: convnext_base 4.7+1.8, mvit_v2_s 2.4+1.9, swin_b 2.6+1.5. Everything else: < 3 s, most < 0.5 s.
HEAVY: frozenset[str] = frozenset({
    "regnet_y_128gf", "vit_h_14", "mvit_v1_b", "convnext_large", "vit_l_16", "vit_l_32", "swin3d_s",
    "maxvit_t", "convnext_base", "mvit_v2_s", "swin_b",
})

#: Detection post-processing limits: fewer proposals and detections (the R-CNN box head runs on every
#: proposal: 1000 by default, the cost of the whole model on a small image). The layers are unchanged.
_FEW_BOXES: dict[str, dict[str, int]] = {
    **{rcnn: {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 20}
       for rcnn in ("fasterrcnn", "maskrcnn", "keypointrcnn")},
    **{dense: {"topk_candidates": 100, "detections_per_img": 20} for dense in ("retinanet", "fcos", "ssd",
                                                                              "ssdlite320")},
}

#: Builder arguments that make a model accept a small input (see the module docstring).
_BUILD_KWARGS: dict[str, dict[str, Any]] = {
    **{name: {"image_size": 32} for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")},
    "vit_h_14": {"image_size": 28},
    **{name: {"min_size": 64, "max_size": 64, **_FEW_BOXES[name.split("_")[0]]}
       for name in FAMILIES["detection"] if not name.startswith("ssd")},
    **{name: dict(_FEW_BOXES["ssd"]) for name in FAMILIES["detection"] if name.startswith("ssd")},
    "inception_v3": {"init_weights": False},
    "googlenet": {"init_weights": False},
}

#: Input size of each model (image: (H, W); video: (T, H, W)); models not listed use the family default.
INPUT_SIZES: dict[str, tuple[int, ...]] = {
    "alexnet": (64, 64),
    "inception_v3": (75, 75),
    "squeezenet1_0": (48, 48),
    "squeezenet1_1": (48, 48),
    "maxvit_t": (224, 224),
    "vit_h_14": (28, 28),
    "s3d": (16, 224, 224),
    "mvit_v1_b": (16, 224, 224),
    "mvit_v2_s": (16, 224, 224),
    "ssd300_vgg16": (64, 64),
    "ssdlite320_mobilenet_v3_large": (64, 64),
    "raft_small": (128, 128),
    "raft_large": (128, 128),
}
_DEFAULT_SIZES = {
    "classification": (32, 32),
    "segmentation": (32, 32),
    "video": (4, 32, 32),
    "detection": (64, 64),
    "optical_flow": (128, 128),
}


def family_of(name: str) -> str:
    """The family a torchvision model name belongs to.

    Example:
        >>> family_of("r3d_18")
        'video'
    """
    for family, names in FAMILIES.items():
        if name in names:
            return family
    raise KeyError(f"{name!r} is not a torchvision model (see zoo.ALL_MODELS)")


def _builder_accepts(fn: Any, key: str) -> bool:
    import inspect

    return key in inspect.signature(fn).parameters


@torch.no_grad()
def randomize_dormant(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the parameters that make a freshly built model nearly insensitive to what a test changes
    (in place): all-zero weights of conv/linear layers (the ViT head is zero-initialised, so a ViT's
    output is constant) become ``N(0, 1/fan_in)``, and layer scales (ConvNeXt's ``layer_scale``,
    initialised to 1e-6, which hides its blocks from the output) become ``U(0.5, 1.5)``.

    Example:
        >>> head = nn.Sequential(nn.Linear(4, 2))
        >>> _ = nn.init.zeros_(head[0].weight)
        >>> bool(randomize_dormant(head)[0].weight.abs().sum() > 0)
        True
    """
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        leaf = name.rpartition(".")[2]
        if leaf == "layer_scale":
            v = torch.rand(param.shape, generator=gen, dtype=torch.float64) + 0.5
        elif leaf == "weight" and param.dim() >= 2 and not bool(param.any()):
            fan_in = param[0].numel()
            v = torch.randn(param.shape, generator=gen, dtype=torch.float64) / fan_in**0.5
        else:
            continue
        param.copy_(v.to(param.dtype))
    return model


def build(name: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build torchvision model ``name`` without weights, in eval mode, with randomized norms.

    The model's own parameters are initialised with ``torch.manual_seed(seed)`` (global RNG state is
    restored afterwards); ``kwargs`` go to the builder and override the small-input defaults.

    Example:
        >>> m = build("mobilenet_v3_small")
        >>> m.training
        False
    """
    family_of(name)  # a KeyError naming the zoo for unknown names
    fn = tvm.get_model_builder(name)
    args: dict[str, Any] = {"weights": None}
    if _builder_accepts(fn, "weights_backbone"):
        args["weights_backbone"] = None
    args.update(_BUILD_KWARGS.get(name, {}))
    args.update(kwargs)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = fn(**args)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    randomize_norms(model, seed)
    return model


def input_size(name: str) -> tuple[int, ...]:
    """The (H, W) or (T, H, W) input size used for ``name``.

    Example:
        >>> input_size("maxvit_t")
        (224, 224)
    """
    return INPUT_SIZES.get(name, _DEFAULT_SIZES[family_of(name)])


def example_inputs(
    name: str,
    batch: int = 1,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: tuple[int, ...] | None = None,
) -> tuple:
    """Positional arguments for ``model(*args)``: small random inputs that ``name`` accepts.

    Classification/segmentation: ``(batch, 3, H, W)``; video: ``(batch, 3, T, H, W)``; detection:
    one list of ``batch`` images ``(3, H, W)``; optical flow: two ``(batch, 3, H, W)`` images.
    ``size`` overrides :func:`input_size`.

    Example:
        >>> [tuple(t.shape) for t in example_inputs("resnet18", 2)]
        [(2, 3, 32, 32)]
    """
    family = family_of(name)
    size = tuple(size) if size is not None else input_size(name)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    if family == "video":
        return (rand(batch, 3, *size),)
    if family == "detection":
        return ([rand(3, *size).abs().clamp(max=1.0) for _ in range(batch)],)
    if family == "optical_flow":
        return (rand(batch, 3, *size), rand(batch, 3, *size))
    return (rand(batch, 3, *size),)


def _time_all(names: list[str]) -> None:  # pragma: no cover - a measuring tool, not a test
    import time

    torch.set_num_threads(2)
    for name in names:
        t0 = time.perf_counter()
        model = build(name)
        t1 = time.perf_counter()
        with torch.no_grad():
            model(*example_inputs(name))
        t2 = time.perf_counter()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:40s} build {t1 - t0:6.2f}s forward {t2 - t1:6.2f}s params {params:7.1f}M", flush=True)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "--time":
        _time_all(sys.argv[2:] or ALL_MODELS)
