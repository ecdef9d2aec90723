"""Every GPU check in one run: the ``cuda`` tests and the fold/recalibration benchmarks on a device.

Made for a borrowed GPU machine with a small time budget: each step runs in its own process with a
time limit, its output goes to ``OUT/<step>.log``, and ``OUT/summary.json`` (written after every
step, so a cut-off run still leaves one) holds the device, the exit status and time of each step
and, for the benchmarks, their JSON rows. ``OUT/summary.md`` renders the same as tables.

Steps:

* ``tests``: ``python -m pytest -m cuda -q`` (fold of the torchvision zoo on CUDA in fp32, fp16,
  bf16 and channels_last; recalibration against float64 on the norms' own inputs; export of a
  folded CUDA model);
* ``fold``: ``bench_fold.py --device DEVICE`` on resnet18 and resnet50 (fold pass vs torch ``fuse``,
  latency of fxnorm-folded vs torch-fused vs eval at batch 1 and 16);
* ``recalibrate``: ``bench_recalibrate.py --device DEVICE`` on resnet18 and resnet50 (vs
  ``update_bn`` and an eval forward, peak memory from ``torch.cuda.max_memory_allocated``).

``--device cpu --quick`` is the dry run that checks this script where there is no GPU (the ``cuda``
tests then skip, the benchmarks run small).

Example:
    python examples/benchmarks/device_checks.py --device cuda --out "$OUT"       # on the GPU machine
    python examples/benchmarks/device_checks.py --device cpu --quick --out /tmp/dry
    python examples/benchmarks/device_checks.py --device cuda --plan             # print the commands
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = ("tests", "fold", "recalibrate")


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int
    json: str | None = None  #: the benchmark's JSON output, read into the summary


def plan(device: str, out: str, quick: bool, only: tuple[str, ...] = STEPS) -> list[Step]:
    """The steps to run, in order (``quick``: small sizes for a dry run).

    Example:
        >>> [s.name for s in plan("cuda", "/tmp/out", quick=False)]
        ['tests', 'fold', 'recalibrate']
    """
    py = sys.executable
    bench = os.path.join(ROOT, "examples", "benchmarks")
    fold = [py, os.path.join(bench, "bench_fold.py"), "--device", device, "--models", "resnet18", "resnet50",
            "--json", os.path.join(out, "fold.json")]
    recal = [py, os.path.join(bench, "bench_recalibrate.py"), "--device", device, "--models", "resnet18", "resnet50",
             "--json", os.path.join(out, "recalibrate.json")]
    if quick:
        fold += ["--repeats", "2", "--size", "64", "--batches", "1"]
        recal += ["--batches", "2", "--batch-size", "4", "--size", "64", "--rounds", "1", "--heaps", "fresh"]
    steps = [
        Step("tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"],
             timeout=240 if not quick else 600),
        Step("fold", fold, timeout=150, json=os.path.join(out, "fold.json")),
        Step("recalibrate", recal, timeout=150, json=os.path.join(out, "recalibrate.json")),
    ]
    return [s for s in steps if s.name in only]


def device_info(device: str) -> dict[str, Any]:
    """torch's version and the device's name."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def run_step(step: Step, out: str) -> dict[str, Any]:
    """Run one step with its time limit; its output goes to ``OUT/<name>.log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(os.path.join(out, f"{step.name}.log"), "w") as log:
        try:
            rc = subprocess.run(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=step.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    result: dict[str, Any] = {"rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    if step.json and os.path.exists(step.json):
        with open(step.json) as fh:
            result["rows"] = json.load(fh).get("rows")
    with open(os.path.join(out, f"{step.name}.log")) as fh:
        result["tail"] = fh.read()[-1500:]
    return result


def render(summary: dict[str, Any]) -> str:
    """``summary.md``: the device, each step's status, and the benchmark rows as tables."""
    from tabulate import tabulate

    lines = [f"# Device checks on {summary['info'].get('gpu', summary['info']['device'])}", "",
             f"torch {summary['info']['torch']}, python {summary['info']['python']}", ""]
    lines += [tabulate([[n, s["rc"], s["seconds"]] for n, s in summary["steps"].items()],
                       headers=["step", "exit", "seconds"], tablefmt="github"), ""]
    for name, step in summary["steps"].items():
        rows = step.get("rows")
        if rows:
            keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
            lines += [f"## {name}", "", tabulate([[r.get(k) for k in keys] for r in rows], headers=keys,
                                                  tablefmt="github", floatfmt=".3g"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "device-checks"), help="results folder ($OUT)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--plan", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    steps = plan(args.device, args.out, args.quick, tuple(args.only))
    if args.plan:
        for step in steps:
            print(f"{step.name} (limit {step.timeout} s): {' '.join(step.argv)}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --quick for a dry run)")
    os.makedirs(args.out, exist_ok=True)
    summary: dict[str, Any] = {"info": device_info(args.device), "steps": {}}
    for step in steps:
        print(f"== {step.name}", flush=True)
        summary["steps"][step.name] = result = run_step(step, args.out)
        print(f"   exit {result['rc']} in {result['seconds']} s", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(render(summary))
    return max((s["rc"] for s in summary["steps"].values()), default=0) and 1


if __name__ == "__main__":
    raise SystemExit(main())
