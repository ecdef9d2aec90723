"""What ``fxnorm recalibrate`` and ``fxnorm reset`` do once their arguments are parsed: the commands
that change a model's norm statistics and save it.

``recalibrate`` checks its data options before loading anything (``--mean``/``--std`` take one value
for every channel or three, and apply to image folders only), reads the data before the model, and
treats norms it could not update (never reached, one value per channel, unsupported) as a failure
unless ``--allow-partial``.

Example:
    >>> from fxnorm.calibration.report import CalibrationReport
    >>> not_recalibrated(CalibrationReport([], ["head.bn"], {}, 1, 4, unsupported={"x": "why"}))
    [('head.bn', 'the forward never reached it on this data'), ('x', 'why')]
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

import torch

from ..calibration.report import CalibrationReport
from ..errors import CalibrationWarning, DataError, UsageError
from ..reports import report_of
from .console import EXIT_FAILURE, EXIT_OK, Console
from .outputs import write_outputs
from .preflight import load, preflight

__all__ = ["run_recalibrate", "run_reset", "not_recalibrated", "check_data_options"]

_ONE_VALUE = ("every batch gave it one value per channel (batch size 1, or a 1x1 feature map), so it has no "
              "variance to measure: use a larger --batch-size")


def not_recalibrated(report: CalibrationReport) -> list[tuple[str, str]]:
    """The selected norms whose statistics were not updated, each with why."""
    found = [(name, "the forward never reached it on this data") for name in report.unreached]
    found += [(name, _ONE_VALUE) for name in report.unusable]
    return found + list(report.unsupported.items())


def check_data_options(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--data`` exists, and ``--mean``/``--std``/``--image-size`` apply to it and are valid
    (:class:`~fxnorm.errors.UsageError` otherwise). Returns the per-channel mean and std (None: ImageNet's)."""
    from .images import per_channel

    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or folder (give a folder of images or a .pt file)")
    if not os.path.isdir(args.data):
        given = [flag for flag, value in (("--mean", args.mean), ("--std", args.std), ("--image-size", args.image_size))
                 if value is not None]
        if given:
            raise UsageError(f"{'/'.join(given)} apply to a folder of images; the tensors in {args.data} are used "
                             "as they are (normalize them before saving)")
    try:
        return (per_channel(args.mean, "--mean") if args.mean is not None else None,
                per_channel(args.std, "--std") if args.std is not None else None)
    except DataError as err:
        raise UsageError(str(err)) from None


def _select(args: argparse.Namespace) -> Any:
    if not args.select:
        return None
    return args.select[0] if len(args.select) == 1 else list(args.select)


def _print_recalibration(console: Console, args: argparse.Namespace, report: CalibrationReport) -> None:
    from tabulate import tabulate

    rows = [[s.name, s.kind, s.batches, f"{s.mean_shift:.3g}", f"{s.var_ratio:.3g}"] for s in report.moved_most(args.top)]
    passes = f" ({report.passes} passes, one per level)" if report.passes > 1 else ""
    console.out(f"recalibrated {len(report.layers)} norm(s) on {report.num_batches} batch(es), "
                f"{report.num_samples} sample(s){passes}")
    if rows:
        console.out("statistics that moved most (mean shift in old standard deviations; |log var ratio|):")
        console.out(tabulate(rows, headers=["norm", "kind", "batches", "mean shift", "var change"],
                             tablefmt=args.tablefmt))
    for label, names in (("not reached by the forward", report.unreached), ("unusable", report.unusable)):
        if names:
            console.out(f"{len(names)} norm(s) {label} (left as they were): {', '.join(names[:10])}"
                        + (", ..." if len(names) > 10 else ""))
    for norm, why in report.unsupported.items():
        console.out(f"not recalibrated: {norm}: {why}")


def _warn_partial(console: Console, report: CalibrationReport) -> list[tuple[str, str]]:
    """Name on stderr every norm that was not updated (and those that skipped some batches)."""
    missed = not_recalibrated(report)
    for name, why in missed:
        console.warn(f"norm {name} was not recalibrated: {why}")
    for name, count in report.skipped_batches.items():
        if name not in report.unusable:
            console.warn(f"norm {name}: {count} call(s) gave one value per channel and were left out of its "
                         "statistics")
    return missed


def run_recalibrate(args: argparse.Namespace, console: Console) -> int:
    """``fxnorm recalibrate``; under ``torchrun`` every process runs its share of the batches
    (:mod:`fxnorm.cli.launch`), and rank 0 alone prints the report and writes the output."""
    from .images import IMAGENET_MEAN, IMAGENET_STD, calibration_data
    from .launch import process_group

    mean, std = check_data_options(args)
    device = preflight(args, {"-o": args.output})
    data = calibration_data(args.data, batch_size=args.batch_size, image_size=args.image_size or 224,
                            mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
    with process_group(device) as (launch, device):
        if launch is not None and launch.rank > 0:  # rank 0 speaks for all: the same pooled report
            console.quiet, console.reports = True, False
            warnings.filterwarnings("ignore", category=CalibrationWarning)
        return _recalibrate(args, console, data, device, launch)


def _recalibrate(args: argparse.Namespace, console: Console, data: Any, device: torch.device, launch: Any) -> int:
    from ..calibration.recalibration import recalibrate
    from .launch import ShardedBatches, on_rank_zero

    model, _ = load(args, console, device)
    num_batches = args.num_batches
    if launch is None:
        console.log(f"recalibrating on {args.data} ({len(data)} batch(es) available)")
    else:
        data, num_batches = ShardedBatches(data, launch.rank, launch.world, args.num_batches), None
        console.log(f"recalibrating on {args.data} in {launch.world} processes (process 0: {len(data)} batch(es))")
    model = recalibrate(model, data, num_batches=num_batches, device=device, progress=console.progress,
                        select=_select(args), order=args.order)
    report = report_of(model, CalibrationReport)
    missed = _warn_partial(console, report)
    payload = {"model": args.model, "output": args.output, "calibration": report.to_dict()}
    if missed and not args.allow_partial:
        if args.format != "json":
            _print_recalibration(console, args, report)
        names = ", ".join(name for name, _ in missed[:5]) + (", ..." if len(missed) > 5 else "")
        return console.fail(f"{len(missed)} norm(s) could not be recalibrated ({names}); nothing was saved: pass "
                            "--allow-partial to save the model with them left as they were", EXIT_FAILURE,
                            report={**payload, "output": None})

    def save() -> None:
        console.saved += write_outputs([(args.output, lambda tmp: torch.save(model, tmp))])

    on_rank_zero(launch, save)
    console.log(f"saved {args.output}")
    if args.format == "json":
        console.json(payload)
        return EXIT_OK
    _print_recalibration(console, args, report)
    console.out(f"saved {args.output}")
    return EXIT_OK


def run_reset(args: argparse.Namespace, console: Console) -> int:
    from ..calibration.recalibration import reset
    from ..calibration.report import ResetReport

    device = preflight(args, {"-o": args.output})
    model, _ = load(args, console, device)
    model = reset(model, select=_select(args))
    names = report_of(model, ResetReport).names
    console.saved += write_outputs([(args.output, lambda tmp: torch.save(model, tmp))])
    console.log(f"saved {args.output}")
    if args.format == "json":
        console.json({"model": args.model, "output": args.output, "reset": list(names)})
        return EXIT_OK
    console.out(f"reset the running statistics of {len(names)} norm(s):")
    for n in names:
        console.out(f"  {n}")
    console.out(f"saved {args.output}")
    return EXIT_OK
