"""Recalibrate -> fold -> export -> PT2E quantization (torchao) of torchvision models, with the
agreement between the float and the quantized outputs measured on held-out inputs.

The models are built without weights (no download) and their batch-norm statistics recalibrated
on generated images (smooth random fields: low-resolution noise upsampled, plus a little pixel
noise), so that every norm sees the statistics of the data the model is then evaluated on. The flow:

1. ``fxnorm.export.export_for_quantization(model, example, calibration_data=...)``: on a copy,
   recalibrate the norms (``fxnorm.calibration.recalibration.recalibrate``), fold them (``fxnorm.fold``), and
   ``torch.export.export(..., strict=True).module()``;
2. torchao: ``prepare_pt2e(graph, quantizer)``, run the calibration batches, ``convert_pt2e``;
3. compare with the float (folded, recalibrated) program on held-out images: SQNR (dB), cosine
   similarity of the logits, top-1 agreement.

Needs the ``quant`` extra (torchao). Quantizers: ``x86`` (torchao's X86InductorQuantizer, default
config) and ``xnnpack`` (the XNNPACK-style quantizer torchao ships for tests, symmetric config).

Random networks amplify small perturbations far more than trained ones (see docs/quantization.md,
"Reading the agreement figures"): ``--noise`` also measures the SQNR of the float model under 8-bit-sized
weight noise, the yardstick for the quantized figures.

Usage:
    python examples/quantize_pt2e.py --models resnet18 mobilenet_v2 --quantizer x86 --json out.json

Example:
    >>> x = images(2, 16, seed=0)
    >>> tuple(x.shape), round(float(x.std()), 1) > 0.3
    ((2, 3, 16, 16), True)
    >>> r = agreement(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.1]]))
    >>> round(r["sqnr_db"], 1), r["top1"]
    (27.0, 1.0)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fxnorm import count_batch_norm_ops, export_for_quantization

__all__ = ["images", "make_quantizer", "quantize", "agreement", "weight_noise_sqnr", "run", "main"]


def images(n: int, size: int, *, seed: int) -> torch.Tensor:
    """``n`` generated RGB images ``size`` x ``size``: 4x4 Gaussian noise upsampled bilinearly, plus
    pixel noise of std 0.1 (smooth structures, roughly unit variance, like normalized photos)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=gen)
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.1 * torch.randn(n, 3, size, size, generator=gen)


def make_quantizer(kind: str) -> Any:
    """torchao's quantizer ``kind`` (``"x86"`` or ``"xnnpack"``) with its default static config."""
    if kind == "x86":
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    if kind == "xnnpack":
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    raise ValueError(f"unknown quantizer {kind!r}: x86 or xnnpack")


def quantize(model: nn.Module, example: tuple, calibration: list[torch.Tensor], kind: str, *,
             strict: bool = True) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, dict[str, float]]:
    """(float program, quantized program, timings): fxnorm's preparation then torchao's PT2E PTQ.

    The float program is fxnorm's output (recalibrated on ``calibration``, folded, exported); the
    quantized one is that program through ``prepare_pt2e``, the same ``calibration`` batches, and
    ``convert_pt2e``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    t0 = time.perf_counter()
    graph = export_for_quantization(model, example, calibration_data=calibration, strict=strict)
    float_graph = copy.deepcopy(graph)
    t1 = time.perf_counter()
    prepared = prepare_pt2e(graph, make_quantizer(kind))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    quantized = convert_pt2e(prepared)
    t2 = time.perf_counter()
    return float_graph, quantized, {"prepare_s": t1 - t0, "quantize_s": t2 - t1}


def agreement(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """SQNR in dB (``20 log10 |ref| / |ref - q|``), the smallest per-sample cosine similarity, and
    the top-1 agreement of two ``(batch, classes)`` logit tensors."""
    ref, out = reference.detach().double(), quantized.detach().double()
    noise = float((ref - out).norm())
    sqnr = math.inf if noise == 0 else 20 * math.log10(float(ref.norm()) / noise)
    cosine = float(F.cosine_similarity(ref, out, dim=1).min())
    top1 = float((ref.argmax(1) == out.argmax(1)).double().mean())
    return {"sqnr_db": sqnr, "min_cosine": cosine, "top1": top1}


@torch.no_grad()
def weight_noise_sqnr(graph: nn.Module, inputs: torch.Tensor, *, seed: int = 0) -> float:
    """SQNR of ``graph`` under uniform weight noise of one 8-bit step (``max|w| / 255`` per tensor):
    how much a network of these weights amplifies quantization-sized errors on its own."""
    noisy = copy.deepcopy(graph)
    gen = torch.Generator().manual_seed(seed)
    for p in noisy.parameters():
        step = float(p.abs().max()) / 255
        p.add_((torch.rand(p.shape, generator=gen) - 0.5) * step)
    return agreement(graph(inputs), noisy(inputs))["sqnr_db"]


def run(name: str, kind: str, *, batch: int = 8, size: int = 32, calib_batches: int = 3, seed: int = 0,
        noise: bool = False, strict: bool = True) -> dict[str, Any]:
    """The whole flow on torchvision model ``name`` (no weights): figures as a dict."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None).eval()
    finally:
        torch.random.set_rng_state(state)
    calibration = [images(batch, size, seed=seed + i) for i in range(calib_batches)]
    held_out = images(batch, size, seed=seed + 1000)
    bn_before = count_batch_norm_ops(torch.export.export(model, (held_out,)))
    float_graph, quantized, times = quantize(model, (calibration[0],), calibration, kind, strict=strict)
    with torch.no_grad():
        result = agreement(float_graph(held_out), quantized(held_out))
    result.update(times)
    result.update({
        "model": name, "quantizer": kind,
        "batch_norm_ops_unfolded": bn_before,
        "batch_norm_ops_folded": count_batch_norm_ops(float_graph),
        "quantize_ops": sum(1 for n in quantized.graph.nodes if "quantize_per_tensor" in str(n.target)
                            and "dequantize" not in str(n.target)),
    })
    if noise:
        result["float_weight_noise_sqnr_db"] = weight_noise_sqnr(float_graph, held_out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--quantizer", nargs="+", choices=("x86", "xnnpack"), default=["x86", "xnnpack"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image size (default 32)")
    parser.add_argument("--calib-batches", type=int, default=3)
    parser.add_argument("--noise", action="store_true", help="also measure the float model's weight-noise SQNR")
    parser.add_argument("--non-strict", action="store_true", help="torch.export with strict=False")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    header = (f"{'model':22s} {'quantizer':9s} {'BN ops':>9s} {'q ops':>5s} {'SQNR dB':>8s} {'min cos':>7s} "
              f"{'top-1':>5s} {'noise dB':>8s} {'time s':>6s}")
    print(header)
    for name in args.models:
        for kind in args.quantizer:
            try:
                r = run(name, kind, batch=args.batch, size=args.size, calib_batches=args.calib_batches,
                        noise=args.noise, strict=not args.non_strict)
            except Exception as err:  # an upstream limit: report it, go on with the next one
                r = {"model": name, "quantizer": kind, "error": f"{type(err).__name__}: {err}"}
                print(f"{name:22s} {kind:9s} FAILED: {r['error'][:120]}", flush=True)
                rows.append(r)
                continue
            noise = f"{r['float_weight_noise_sqnr_db']:8.1f}" if "float_weight_noise_sqnr_db" in r else f"{'-':>8s}"
            print(f"{name:22s} {kind:9s} {r['batch_norm_ops_unfolded']:>4d}->{r['batch_norm_ops_folded']:<3d} "
                  f"{r['quantize_ops']:>5d} {r['sqnr_db']:8.1f} {r['min_cosine']:7.3f} {r['top1']:5.2f} {noise} "
                  f"{r['prepare_s'] + r['quantize_s']:6.1f}", flush=True)
            rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
