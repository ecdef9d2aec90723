"""Recalibration throughput and accuracy, side by side in one run: fxnorm.recalibrate vs. a plain
eval forward over the same batches vs. ``torch.optim.swa_utils.update_bn`` (and fvcore's
``update_bn_stats`` when fvcore is installed).

Throughput is images per second over the whole call (hooks and the write-back included for fxnorm).
The statistics error of each method is measured against float64 statistics computed directly from
the inputs every norm receives (captured with the norms in training mode and every other module in
eval mode), and fxnorm's also against the inputs its norms received in its own run, on an
unshuffled loader: the batches drift (batch ``i`` is offset by
``0.1 * i``) and the last batch is short. Peak memory is the peak of the tensor memory allocated
during each call (the PyTorch profiler's allocation records on a CPU, the allocator's peak on a GPU).

Usage::

    python examples/benchmarks/bench_recalibrate.py --threads 1     # resnet18 and resnet50, CPU
    python examples/benchmarks/bench_recalibrate.py --threads 1 --heaps fresh    # skip the warm-heap timing
    python examples/benchmarks/bench_recalibrate.py --models resnet18 --size 112 --batches 16 --rounds 5
    python examples/benchmarks/bench_recalibrate.py --device cuda
    python examples/benchmarks/bench_recalibrate.py --json examples/benchmarks/results/recalibrate.json

Ratios are medians over ``--rounds`` rounds; in each round every method runs once, in a rotating
order, so that machine noise hits them alike. Every method keeps its own copy of the model across the
rounds (all equally warm in the caches: a freshly copied model runs its first pass ~4% slower); the
result of a recalibration does not depend on the statistics it starts from.

How the C allocator serves the large activations moves every method's time by up to 30% on a CPU, so
each model is measured in its own fresh process, twice (``--heaps``):

- ``fresh``: glibc's defaults, as in a script that loads a model and recalibrates it. Blocks above
  glibc's mmap threshold are new pages at every allocation, and the page faults are a large part of
  the time (writing a norm's output over its input saves them).
- ``warm``: glibc keeps freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), as in a
  long-running process that has served tensors of these sizes before (another model ran first): no
  page faults, and every method is faster. Timing only (the statistics do not depend on the heap).

``--in-process`` runs everything in this process instead (the heap is then whatever the models before
left behind).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate
from torch.optim.swa_utils import update_bn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import fxnorm.calibration.recalibration as calibrate  # noqa: E402
from fxnorm.calibration.selection import stat_norms  # noqa: E402


COLUMNS = """columns: img_s = images per second (wall clock); throughput_vs_eval = the method's throughput over a
plain eval forward's on the same batches; cpu_time_vs_eval = the same with process CPU time (robust on a busy
machine); fxnorm_speedup / fxnorm_cpu_speedup = fxnorm's throughput over the method's; mean_err_over_std,
var_rel_err = worst channel of any norm against float64 statistics of the inputs each norm receives in a
reference forward (norms in training mode, every other module in eval mode; deep random networks amplify
float32 rounding between two forwards by ~1e-6); own_inputs_var_rel_err = fxnorm against the inputs its
own norms received in its run (the estimator's error alone); columns without a suffix are on the unshuffled
(drifting) loader, "_shuffled" on the same images shuffled;
peak_mb = peak tensor memory allocated during the call (CPU: PyTorch profiler's allocation records; CUDA:
allocator peak); the speed columns are measured in a fresh process with glibc's default heap, and again with a
warm heap (suffix "_warm_heap": glibc keeps freed memory, see the script's docstring)"""


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so no statistic starts right by chance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in stat_norms(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model


def make_batches(n: int, batch: int, size: int, device: str) -> list[torch.Tensor]:
    """Unshuffled batches: batch ``i`` is offset by ``0.1 * i`` (a drifting stream), the last one short."""
    gen = torch.Generator().manual_seed(1)
    sizes = [batch] * (n - 1) + [max(2, batch // 4)]
    return [(torch.randn(b, 3, size, size, generator=gen) + 0.1 * i).to(device) for i, b in enumerate(sizes)]


def shuffled(batches: list[torch.Tensor], seed: int = 2) -> list[torch.Tensor]:
    """The same images in a random order, cut into batches of the same sizes (a shuffled loader)."""
    images = torch.cat(batches)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed)).to(images.device)
    return list(images[order].split([b.shape[0] for b in batches]))


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, ...) as float64 ``(C, N * ...)`` on the CPU: one row of values per channel."""
    return x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).cpu()


class Float64Moments:
    """Per-channel count, mean and centred sum of squares of every value added, in float64: each
    batch's rows in float64 with two passes, merged exactly (Chan et al.). One batch at a time in
    memory (keeping every float64 input of resnet50 would take ~10 GB)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        n = rows.shape[1]
        mean = rows.mean(1)
        m2 = (rows - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance."""
        return self.mean, self.m2 / (self.count - 1)


def capture_moments(named: list[tuple[str, nn.Module]]) -> tuple[dict[str, Float64Moments], list[Any]]:
    """Forward pre-hooks adding every input of the ``named`` norms to a :class:`Float64Moments`
    each; returns those and the hook handles."""
    found = {name: Float64Moments() for name, _ in named}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: found[name].add(channel_rows(args[0])))
               for name, m in named]
    return found, handles


def reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 mean and unbiased variance of every norm's input over all batches."""
    ref = copy.deepcopy(model).eval()
    for _, m in stat_norms(ref):
        m.train()
    found, _ = capture_moments(stat_norms(ref))
    with torch.no_grad():
        for b in batches:
            ref(b)
    return {name: f.result() for name, f in found.items() if f.count}


def stats_error(model: nn.Module, ref: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Max over norms and channels of |mean error| / std and |var error| / var."""
    mean_err = var_err = 0.0
    for name, m in stat_norms(model):
        mean, var = ref[name]
        mean_err = max(mean_err, ((m.running_mean.double().cpu() - mean).abs() / var.sqrt()).max().item())
        var_err = max(var_err, ((m.running_var.double().cpu() - var).abs() / var).max().item())
    return mean_err, var_err


def estimator_error(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """fxnorm's error against float64 statistics of the inputs its norms received in the same run
    (captured by forward pre-hooks on the norms: the calibration runs the model itself)."""
    found, handles = capture_moments(stat_norms(model))
    try:
        calibrate.recalibrate(model, batches)
    finally:
        for h in handles:
            h.remove()
    return stats_error(model, {name: f.result() for name, f in found.items() if f.count})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def methods(batches: list[torch.Tensor]) -> dict[str, Callable[[nn.Module], None]]:
    def eval_forward(model: nn.Module) -> None:
        model.eval()
        with torch.inference_mode():
            for b in batches:
                model(b)

    def fxnorm_recalibrate(model: nn.Module) -> None:
        calibrate.recalibrate(model, batches)

    def torch_update_bn(model: nn.Module) -> None:
        update_bn(batches, model)  # resets the statistics, momentum=None, model.train()

    found: dict[str, Callable[[nn.Module], None]] = {
        "eval forward": eval_forward,
        "fxnorm.recalibrate": fxnorm_recalibrate,
        "swa_utils.update_bn": torch_update_bn,
    }
    try:
        from fvcore.nn.precise_bn import update_bn_stats
    except ImportError:
        pass
    else:
        def fvcore_update(model: nn.Module) -> None:
            model.train()
            update_bn_stats(model, batches, num_iters=len(batches))
            model.eval()

        found["fvcore update_bn_stats"] = fvcore_update
    return found


def peak_memory_mb(f: Callable[[nn.Module], None], model: nn.Module, device: str) -> float:
    """Peak of the tensor memory allocated while ``f(model)`` runs, above what was allocated before:
    the CUDA allocator's peak on a GPU; on a CPU, the running sum of the allocations and frees the
    PyTorch profiler records (``profile_memory=True``) in time order (approximate: an op's
    allocations count at its start)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        f(model)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f(model)
    # allocations are recorded on the op that made them (its self memory), frees outside ops as
    # "[memory]" events: their running sum in time order is the allocated tensor memory
    steps = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                   for e in prof.events())
    current = peak = 0
    for _, delta in steps:
        current += delta
        peak = max(peak, current)
    return peak / 2**20


#: glibc malloc settings of the ``warm`` heap: freed blocks up to 32 MB are kept for reuse instead of
#: being unmapped, and the heap is never trimmed (other C libraries ignore these variables)
WARM_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
HEAPS = ("fresh", "warm")


def run(name: str, args: argparse.Namespace, measure_errors: bool = True) -> list[dict[str, Any]]:
    """Time every method on ``name`` (and, with ``measure_errors``, measure their statistics errors); print and
    return one row per method."""
    torch.manual_seed(0)
    base = randomize_norms(getattr(torchvision.models, name)(weights=None).eval()).to(args.device)
    batches = make_batches(args.batches, args.batch_size, args.size, args.device)
    images = sum(b.shape[0] for b in batches)
    todo = methods(batches)
    keys = list(todo)
    times: dict[str, list[float]] = {k: [] for k in todo}
    cpu: dict[str, list[float]] = {k: [] for k in todo}
    errors: dict[str, tuple[float, float]] = {}
    models = {k: copy.deepcopy(base) for k in todo}
    memory = {k: peak_memory_mb(f, copy.deepcopy(base), args.device) for k, f in todo.items()}  # also a warm-up
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            model = models[k]
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            todo[k](model)
            sync(args.device)
            times[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
    wall = {k: statistics.median(v) for k, v in times.items()}
    work = {k: statistics.median(v) for k, v in cpu.items()}
    ev, fx = "eval forward", "fxnorm.recalibrate"
    mixed_errors: dict[str, tuple[float, float]] = {}
    own = own_mixed = (None, None)
    if measure_errors:
        # errors after the timing: the float64 captures of the reference allocate (and free) gigabytes,
        # which changes how the allocator serves the timed forwards afterwards
        ref = reference(base, batches)
        for k in keys:
            if k != ev:  # recalibration does not depend on the statistics it starts from
                errors[k] = stats_error(models[k], ref)
        own = estimator_error(copy.deepcopy(base), batches)
        mixed = shuffled(batches)
        mixed_ref = reference(base, mixed)
        for k in keys:
            if k != ev:
                model = copy.deepcopy(base)
                methods(mixed)[k](model)
                mixed_errors[k] = stats_error(model, mixed_ref)
        own_mixed = estimator_error(copy.deepcopy(base), mixed)
    rows = []
    for k in keys:
        mean_err, var_err = errors.get(k, (None, None))
        mixed_mean_err, mixed_var_err = mixed_errors.get(k, (None, None))
        rows.append({
            "model": name, "method": k, "img_s": round(images / wall[k], 2),
            "throughput_vs_eval": round(wall[ev] / wall[k], 3), "cpu_time_vs_eval": round(work[ev] / work[k], 3),
            "fxnorm_speedup": round(wall[k] / wall[fx], 3), "fxnorm_cpu_speedup": round(work[k] / work[fx], 3),
            "mean_err_over_std": mean_err, "var_rel_err": var_err,
            "own_inputs_var_rel_err": own[1] if k == fx else None,
            "mean_err_over_std_shuffled": mixed_mean_err, "var_rel_err_shuffled": mixed_var_err,
            "own_inputs_var_rel_err_shuffled": own_mixed[1] if k == fx else None,
            "peak_mb": round(memory[k], 1),
        })
    shape = f"{args.batch_size}x3x{args.size}x{args.size}"
    heap = getattr(args, "heap", None)
    print(f"\n{name}: {len(batches)} batches of {shape} (last {batches[-1].shape[0]}), "
          f"{images} images, device {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds"
          + (f", {heap} heap" if heap else ""))
    speed = ("method", "img_s", "throughput_vs_eval", "cpu_time_vs_eval", "fxnorm_speedup", "fxnorm_cpu_speedup", "peak_mb")
    print(tabulate([{k: r[k] for k in speed} for r in rows], headers="keys", floatfmt=".3g"))
    if measure_errors:
        print(tabulate([{k: v for k, v in r.items() if k == "method" or k not in speed and k != "model"}
                        for r in rows], headers="keys", floatfmt=".2g"))
    return rows


def run_isolated(name: str, args: argparse.Namespace, heap: str) -> list[dict[str, Any]]:
    """:func:`run` in a fresh Python process with the given heap (see the module docstring); the
    ``warm`` heap is timed only."""
    env = {k: v for k, v in os.environ.items() if k not in WARM_HEAP_ENV}
    if heap == "warm":
        env.update(WARM_HEAP_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", heap, "--models", name,
               "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--size", str(args.size),
               "--rounds", str(args.rounds), "--device", args.device, "--threads", str(args.threads), "--json", out]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as fh:
            return json.load(fh)["rows"]


def merge_heaps(fresh: list[dict[str, Any]], warm: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fresh-heap rows with the warm-heap timings added as ``*_warm_heap`` columns."""
    by_method = {r["method"]: r for r in warm}
    for r in fresh:
        w = by_method[r["method"]]
        for key in ("img_s", "throughput_vs_eval", "cpu_time_vs_eval", "fxnorm_speedup"):
            r[f"{key}_warm_heap"] = w[key]
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image size (224: the models' own resolution)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--heaps", nargs="+", choices=HEAPS, default=list(HEAPS),
                        help="measure each model in a fresh process with these heaps (see the docstring)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every model in this process (no fresh process, no heap settings)")
    parser.add_argument("--worker", choices=HEAPS, help=argparse.SUPPRESS)  # one model, one heap: a child
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU available")
    if args.worker:
        args.heap = args.worker
        rows = run(args.models[0], args, measure_errors=args.worker == "fresh")
    elif args.in_process:
        rows = [row for name in args.models for row in run(name, args)]
    else:
        if "fresh" not in args.heaps:
            parser.error("--heaps: the fresh heap is needed (the statistics errors are measured there)")
        if args.device.startswith("cuda"):  # the C heap does not serve GPU tensors
            args.heaps = ["fresh"]
        rows = []
        for name in args.models:
            fresh = run_isolated(name, args, "fresh")
            rows += merge_heaps(fresh, run_isolated(name, args, "warm")) if "warm" in args.heaps else fresh
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "batches": args.batches, "batch_size": args.batch_size, "size": args.size, "rounds": args.rounds,
            "fvcore": any(r["method"].startswith("fvcore") for r in rows),
            "heaps": [args.worker] if args.worker else [] if args.in_process else list(args.heaps)}
    if not args.worker:
        for name in dict.fromkeys(r["model"] for r in rows):
            fx = next(r for r in rows if r["model"] == name and r["method"] == "fxnorm.recalibrate")
            heaps = ", ".join(f"{fx[key]:.3f} ({label})" for key, label in (
                ("throughput_vs_eval", "fresh heap" if meta["heaps"] else "this process"),
                ("throughput_vs_eval_warm_heap", "warm heap")) if key in fx)
            print(f"{name}: fxnorm.recalibrate throughput over a plain eval forward's: {heaps}")
        print(COLUMNS)
        print(meta)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
