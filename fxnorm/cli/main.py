"""The ``fxnorm`` command line: ``inspect``, ``fold``, ``recalibrate`` and ``reset``.

Reports go to stdout (a table, or with ``--format json`` one JSON object and nothing else); logs
and progress bars go to stderr. Exit status (:mod:`fxnorm.cli.console`): 0 success, 1 failure (a
one-line cause; the traceback with ``--verbose``), 2 bad arguments, unknown model or unusable
output path (found before any work), 130 Ctrl-C, 141 stdout closed by its reader. With
``--format json`` an error is a JSON object on stdout too: ``{"error": ..., "exit": ...}``.

Example:
    >>> main(["inspect", "torchvision:resnet18", "--format", "json"])    # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import FxNormError, UnknownModelError, UsageError
from ..version import __version__
from .commands import EXPORTERS, run_fold, run_inspect
from .console import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Console, cause_of, details_of
from .loading import MODEL_FORMS
from .statistics import run_recalibrate, run_reset

__all__ = ["main", "build_parser", "DEFAULT_MODEL"]

DEFAULT_MODEL = "torchvision:resnet18"

_EXITS = ("Exit status: 0 success, 1 failure, 2 bad arguments (found before any work), 130 interrupted, "
          "141 stdout closed by its reader.")
_EPILOG = (f"{_EXITS} A MODEL file may name only torch.nn, torchvision and fxnorm classes unless --trust-file "
           "(unpickling runs the code a file names).")
_READ_BACK = "fxnorm reads it back as MODEL; Python: torch.load(OUT, weights_only=False) for a file you trust"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting on a bad argument (so ``main`` returns 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


def _tablefmt(text: str) -> str:
    from tabulate import tabulate_formats

    if text not in tabulate_formats:
        raise argparse.ArgumentTypeError(f"unknown table format {text!r} (one of: {', '.join(sorted(tabulate_formats))})")
    return text


def _common(p: argparse.ArgumentParser, *, model_default: str | None, report: bool = True) -> None:
    if model_default is None:
        p.add_argument("model", metavar="MODEL", help=MODEL_FORMS)
    else:
        p.add_argument("model", metavar="MODEL", nargs="?", default=model_default,
                       help=f"{MODEL_FORMS} (default: {model_default})")
    p.add_argument("--weights", metavar="FILE", help="load this state_dict into the model (strict); read without "
                   "running code from the file, also from training checkpoints ({'model': ..., 'args': ...})")
    p.add_argument("--trust-file", action="store_true", help="MODEL is a file you trust: unpickle it fully, "
                   "which runs any code it holds (without this flag a MODEL file may name only torch.nn, "
                   "torchvision and fxnorm classes)")
    p.add_argument("--device", default="cpu", help="device to run on: cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--leaf", action="append", default=[], metavar="NAME",
                   help="qualified name of a submodule the tracer must keep opaque (repeatable)")
    if report:
        p.add_argument("--format", choices=("table", "json"), default="table",
                       help="table (default) or one JSON object on stdout")
        p.add_argument("--tablefmt", default="simple", type=_tablefmt,
                       help="tabulate table format (simple, github, grid...)")
        p.add_argument("--wide", action="store_true", help="do not shorten the reasons in tables")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no logs or progress bars on stderr")


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list every normalization layer, where it can fold or why not",
                       description="List every normalization layer of MODEL, where each can fold or why not, "
                       "and the parts of the model that could not be traced.", epilog=_EPILOG)
    _common(p, model_default=DEFAULT_MODEL)
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="run one forward on random inputs of this shape (e.g. 1,3,224,224) to record tensor "
                   "ranks; decides Linear -> BatchNorm1d folds")
    p.set_defaults(run=run_inspect)


def _add_fold(sub: Any) -> None:
    p = sub.add_parser("fold", help="fold batch norms into neighbouring conv/linear layers and save the model",
                       description="Fold every batch norm of MODEL that folds exactly into a neighbouring "
                       "conv/linear layer, print what folded (and why the rest did not), save the model.",
                       epilog=_EPILOG)
    _common(p, model_default=DEFAULT_MODEL)
    p.add_argument("-o", "--output", metavar="OUT.pt", help="where to save the folded model "
                   f"(default: <name>-folded.pt); {_READ_BACK}")
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
    p.add_argument("--merge-branches", action="store_true",
                   help="after folding, merge parallel summed conv branches of one input (RepVGG-style blocks) "
                   "into one conv; the blocks' forwards are rewritten (see docs/folding.md)")
    for flag, exporter in EXPORTERS.items():
        p.add_argument(f"--{flag}", metavar="FILE", help=exporter.help)
    p.set_defaults(run=run_fold)


def _add_recalibrate(sub: Any) -> None:
    p = sub.add_parser("recalibrate", help="recompute batch norm statistics from calibration data",
                       description="Recompute the running statistics of MODEL's norms from calibration data "
                       "(exact pooled mean and variance) and save the model.", epilog=_EPILOG)
    _common(p, model_default=None)
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a folder of images (class subfolders or flat) or a .pt file with a tensor or a list of tensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt",
                   help=f"where to save the recalibrated model; {_READ_BACK}")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-batches", type=_positive_int, help="stop after this many batches (default: all)")
    p.add_argument("--image-size", type=_positive_int, help="crop size for image folders (default: 224)")
    p.add_argument("--mean", type=float, nargs="+", help="normalization mean of image folders: 3 values (R G B) or "
                   "1 for every channel (default: ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", help="normalization std of image folders: 3 values or 1 "
                   "(default: ImageNet's)")
    p.add_argument("--allow-partial", action="store_true", help="save the model even when some norms could not "
                   "be recalibrated (they keep their statistics; named on stderr); without it that is an error")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="only these norms (glob on qualified names, repeatable; default: all)")
    p.add_argument("--order", choices=("joint", "sequential"), default="joint",
                   help="joint (default): every norm in one pass over the data, each normalizing with its batch's "
                   "statistics; sequential: level by level, earlier norms already using their new statistics "
                   "(one pass per level; exact at any batch size)")
    p.add_argument("--top", type=_positive_int, default=10, help="rows in the table of statistics that moved most")
    p.set_defaults(run=run_recalibrate)


def _add_reset(sub: Any) -> None:
    p = sub.add_parser("reset", help="reset running statistics (mean 0, var 1, count 0) and save the model",
                       description="Reset the running statistics of MODEL's norms and save the model.", epilog=_EPILOG)
    _common(p, model_default=None)
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help=f"where to save the model; {_READ_BACK}")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="only these norms (glob on qualified names, repeatable; default: all)")
    p.set_defaults(run=run_reset)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxnorm`` command.

    Example:
        >>> build_parser().parse_args(["inspect"]).model
        'torchvision:resnet18'
    """
    parser = _Parser(prog="fxnorm", description="Inspect, fold, reset and recalibrate the normalization "
                     "layers of PyTorch models.", epilog=f"{MODEL_FORMS}. {_EXITS}")
    parser.add_argument("--version", action="version", version=f"fxnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_inspect, _add_fold, _add_recalibrate, _add_reset):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxnorm`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["inspect", "torchvision:no_such_model"])   # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console.from_argv(argv)
    try:
        args = build_parser().parse_args(argv)
        console = Console(quiet=args.quiet, verbose=args.verbose, json=getattr(args, "format", "table") == "json")
        return int(args.run(args, console))
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except BrokenPipeError:
        return console.broken_pipe()
    except KeyboardInterrupt:
        done = f" after saving {', '.join(console.saved)}" if console.saved else "; nothing was saved"
        return console.fail(f"interrupted{done}", EXIT_INTERRUPTED)
    except (UsageError, UnknownModelError) as err:
        return console.fail(cause_of(err), EXIT_USAGE, details=details_of(err))
    except Exception as err:  # everything else: one line, the traceback only when asked
        if console.verbose:
            traceback.print_exc()
        return console.fail(cause_of(err), EXIT_FAILURE, details=details_of(err),
                            hint="" if console.verbose or isinstance(err, FxNormError) else
                            "(run with --verbose for the traceback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
