"""Recalibration at scale, side by side in one run:

1. **Processes**: the same batches recalibrated by 1 process and by 2 processes (``torch.distributed``
   with gloo on the CPU, each process ``--threads`` intra-op threads and every 2nd batch, as
   ``torchrun ... -m fxnorm recalibrate`` does), images per second and the speed-up. The time runs
   from a barrier after every process has built its model to the end of ``recalibrate`` on the last
   process (the vote and the all-reduce included; process start-up and imports excluded). Both runs
   end with the same statistics (checked: the largest relative difference of any running variance).
2. **Order**: ``order="sequential"`` beside the default one pass (``"joint"``) on the same model and
   batches: passes over the data, seconds (median over ``--rounds``), the ratio.

Usage::

    python examples/benchmarks/bench_scale.py --threads 1 --json examples/benchmarks/results/scale.json
    python examples/benchmarks/bench_scale.py --batches 4 --batch-size 4 --size 32 --rounds 1   # quick

Two processes can only be faster when the machine has two idle cores for them: the JSON records
``os.cpu_count()`` and the load average at the start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import fxnorm  # noqa: E402

COLUMNS = """columns: processes = recalibrating processes (gloo on the CPU, every process its every N-th batch);
seconds = from a barrier after the models were built to the end of recalibrate on every process; img_s =
images per second; speedup = img_s over one process's; max_var_rel_diff = the largest relative difference of
any running variance from one process's result (float32 noise: the sums are added in another order).
order = recalibrate's order; passes = passes over the data; img_s = images recalibrated per second (each counted
once); vs_joint = seconds over the joint order's"""


def make_batches(batches: int, batch_size: int, size: int) -> list[torch.Tensor]:
    """``batches`` deterministic random batches of ``batch_size`` images ``3 x size x size``."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, size, size, generator=gen) for _ in range(batches)]


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def _rank(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    """One process of a run on ``world`` processes: its every ``world``-th batch, timed between barriers."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", fxnorm.CalibrationWarning)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        net = model(args.model)
        data = make_batches(args.batches, args.batch_size, args.size)
        fxnorm.recalibrate(net, data[:1], all_reduce=False)  # warm-up (kernels, allocator), not pooled
        mine = data[rank::world]
        dist.barrier()
        start = time.perf_counter()
        fxnorm.recalibrate(net, mine)
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            torch.save({"seconds": seconds, "state": net.state_dict()}, os.path.join(folder, "result.pt"))
    finally:
        dist.destroy_process_group()


def processes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """1 process, then 2, on the same batches (each in fresh spawned processes)."""
    rows: list[dict[str, Any]] = []
    reference: dict[str, torch.Tensor] | None = None
    images = args.batches * args.batch_size
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(_rank, args=(world, folder, args), nprocs=world, start_method="spawn")
            result = torch.load(os.path.join(folder, "result.pt"), weights_only=True)
        state = result["state"]
        reference = reference or state
        diff = max(((state[k].double() - reference[k].double()).abs() / reference[k].double().abs()).max().item()
                   for k in state if k.endswith("running_var"))
        rows.append({"model": args.model, "processes": world, "seconds": result["seconds"],
                     "img_s": images / result["seconds"], "max_var_rel_diff": diff})
    for row in rows:
        row["speedup"] = row["img_s"] / rows[0]["img_s"]
    return rows


def orders(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The joint and the sequential order on the same model and batches, in alternation."""
    torch.set_num_threads(args.threads)
    data = make_batches(args.batches, args.batch_size, args.size)
    nets = {order: model(args.model) for order in ("joint", "sequential")}
    times: dict[str, list[float]] = {order: [] for order in nets}
    passes: dict[str, int] = {}
    fxnorm.recalibrate(nets["joint"], data[:1])  # warm-up
    for _ in range(args.rounds):
        for order, net in nets.items():
            start = time.perf_counter()
            fxnorm.recalibrate(net, data, order=order)  # type: ignore[arg-type]
            times[order].append(time.perf_counter() - start)
            passes[order] = fxnorm.report_of(net, fxnorm.CalibrationReport).passes
    joint = statistics.median(times["joint"])
    return [{"model": args.model, "order": order, "passes": passes[order], "seconds": statistics.median(times[order]),
             "img_s": args.batches * args.batch_size / statistics.median(times[order]),
             "vs_joint": statistics.median(times[order]) / joint} for order in nets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the order comparison (median)")
    parser.add_argument("--json", help="write the results there")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", fxnorm.CalibrationWarning)
    print(f"{args.model}: {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.2f}", flush=True)
    load = os.getloadavg()[0]
    by_processes = processes(args)
    print(tabulate(by_processes, headers="keys", floatfmt=".3g"), flush=True)
    by_order = orders(args)
    print(tabulate(by_order, headers="keys", floatfmt=".3g"))
    print(COLUMNS)
    if args.json:
        config = {k: getattr(args, k) for k in ("model", "batches", "batch_size", "size", "threads", "rounds")}
        with open(args.json, "w") as f:
            json.dump({"config": {**config, "cpus": os.cpu_count(), "load": round(load, 2)},
                       "processes": by_processes, "orders": by_order}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":  # spawned processes import this file: nothing runs then
    sys.exit(main())
