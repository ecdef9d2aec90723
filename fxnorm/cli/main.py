"""The ``fxnorm`` command line: ``inspect``, ``fold``, ``recalibrate`` and ``reset``.

Reports go to stdout (a table, or with ``--format json`` one JSON object and nothing else); logs
and progress bars go to stderr. Exit status: 0 success, 1 failure (a one-line cause; the traceback
with ``--verbose``), 2 bad arguments or unknown model (the message says which forms are accepted).

Example:
    >>> main(["inspect", "torchvision:resnet18", "--format", "json"])    # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import FxNormError, MissingExtraError, UnknownModelError, UsageError
from ..version import __version__
from .loading import MODEL_FORMS, default_input_shape, example_inputs, load_model, load_weights
from .loading import save_model
from ..inspection.render import format_summary, format_table, format_untraced, report_dict, summarize
from ..inspection.sites import find_norms
from ..graph.tracing import trace, traced_report
from ..reports import report_of

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_MODEL = "torchvision:resnet18"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting on a bad argument (so ``main`` returns 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


class _Console:
    """stdout for reports, stderr for logs (silenced by --quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def out(self, text: str = "") -> None:
        print(text, file=sys.stdout, flush=True)

    def json(self, obj: Any) -> None:
        print(json.dumps(obj, indent=2, default=str), file=sys.stdout, flush=True)

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()


# --------------------------------------------------------------------------------------------- args


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224 (positive sizes)")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _common(p: argparse.ArgumentParser, *, model_default: str | None, report: bool = True) -> None:
    if model_default is None:
        p.add_argument("model", metavar="MODEL", help=MODEL_FORMS)
    else:
        p.add_argument("model", metavar="MODEL", nargs="?", default=model_default,
                       help=f"{MODEL_FORMS} (default: {model_default})")
    p.add_argument("--weights", metavar="FILE", help="load this state_dict into the model (strict)")
    p.add_argument("--device", default="cpu", help="device to run on: cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--leaf", action="append", default=[], metavar="NAME",
                   help="qualified name of a submodule the tracer must keep opaque (repeatable)")
    if report:
        p.add_argument("--format", choices=("table", "json"), default="table",
                       help="table (default) or one JSON object on stdout")
        p.add_argument("--tablefmt", default="simple", help="tabulate table format (simple, github, grid...)")
        p.add_argument("--wide", action="store_true", help="do not shorten the reasons in tables")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no logs or progress bars on stderr")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxnorm`` command.

    Example:
        >>> build_parser().parse_args(["inspect"]).model
        'torchvision:resnet18'
    """
    parser = _Parser(prog="fxnorm", description="Inspect, fold, reset and recalibrate the normalization "
                     "layers of PyTorch models.", epilog=MODEL_FORMS)
    parser.add_argument("--version", action="version", version=f"fxnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="list every normalization layer, where it can fold or why not",
                       description="List every normalization layer of MODEL, where each can fold or why not, "
                       "and the parts of the model that could not be traced.")
    _common(p, model_default=DEFAULT_MODEL)
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="run one forward on random inputs of this shape (e.g. 1,3,224,224) to record tensor "
                   "ranks; decides Linear -> BatchNorm1d folds")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("fold", help="fold batch norms into neighbouring conv/linear layers and save the model",
                       description="Fold every batch norm of MODEL that folds exactly into a neighbouring "
                       "conv/linear layer, print what folded (and why the rest did not), save the model.")
    _common(p, model_default=DEFAULT_MODEL)
    p.add_argument("-o", "--output", metavar="OUT.pt", help="where to save the folded model "
                   "(default: <name>-folded.pt); load it with torch.load(OUT, weights_only=False)")
    p.add_argument("--check", action="store_true", help="run the model and the folded model on the same random "
                   "inputs; exit 1 if max|a-b|/max|b| exceeds --tolerance")
    p.add_argument("--tolerance", type=_positive_float, default=1e-4, help="for --check (default: 1e-4)")
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="input shape for --check and shape recording (default: 1,3,224,224 for torchvision "
                   "image models; detection: N,C,H,W images)")
    p.add_argument("--standalone", choices=("keep", "affine"), default="keep",
                   help="batch norms that cannot fold: keep them (default) or turn them into a per-channel affine op")
    p.add_argument("--strict", action="store_true", help="fail (exit 1, nothing saved) if any batch norm cannot fold")
    p.add_argument("--norm-affine", action="store_true",
                   help="also fold the affine part of LayerNorm/GroupNorm/RMSNorm into the layer after it")
    for flag, exporter in _EXPORTERS.items():
        p.add_argument(f"--{flag}", metavar="FILE", help=exporter.help)
    p.set_defaults(run=_fold)

    p = sub.add_parser("recalibrate", help="recompute batch norm statistics from calibration data",
                       description="Recompute the running statistics of MODEL's norms from calibration data "
                       "(exact pooled mean and variance) and save the model.")
    _common(p, model_default=None)
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a folder of images (class subfolders or flat) or a .pt file with a tensor or a list of tensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="where to save the recalibrated model")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-batches", type=_positive_int, help="stop after this many batches (default: all)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="crop size for image folders (default: 224)")
    p.add_argument("--mean", type=float, nargs="+", help="normalization mean (default: ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", help="normalization std (default: ImageNet's)")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="only these norms (glob on qualified names, repeatable; default: all)")
    p.add_argument("--top", type=_positive_int, default=10, help="rows in the table of statistics that moved most")
    p.set_defaults(run=_recalibrate)

    p = sub.add_parser("reset", help="reset running statistics (mean 0, var 1, count 0) and save the model",
                       description="Reset the running statistics of MODEL's norms and save the model.")
    _common(p, model_default=None)
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="where to save the model")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="only these norms (glob on qualified names, repeatable; default: all)")
    p.set_defaults(run=_reset)
    return parser


# ----------------------------------------------------------------------------------------- helpers


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


def _load(args: argparse.Namespace, console: _Console) -> tuple[nn.Module, str, torch.device]:
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


# ----------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace, console: _Console) -> int:
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


# -------------------------------------------------------------------------------------------- fold

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
_EXPORTERS: dict[str, _Exporter] = {
    "export": _Exporter(_export_program, "also save a torch.export program of the folded model (.pt2)"),
    "onnx": _Exporter(_export_onnx, "also export the folded model to ONNX (needs the onnx extra)", _require_onnx),
}


def _check_extras(exports: dict[str, str]) -> None:
    """Fail before loading or writing anything when an export asked for needs a missing extra."""
    for flag, path in exports.items():
        require = _EXPORTERS[flag].require
        if require is None:
            continue
        try:
            require()
        except MissingExtraError as err:
            raise MissingExtraError(f"--{flag} {path}: {err}; nothing was loaded or saved") from err


def _fold(args: argparse.Namespace, console: _Console) -> int:
    from ..folding.apply import fold
    from ..folding.report import FoldReport

    exports = {flag: getattr(args, flag) for flag in _EXPORTERS if getattr(args, flag, None)}
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

    check: dict[str, Any] | None = None
    if args.check:
        console.log(f"checking on random inputs of shape {args.input_shape or default_input_shape(model)}")
        try:
            ref, out = _run(model, inputs or ()), _run(folded, inputs or ())
        except Exception as err:
            raise FxNormError(f"running the models for --check failed: {type(err).__name__}: {err}") from err
        err_value = relative_error(out, ref)
        elements = sum(t.numel() for t in _flatten(ref))
        check = {"rel_err": err_value, "tolerance": args.tolerance, "passed": err_value <= args.tolerance,
                 "elements": elements}
        if elements == 0:
            console.log("warning: the outputs hold no values (a detection model finds nothing on random "
                        "inputs?): --check compared nothing")

    passed = check is None or check["passed"]
    if passed:
        save_model(folded, output)
        console.log(f"saved {output}")
        for flag, path in exports.items():
            _EXPORTERS[flag].write(folded, inputs, path)  # type: ignore[arg-type]
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
        if passed:
            console.out(f"saved {output}" + "".join(f", {p}" for p in exports.values()))
    if not passed:
        console.log(f"fxnorm fold: error: relative error {check['rel_err']:.3g} exceeds the tolerance "  # type: ignore[index]
                    f"{args.tolerance:g}; nothing was saved")
        return EXIT_FAILURE
    return EXIT_OK


# ------------------------------------------------------------------------------ recalibrate, reset


def _select(args: argparse.Namespace) -> Any:
    if not args.select:
        return None
    return args.select[0] if len(args.select) == 1 else list(args.select)


def _recalibrate(args: argparse.Namespace, console: _Console) -> int:
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


def _reset(args: argparse.Namespace, console: _Console) -> int:
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


# -------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxnorm`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["inspect", "torchvision:no_such_model"])   # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    console = _Console(quiet="-q" in argv or "--quiet" in argv)
    try:
        args = build_parser().parse_args(argv)
        console = _Console(quiet=args.quiet)
        return int(args.run(args, console))
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except (UsageError, UnknownModelError) as err:
        print(f"fxnorm: error: {err}", file=sys.stderr)
        if isinstance(err, UsageError):
            print("run 'fxnorm --help' or 'fxnorm COMMAND --help' for usage", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fxnorm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # everything else: one line, the traceback only when asked
        if verbose:
            traceback.print_exc()
        cause = str(err).strip() or type(err).__name__
        if not isinstance(err, FxNormError):
            cause = f"{type(err).__name__}: {cause.splitlines()[0]}"
        print(f"fxnorm: error: {cause}", file=sys.stderr)
        if not verbose and not isinstance(err, FxNormError):
            print("(run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
