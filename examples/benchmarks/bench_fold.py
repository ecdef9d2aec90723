"""Benchmark fxnorm.fold against torch.fx.experimental.optimization.fuse, side by side in one run.

Two modes:

* default: for each model, the median time of the fold pass (fxnorm vs torch ``fuse``, runs
  interleaved), the median latency of the unfolded eval model, the torch-fused model and the
  fxnorm-folded model at batch 1 and 16 (interleaved too), and the batch norms left by each.
* ``--detection``: models traced part by part (torchvision detection): the fold pass without and
  with ``example_inputs`` (one recorded run checks the eager glue) against one eval forward of one
  image at the test input size (interleaved).
* ``--coverage``: over the torchvision zoo (classification, segmentation, video, detection, or
  ``--models``): batch norms in total, left after torch ``fuse``, left after fxnorm (folded with
  the model's example inputs, as the command line does), and fxnorm's worst relative output error
  (detection: per traced part, on the inputs it received).

Ratios are computed from figures measured in the same run; nothing here is a test.

Example:
    python examples/benchmarks/bench_fold.py --models resnet50 --repeats 5
    python examples/benchmarks/bench_fold.py --coverage --json coverage.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.fx.experimental.optimization import fuse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import zoo  # noqa: E402  (tests/zoo.py: torchvision models with randomized norms, small inputs)

from fxnorm import FoldReport, TraceReport, find_norms, fold, report_of, trace  # noqa: E402
from fxnorm.graph.kinds import BN_KINDS  # noqa: E402

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0"]
DETECTION_MODELS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                    "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn"]


def bn_left(model: nn.Module) -> int:
    """Batch-norm sites (module or functional, traced or eager) still in ``model``."""
    return sum(1 for s in find_norms(model) if s.kind in BN_KINDS)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn ``repeats`` times (after ``warmup``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, device: str, repeats: int, size: int, batches: list[int]) -> dict[str, Any]:
    model = zoo.build(name).to(device)
    pass_times = interleaved({"fxnorm": lambda: fold(model), "fuse": lambda: fuse(model)}, repeats, "cpu")
    folded, fused = fold(model), fuse(model)
    row: dict[str, Any] = {
        "model": name,
        "fold_s": pass_times["fxnorm"],
        "fuse_s": pass_times["fuse"],
        "fold/fuse": pass_times["fxnorm"] / pass_times["fuse"],
        "bn_total": bn_left(model),
        "bn_left_fuse": bn_left(fused),
        "bn_left_fxnorm": bn_left(folded),
    }
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        with torch.inference_mode():
            lat = interleaved({"eval": lambda: model(x), "fuse": lambda: fused(x), "fxnorm": lambda: folded(x)},
                              repeats, device, warmup=2)
            row[f"err_b{batch}"] = zoo.rel_err(folded(x), model(x))
        row[f"eval_ms_b{batch}"] = lat["eval"] * 1e3
        row[f"fuse_ms_b{batch}"] = lat["fuse"] * 1e3
        row[f"fxnorm_ms_b{batch}"] = lat["fxnorm"] * 1e3
        row[f"fxnorm/fuse_b{batch}"] = lat["fxnorm"] / lat["fuse"]
        row[f"fxnorm/eval_b{batch}"] = lat["fxnorm"] / lat["eval"]
    return row


def bench_detection(name: str, device: str, repeats: int) -> dict[str, Any]:
    """Fold pass of a part-by-part model against one eval forward of one image (the test input size)."""
    model = zoo.build(name).to(device)
    inputs = zoo.example_inputs(name, device=device)
    with torch.no_grad():
        model(*inputs)  # first forward: caches that decide what traces

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    times = interleaved({"eval": forward, "fold": lambda: fold(model),
                         "fold_inputs": lambda: fold(model, example_inputs=inputs)}, repeats, device)
    return {"model": name, "eval_s": times["eval"], "fold_s": times["fold"], "fold_inputs_s": times["fold_inputs"],
            "fold/eval": times["fold"] / times["eval"], "fold_inputs/eval": times["fold_inputs"] / times["eval"]}


def _part_errors(model: nn.Module, folded_fn: Callable[[nn.Module], nn.Module], inputs: tuple) -> tuple[nn.Module, float]:
    """Fold a partly traceable model in place; worst relative error of its traced parts on the inputs
    each received in a reference run (end-to-end outputs go through top-k/NMS)."""
    with torch.no_grad():
        model(*inputs)  # first forward: caches that decide what traces
    names = [g for g in report_of(trace(model), TraceReport).graphs if g]
    calls: dict[str, list] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, k, o, n=n: calls[n].append((a, k, o)) if len(calls[n]) < 4 else None, with_kwargs=True)
        for n in names]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    folded = folded_fn(model)
    worst = 0.0
    with torch.no_grad():
        for n, seen in calls.items():
            part = folded.get_submodule(n)
            for a, k, o in seen:
                worst = max(worst, zoo.rel_err(part(*a, **k), o))
    return folded, worst


def coverage_row(name: str, device: str) -> dict[str, Any]:
    model = zoo.randomize_dormant(zoo.build(name)).to(device)
    inputs = zoo.example_inputs(name, device=device)
    total = bn_left(model)
    try:
        left_fuse: Any = bn_left(fuse(model))
    except Exception as err:  # torch's fuse needs the whole model to trace
        left_fuse = f"{total} (fuse fails: {type(err).__name__})"
    t0 = time.perf_counter()
    if zoo.family_of(name) == "detection":
        folded, err = _part_errors(model, lambda m: fold(m, inplace=True, example_inputs=inputs), inputs)
    else:
        with torch.no_grad():
            ref = model(*inputs)
        folded = fold(model, inplace=True, example_inputs=inputs)
        with torch.no_grad():
            err = zoo.rel_err(folded(*inputs), ref)
    seconds = time.perf_counter() - t0
    report = report_of(folded, FoldReport)
    return {
        "model": name,
        "bn_total": total,
        "bn_left_fuse": left_fuse,
        "bn_left_fxnorm": bn_left(folded),
        "folded": len(report.folded),
        "untraced_parts": len(report.untraced),
        "rel_err": err,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help=f"torchvision model names (default {DEFAULT_MODELS}; "
                        "with --coverage: the whole zoo)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--size", type=int, default=224, help="image size for the latency runs")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--coverage", action="store_true", help="norms left over the torchvision zoo")
    parser.add_argument("--detection", action="store_true", help="fold pass of part-by-part models vs an eval forward")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU available")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    if args.detection:
        rows = [bench_detection(n, args.device, args.repeats) for n in args.models or DETECTION_MODELS]
        print(tabulate(rows, headers="keys", floatfmt=".3g"))
        result: dict[str, Any] = {"meta": meta, "rows": rows}
    elif args.coverage:
        names = args.models or [n for f in ("classification", "segmentation", "video", "detection")
                                for n in zoo.FAMILIES[f]]
        rows = []
        for name in names:
            rows.append(coverage_row(name, args.device))
            print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
        print(tabulate(rows, headers="keys", floatfmt=".2g"))
        total = sum(r["bn_total"] for r in rows)
        fuse_left = sum(r["bn_left_fuse"] if isinstance(r["bn_left_fuse"], int) else r["bn_total"] for r in rows)
        ours = sum(r["bn_left_fxnorm"] for r in rows)
        worst = max(rows, key=lambda r: r["rel_err"])
        summary = {"models": len(rows), "bn_total": total, "bn_left_fuse": fuse_left, "bn_left_fxnorm": ours,
                   "worst_rel_err": worst["rel_err"], "worst_model": worst["model"]}
        print()
        print(tabulate([summary], headers="keys", floatfmt=".2g"))
        result = {"meta": meta, "rows": rows, "summary": summary}
    else:
        rows = [bench_model(n, args.device, args.repeats, args.size, args.batches) for n in args.models or DEFAULT_MODELS]
        cols = ["model", "fold_s", "fuse_s", "fold/fuse", "bn_total", "bn_left_fuse", "bn_left_fxnorm"]
        print(tabulate([{k: r[k] for k in cols} for r in rows], headers="keys", floatfmt=".3g"))
        for batch in args.batches:
            keys = ["model", f"eval_ms_b{batch}", f"fuse_ms_b{batch}", f"fxnorm_ms_b{batch}",
                    f"fxnorm/fuse_b{batch}", f"fxnorm/eval_b{batch}", f"err_b{batch}"]
            print()
            print(tabulate([{k: r[k] for k in keys} for r in rows], headers="keys", floatfmt=".3g"))
        result = {"meta": meta, "rows": rows}
    print(f"\n{meta}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
