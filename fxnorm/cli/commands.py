"""What each ``fxnorm`` subcommand does once its arguments are parsed: ``inspect``, ``fold``,
``recalibrate`` and ``reset`` (``run_*``), with the loading, checking and printing they share.

Example:
    >>> import argparse
    >>> EXPORTERS["export"].help
    'also save a torch.export program of the folded model (.pt2)'
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import FxNormError, MissingExtraError, UsageError
from ..graph.tracing import trace, traced_report
from ..inspection.render import format_summary, format_table, format_untraced, report_dict, summarize
from ..inspection.sites import find_norms
from ..reports import report_of
from .console import EXIT_FAILURE, EXIT_OK, Console
from .loading import default_input_shape, example_inputs, load_model, load_weights, save_model

__all__ = ["EXPORTERS", "relative_error", "run_inspect", "run_fold", "run_recalibrate", "run_reset"]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:0...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_output(path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {path}: directory {folder} does not exist")


def _load(args: argparse.Namespace, console: Console) -> tuple[nn.Module, str, torch.device]:
    device = _device(args.device)
    _check_output(getattr(args, "output", None))
    console.log(f"loading {args.model}")
    model, name = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
        console.log(f"loaded weights from {args.weights}")
    model = model.to(device).eval()
    return model, name, device


def _inputs(model: nn.Module, shape: tuple[int, ...] | None, device: torch.device, need: str) -> tuple:
    shape = shape or default_input_shape(model)
    if shape is None:
        raise UsageError(f"{need} needs example inputs: pass --input-shape (e.g. 1,3,224,224)")
    try:
        return example_inputs(model, shape, device=device)
    except FxNormError as err:
        raise UsageError(str(err)) from None


def _table(sites: list, args: argparse.Namespace) -> str:
    return format_table(sites, tablefmt=args.tablefmt, max_reason=10_000 if args.wide else 90)


def _untraced_table(untraced: list, args: argparse.Namespace) -> str:
    if not args.wide:
        untraced = [replace(u, reason=u.reason if len(u.reason) <= 90 else u.reason[:89] + "…") for u in untraced]
    return ("untraced parts (they run eagerly; norms inside them cannot fold):\n"
            + format_untraced(untraced, tablefmt=args.tablefmt))


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def relative_error(out: Any, ref: Any) -> float:
    """``max|out - ref| / max|ref|`` over every tensor of two (nested) outputs, in float64.

    Raises:
        FxNormError: the outputs differ in structure or shape.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    xs, ys = _flatten(out), _flatten(ref)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        raise FxNormError("the folded model's outputs differ in structure or shape from the original's")
    diff = ref_max = 0.0
    for x, y in zip(xs, ys):
        if x.numel() == 0:
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        diff = max(diff, float((x64 - y64).abs().max()))
        ref_max = max(ref_max, float(y64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / ref_max if ref_max > 0 else float("inf")


def _run(model: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    model, _, device = _load(args, console)
    traced = trace(model, leaf_modules=tuple(args.leaf))
    if args.input_shape is not None:
        from ..graph.shapes import record_shapes

        try:
            record_shapes(traced, _inputs(model, args.input_shape, device, "--input-shape"))
        except FxNormError:
            raise
        except Exception as err:
            raise FxNormError(f"running {args.model} on inputs of shape {args.input_shape} failed: "
                              f"{type(err).__name__}: {err}") from err
    sites = find_norms(traced)
    untraced = traced_report(traced).untraced
    if args.format == "json":
        console.json(report_dict(args.model, sites, untraced))
        return EXIT_OK
    console.out(_table(sites, args) if sites else "no normalization layers found")
    if untraced:
        console.out()
        console.out(_untraced_table(untraced, args))
    console.out()
    console.out(format_summary(sites, untraced))
    return EXIT_OK


@dataclass(frozen=True)
class _Exporter:
    """An extra output of ``fxnorm fold``: ``write(folded, inputs, path)`` raises FxNormError on failure;
    ``require()`` raises :class:`fxnorm.errors.MissingExtraError` when a package it needs is missing,
    and runs before anything is loaded or written."""

    write: Callable[[nn.Module, tuple, str], None]
    help: str
    require: Callable[[], Any] | None = None


def _export_program(model: nn.Module, inputs: tuple, path: str) -> None:
    from ..export import export_folded

    torch.export.save(export_folded(model, inputs), path)  # a folded model is exported as it is


def _export_onnx(model: nn.Module, inputs: tuple, path: str) -> None:
    from ..export import export_onnx

    export_onnx(model, inputs, path)


def _require_onnx() -> Any:
    from ..export import require_onnx

    return require_onnx(dynamo=True)  # what _export_onnx uses


#: Extra outputs of ``fxnorm fold`` by flag; the writers come from :mod:`fxnorm.export`.
EXPORTERS: dict[str, _Exporter] = {
    "export": _Exporter(_export_program, "also save a torch.export program of the folded model (.pt2)"),
    "onnx": _Exporter(_export_onnx, "also export the folded model to ONNX (needs the onnx extra)", _require_onnx),
}


def _check_extras(exports: dict[str, str]) -> None:
    """Fail before loading or writing anything when an export asked for needs a missing extra."""
    for flag, path in exports.items():
        require = EXPORTERS[flag].require
        if require is None:
            continue
        try:
            require()
        except MissingExtraError as err:
            raise MissingExtraError(f"--{flag} {path}: {err}; nothing was loaded or saved") from err


def _check_fold(model: nn.Module, folded: nn.Module, inputs: tuple | None, args: argparse.Namespace,
                console: Console) -> dict[str, Any]:
    """``--check``: both models on the same random inputs; the relative error against the tolerance."""
    console.log(f"checking on random inputs of shape {args.input_shape or default_input_shape(model)}")
    try:
        ref, out = _run(model, inputs or ()), _run(folded, inputs or ())
    except Exception as err:
        raise FxNormError(f"running the models for --check failed: {type(err).__name__}: {err}") from err
    err_value = relative_error(out, ref)
    elements = sum(t.numel() for t in _flatten(ref))
    if elements == 0:
        console.log("warning: the outputs hold no values (a detection model finds nothing on random "
                    "inputs?): --check compared nothing")
    return {"rel_err": err_value, "tolerance": args.tolerance, "passed": err_value <= args.tolerance,
            "elements": elements}


def _print_fold(console: Console, args: argparse.Namespace, before: list, after: list, untraced: list,
                report: Any, check: dict[str, Any] | None, saved: list[str]) -> None:
    """The table report of ``fxnorm fold``: the norms before, what folded, the norms after, the check."""
    console.out(f"before: {format_summary(before, untraced)}")
    console.out(_table(before, args) if before else "no normalization layers found")
    if untraced:
        console.out()
        console.out(_untraced_table(untraced, args))
    console.out()
    kinds = {f.mode for f in report.folded}
    console.out(f"folded {len(report.folded)} norm(s) ({', '.join(sorted(kinds)) or 'none'}); "
                f"{len(report.skipped)} skipped")
    console.out(f"after:  {format_summary(after, untraced)}")
    if after:
        console.out(_table(after, args))
    if check is not None:
        verdict = "ok" if check["passed"] else "FAILED"
        console.out(f"check: max|folded - original| / max|original| = {check['rel_err']:.3g} "
                    f"over {check['elements']} output values (tolerance {args.tolerance:g}): {verdict}")
    if saved:
        console.out(f"saved {', '.join(saved)}")


def run_fold(args: argparse.Namespace, console: Console) -> int:
    from ..folding.apply import fold
    from ..folding.report import FoldReport

    exports = {flag: getattr(args, flag) for flag in EXPORTERS if getattr(args, flag, None)}
    _check_extras(exports)
    model, name, device = _load(args, console)
    output = args.output or f"{name}-folded.pt"
    need_inputs = args.check or args.input_shape is not None or bool(exports)
    inputs = _inputs(model, args.input_shape, device, "--check/--export/--onnx") if need_inputs else None
    for path in (output, *exports.values()):
        _check_output(path)

    before_traced = trace(model, leaf_modules=tuple(args.leaf))
    before = find_norms(before_traced)
    untraced = traced_report(before_traced).untraced
    console.log("folding")
    folded = fold(model, strict=args.strict, standalone=args.standalone, norm_affine=args.norm_affine,
                  example_inputs=inputs if args.input_shape is not None else None, leaf_modules=tuple(args.leaf))
    report = report_of(folded, FoldReport)
    after = find_norms(folded)

    check = _check_fold(model, folded, inputs, args, console) if args.check else None

    passed = check is None or check["passed"]
    if passed:
        save_model(folded, output)
        console.log(f"saved {output}")
        for flag, path in exports.items():
            EXPORTERS[flag].write(folded, inputs, path)  # type: ignore[arg-type]
            console.log(f"saved {path}")

    if args.format == "json":
        console.json({
            "model": args.model,
            "output": output if passed else None,
            "before": {"norms": [s.to_dict() for s in before], "summary": summarize(before, untraced)},
            "after": {"norms": [s.to_dict() for s in after], "summary": summarize(after, untraced)},
            "fold": report.to_dict(),
            "check": check,
            "exports": exports if passed else {},
        })
    else:
        _print_fold(console, args, before, after, untraced, report, check, [output, *exports.values()] if passed else [])
    if not passed:
        console.log(f"fxnorm fold: error: relative error {check['rel_err']:.3g} exceeds the tolerance "  # type: ignore[index]
                    f"{args.tolerance:g}; nothing was saved")
        return EXIT_FAILURE
    return EXIT_OK


def _select(args: argparse.Namespace) -> Any:
    if not args.select:
        return None
    return args.select[0] if len(args.select) == 1 else list(args.select)


def run_recalibrate(args: argparse.Namespace, console: Console) -> int:
    from ..calibration.recalibration import recalibrate
    from ..calibration.report import CalibrationReport
    from .images import IMAGENET_MEAN, IMAGENET_STD, calibration_data

    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or folder (give a folder of images or a .pt file)")
    model, _, device = _load(args, console)
    data = calibration_data(args.data, batch_size=args.batch_size, image_size=args.image_size,
                            mean=args.mean or IMAGENET_MEAN, std=args.std or IMAGENET_STD)
    console.log(f"recalibrating on {args.data} ({len(data)} batch(es) available)")
    model = recalibrate(model, data, num_batches=args.num_batches, device=device, progress=console.progress,
                        select=_select(args))
    report = report_of(model, CalibrationReport)
    save_model(model, args.output)
    console.log(f"saved {args.output}")
    if args.format == "json":
        console.json({"model": args.model, "output": args.output, "calibration": report.to_dict()})
        return EXIT_OK
    rows = [[s.name, s.kind, s.batches, f"{s.mean_shift:.3g}", f"{s.var_ratio:.3g}"] for s in report.moved_most(args.top)]
    from tabulate import tabulate

    console.out(f"recalibrated {len(report.layers)} norm(s) on {report.num_batches} batch(es), "
                f"{report.num_samples} sample(s)")
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
    console.out(f"saved {args.output}")
    return EXIT_OK


def run_reset(args: argparse.Namespace, console: Console) -> int:
    from ..calibration.recalibration import reset
    from ..calibration.report import ResetReport

    model, _, _ = _load(args, console)
    model = reset(model, select=_select(args))
    names = report_of(model, ResetReport).names
    save_model(model, args.output)
    console.log(f"saved {args.output}")
    if args.format == "json":
        console.json({"model": args.model, "output": args.output, "reset": list(names)})
        return EXIT_OK
    console.out(f"reset the running statistics of {len(names)} norm(s):")
    for n in names:
        console.out(f"  {n}")
    console.out(f"saved {args.output}")
    return EXIT_OK
