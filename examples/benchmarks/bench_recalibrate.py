"""Recalibration throughput and accuracy, side by side in one run: fxnorm.recalibrate vs. a plain
eval forward over the same batches vs. ``torch.optim.swa_utils.update_bn`` (and fvcore's
``update_bn_stats`` when fvcore is installed).

Throughput is images per second over the whole call (tracing, hooks and the write-back included
for fxnorm). The statistics error of each method is measured against float64 statistics computed
directly from the inputs every norm receives (captured with the norms in training mode and every
other module in eval mode) on an unshuffled loader: the batches drift (batch ``i`` is offset by
``0.1 * i``) and the last batch is short.

Usage::

    python examples/benchmarks/bench_recalibrate.py                 # resnet18 and resnet50, CPU
    python examples/benchmarks/bench_recalibrate.py --models resnet18 --size 96 --batches 6 --rounds 5
    python examples/benchmarks/bench_recalibrate.py --device cuda

Ratios are medians over ``--rounds`` rounds; in each round every method runs once, in a rotating
order, so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torchvision
from torch.optim.swa_utils import update_bn

import fxnorm.calibrate as calibrate
from fxnorm.select import stat_norms


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
    gen = torch.Generator().manual_seed(1)
    sizes = [batch] * (n - 1) + [max(2, batch // 4)]  # unshuffled and drifting, with a short last batch
    return [(torch.randn(b, 3, size, size, generator=gen) + 0.1 * i).to(device) for i, b in enumerate(sizes)]


def reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 mean and unbiased variance of every norm's input over all batches."""
    ref = copy.deepcopy(model).eval()
    captured: dict[str, list[torch.Tensor]] = {}
    for name, m in stat_norms(ref):
        m.train()
        captured[name] = []
        m.register_forward_pre_hook(lambda mod, args, name=name: captured[name].append(
            args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1).cpu()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    return {name: (torch.cat(xs, 1).mean(1), torch.cat(xs, 1).var(1)) for name, xs in captured.items() if xs}


def stats_error(model: nn.Module, ref: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Max over norms and channels of |mean error| / std and |var error| / var."""
    mean_err = var_err = 0.0
    for name, m in stat_norms(model):
        mean, var = ref[name]
        mean_err = max(mean_err, ((m.running_mean.double().cpu() - mean).abs() / var.sqrt()).max().item())
        var_err = max(var_err, ((m.running_var.double().cpu() - var).abs() / var).max().item())
    return mean_err, var_err


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


def run(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = randomize_norms(getattr(torchvision.models, name)(weights=None).eval()).to(args.device)
    batches = make_batches(args.batches, args.batch_size, args.size, args.device)
    images = sum(b.shape[0] for b in batches)
    ref = reference(base, batches)
    todo = methods(batches)
    times: dict[str, list[float]] = {k: [] for k in todo}
    cpu: dict[str, list[float]] = {k: [] for k in todo}
    errors: dict[str, tuple[float, float]] = {}
    models = {k: copy.deepcopy(base) for k in todo}
    for f in todo.values():  # warm-up (allocator, mkldnn primitives)
        f(copy.deepcopy(base))
    keys = list(todo)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            model = models[k]
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            todo[k](model)
            sync(args.device)
            times[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
            if k != "eval forward":
                errors[k] = stats_error(model, ref)
                models[k] = copy.deepcopy(base)
    print(f"\n{name}: {len(batches)} batches of {args.batch_size}x3x{args.size}x{args.size} (last {batches[-1].shape[0]}), "
          f"{images} images, device {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    wall = {k: statistics.median(v) for k, v in times.items()}
    work = {k: statistics.median(v) for k, v in cpu.items()}
    ev, fx = "eval forward", "fxnorm.recalibrate"
    print(f"{'method':24} {'img/s':>8} {'vs eval':>8} {'fxnorm/it':>10} {'cpu vs eval':>12} {'fxnorm/it':>10}"
          f" {'mean err/std':>13} {'var rel err':>12}")
    for k in keys:
        mean_err, var_err = errors.get(k, (float("nan"), float("nan")))
        print(f"{k:24} {images / wall[k]:8.1f} {wall[ev] / wall[k]:8.3f} {wall[k] / wall[fx]:10.3f} "
              f"{work[ev] / work[k]:12.3f} {work[k] / work[fx]:10.3f} {mean_err:13.2e} {var_err:12.2e}")
    print("img/s and 'vs eval' (throughput relative to the eval forward): wall clock; 'fxnorm/it': fxnorm's "
          "throughput relative to the method's; 'cpu' columns: the same with process CPU time (robust on a busy machine)")
    if "fvcore update_bn_stats" not in todo:
        print("(fvcore is not installed: its precise-BN estimator is not compared)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args)


if __name__ == "__main__":
    main()
