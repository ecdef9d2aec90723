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
import sys
import traceback
from collections.abc import Sequence

from ..errors import FxNormError, UnknownModelError, UsageError
from ..version import __version__
from .commands import EXPORTERS, run_fold, run_inspect, run_recalibrate, run_reset
from .console import EXIT_FAILURE, EXIT_USAGE, Console
from .loading import MODEL_FORMS

__all__ = ["main", "build_parser", "DEFAULT_MODEL"]

DEFAULT_MODEL = "torchvision:resnet18"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting on a bad argument (so ``main`` returns 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


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
    p.set_defaults(run=run_inspect)

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
    for flag, exporter in EXPORTERS.items():
        p.add_argument(f"--{flag}", metavar="FILE", help=exporter.help)
    p.set_defaults(run=run_fold)

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
    p.set_defaults(run=run_recalibrate)

    p = sub.add_parser("reset", help="reset running statistics (mean 0, var 1, count 0) and save the model",
                       description="Reset the running statistics of MODEL's norms and save the model.")
    _common(p, model_default=None)
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="where to save the model")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="only these norms (glob on qualified names, repeatable; default: all)")
    p.set_defaults(run=run_reset)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxnorm`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["inspect", "torchvision:no_such_model"])   # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    console = Console(quiet="-q" in argv or "--quiet" in argv)
    try:
        args = build_parser().parse_args(argv)
        console = Console(quiet=args.quiet)
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
