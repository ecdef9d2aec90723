"""What ``fxnorm inspect`` and ``fxnorm fold`` do once their arguments are parsed (``run_*``), with
the tables and example inputs they share (``recalibrate`` and ``reset`` are in
:mod:`fxnorm.cli.statistics`).

Every command checks what it can before loading the model (:func:`fxnorm.cli.preflight.preflight`),
runs the model once on its example inputs before any pass (a failure names the layer), holds what
library code prints on stderr, and writes its outputs all or none (:mod:`fxnorm.cli.outputs`).

Example:
    >>> import argparse
    >>> EXPORTERS["export"].help
    'also save a torch.export program of the folded model (.pt2)'
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import FxNormError, MissingExtraError, UsageError
from ..graph.tracing import TraceReport, trace
from ..inspection.render import format_summary, format_table, format_untraced, report_dict, summarize
from ..inspection.sites import find_norms
from ..reports import report_of
from .console import EXIT_FAILURE, EXIT_OK, Console
from .loading import default_input_shape, example_inputs, model_name
from .outputs import write_outputs
from .preflight import load, preflight, shape_text
from ..graph.runtime import flatten_outputs, relative_error
from .running import run_model

__all__ = ["EXPORTERS", "relative_error", "run_inspect", "run_fold", "table", "model_inputs"]


def model_inputs(model: nn.Module, args: argparse.Namespace, device: torch.device,
                 need: str) -> tuple[tuple, Any, tuple[int, ...]]:
    """Random example inputs of ``--input-shape`` (or the model's default shape), the model's output
    on them and the shape: a model that does not run on them fails here, naming the layer, before any pass."""
    shape = args.input_shape or default_input_shape(model)
    if shape is None:
        raise UsageError(f"{need} needs example inputs: pass --input-shape (e.g. 1,3,224,224)")
    try:
        inputs = example_inputs(model, shape, device=device)
    except FxNormError as err:
        raise UsageError(str(err)) from None
    remedy = "pass an --input-shape the model takes" + ("" if args.input_shape else " (this is the default shape)")
    output = run_model(model, inputs, f"running {args.model} on inputs of shape {shape_text(shape)}", remedy)
    return inputs, output, tuple(shape)


def table(sites: list, args: argparse.Namespace) -> str:
    """The table of ``sites`` in ``--tablefmt``, reasons shortened unless ``--wide``."""
    return format_table(sites, tablefmt=args.tablefmt, max_reason=10_000 if args.wide else 90)


def _untraced_table(untraced: list, args: argparse.Namespace) -> str:
    if not args.wide:
        untraced = [replace(u, reason=u.reason if len(u.reason) <= 90 else u.reason[:89] + "…") for u in untraced]
    return ("untraced parts (they run eagerly; norms inside them cannot fold):\n"
            + format_untraced(untraced, tablefmt=args.tablefmt))


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    device = preflight(args, {})
    model, _ = load(args, console, device)
    inputs = model_inputs(model, args, device, "--input-shape")[0] if args.input_shape is not None else None
    with console.library():
        traced = trace(model, leaf_modules=tuple(args.leaf))
        sites = find_norms(traced, example_inputs=inputs)
        untraced = report_of(traced, TraceReport).untraced
    if args.format == "json":
        console.json(report_dict(args.model, sites, untraced))
        return EXIT_OK
    console.out(table(sites, args) if sites else "no normalization layers found")
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


def _check_fold(reference: Any, folded: nn.Module, inputs: tuple, shape: tuple[int, ...], args: argparse.Namespace,
                console: Console) -> dict[str, Any]:
    """``--check``: the folded model on the inputs the model ran on; the relative error against the tolerance."""
    console.log(f"checking on random inputs of shape {shape_text(shape)}")
    out = run_model(folded, inputs, "running the folded model for --check")
    err_value = relative_error(out, reference)
    elements = sum(t.numel() for t in flatten_outputs(reference))
    if elements == 0:
        console.log("warning: the outputs hold no values (a detection model finds nothing on random "
                    "inputs?): --check compared nothing")
    return {"rel_err": err_value, "tolerance": args.tolerance, "passed": err_value <= args.tolerance,
            "elements": elements}


def _print_fold(console: Console, args: argparse.Namespace, before: list, after: list, untraced: list,
                report: Any, check: dict[str, Any] | None, saved: list[str]) -> None:
    """The table report of ``fxnorm fold``: the norms before, what folded, the norms after, the check."""
    console.out(f"before: {format_summary(before, untraced)}")
    console.out(table(before, args) if before else "no normalization layers found")
    if untraced:
        console.out()
        console.out(_untraced_table(untraced, args))
    console.out()
    kinds = {f.mode for f in report.folded}
    console.out(f"folded {len(report.folded)} norm(s) ({', '.join(sorted(kinds)) or 'none'}); "
                f"{len(report.skipped)} skipped")
    merged = [m for m in report.merged if m.into]
    if report.merged:
        console.out(f"merged {len(merged)} sum(s) of conv branches; {len(report.merged) - len(merged)} not merged")
    console.out(f"after:  {format_summary(after, untraced)}")
    if after:
        console.out(table(after, args))
    if check is not None:
        verdict = "ok" if check["passed"] else "FAILED"
        console.out(f"check: max|folded - original| / max|original| = {check['rel_err']:.3g} "
                    f"over {check['elements']} output values (tolerance {args.tolerance:g}): {verdict}")
    if saved:
        console.out(f"saved {', '.join(saved)}")


def _save_folded(folded: nn.Module, inputs: tuple | None, output: str, exports: dict[str, str],
                 console: Console) -> list[str]:
    """Write ``-o`` and every export, all or none."""
    writers: list[tuple[str, Callable[[str], object]]] = [(output, lambda tmp: torch.save(folded, tmp))]
    for flag, path in exports.items():
        writers.append((path, lambda tmp, write=EXPORTERS[flag].write: write(folded, inputs, tmp)))  # type: ignore[misc]
    with console.library():  # torch.export and the ONNX exporter log whole graphs when they fail
        saved = write_outputs(writers)
    console.saved += saved
    for path in saved:
        console.log(f"saved {path}")
    return saved


def run_fold(args: argparse.Namespace, console: Console) -> int:
    from ..folding.apply import fold
    from ..folding.report import FoldReport

    exports = {flag: getattr(args, flag) for flag in EXPORTERS if getattr(args, flag, None)}
    output = args.output or f"{model_name(args.model)}-folded.pt"
    device = preflight(args, {"-o": output, **{f"--{flag}": path for flag, path in exports.items()}})
    _check_extras(exports)
    model, _ = load(args, console, device)
    inputs, reference, shape = None, None, tuple[int, ...]()
    # example inputs also let a part-by-part model's folds be checked against one real run (--strict needs it)
    if args.check or args.input_shape is not None or exports or (args.strict and default_input_shape(model)):
        inputs, reference, shape = model_inputs(model, args, device, "--check/--export/--onnx")
    console.log("folding")
    with console.library():
        before_traced = trace(model, leaf_modules=tuple(args.leaf))
        before, untraced = find_norms(before_traced), report_of(before_traced, TraceReport).untraced
        folded = fold(model, strict=args.strict, standalone=args.standalone, norm_affine=args.norm_affine,
                      example_inputs=inputs, leaf_modules=tuple(args.leaf), merge_branches=args.merge_branches)
        report = report_of(folded, FoldReport)
        after = find_norms(folded)
    check = _check_fold(reference, folded, inputs, shape, args, console) if args.check and inputs is not None else None
    passed = check is None or check["passed"]
    saved = _save_folded(folded, inputs, output, exports, console) if passed else []
    payload = {
        "model": args.model,
        "output": output if passed else None,
        "before": {"norms": [s.to_dict() for s in before], "summary": summarize(before, untraced)},
        "after": {"norms": [s.to_dict() for s in after], "summary": summarize(after, untraced)},
        "fold": report.to_dict(),
        "check": check,
        "exports": exports if passed else {},
    }
    if args.format == "json" and passed:
        console.json(payload)
    elif args.format != "json":
        _print_fold(console, args, before, after, untraced, report, check, saved)
    if not passed:
        return console.fail(f"relative error {check['rel_err']:.3g} exceeds the tolerance {args.tolerance:g}; "  # type: ignore[index]
                            "nothing was saved", EXIT_FAILURE, report=payload)
    return EXIT_OK
