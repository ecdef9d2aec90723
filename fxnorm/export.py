"""Hand a folded model to the tools that come next: ``torch.export``, ONNX, PT2E quantization.

- :func:`export_folded`: :func:`fxnorm.fold` then ``torch.export.export``; the program has no
  batch-norm op left except the ones the fold report lists as skipped.
- :func:`export_onnx`: the same, to an ONNX ``ModelProto`` (needs the ``onnx`` extra).
- :func:`export_for_quantization`: recalibrate (optional) -> fold -> export -> ``.module()``: the
  ``GraphModule`` that torchao's ``prepare_pt2e`` expects. The user's model is not changed.

The batch-norm ops left in a program are counted by :func:`fxnorm.count_batch_norm_ops`
(:mod:`fxnorm.inspection.programs`).

See ``docs/quantization.md`` for the whole flow and the upstream limits met on the way.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = (torch.randn(1, 3, 8, 8),)
    >>> from fxnorm import count_batch_norm_ops
    >>> count_batch_norm_ops(torch.export.export(model, x)), count_batch_norm_ops(export_folded(model, x))
    (1, 0)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import FxNormError, MissingExtraError, TraceError
from .folding.apply import fold
from .folding.report import FoldReport, SkippedNorm
from .graph.kinds import BN_KINDS
from .compat import resolve_renamed
from .reports import record_report, report_of

__all__ = ["skipped_batch_norms", "export_folded", "export_onnx", "export_for_quantization", "require_onnx"]

def skipped_batch_norms(folded: nn.Module) -> list[SkippedNorm]:
    """The batch norms :func:`fxnorm.fold` left in ``folded`` (skipped, with the reason): each one is
    still a batch-norm op once exported, except a ``FrozenBatchNorm2d`` (listed too; it runs as a mul
    and an add, not as a batch-norm op).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval()   # no conv to fold into
        >>> [(s.name, s.kind) for s in skipped_batch_norms(fold(model))]
        [('0', 'BatchNorm2d')]
    """
    return [s for s in report_of(folded, FoldReport).skipped if s.kind in BN_KINDS]


def _folded(model: nn.Module, fold_options: dict[str, Any], args: tuple,
            kwargs: dict | None = None) -> tuple[nn.Module, FoldReport]:
    """``model`` itself if it came from :func:`fxnorm.fold` (and no option asks for a new fold), else
    ``fold(model, **fold_options)`` (a copy unless ``inplace=True``), with ``args`` as example inputs
    to record tensor ranks (not when the model also needs keyword inputs)."""
    _renamed_fold_strict(fold_options)
    if not fold_options:
        try:
            return model, report_of(model, FoldReport)
        except FxNormError:
            pass
    if not kwargs:
        fold_options.setdefault("example_inputs", args)
    folded = fold(model, **fold_options)
    return folded, report_of(folded, FoldReport)


def _renamed_fold_strict(fold_options: dict[str, Any]) -> None:
    """``fold_strict=`` (fxnorm 0.1) is fold's ``strict=`` now: warn and rename it."""
    if "fold_strict" in fold_options:
        import warnings

        warnings.warn("fold_strict= is deprecated: pass strict= (fold's option); torch.export's own strict mode "
                      "is export_strict=", DeprecationWarning, stacklevel=4)
        fold_options["strict"] = fold_options.pop("fold_strict")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _export(folded: nn.Module, original: nn.Module | None, args: tuple, kwargs: dict | None,
            dynamic_shapes: Any, strict: bool) -> torch.export.ExportedProgram:
    """``torch.export.export(folded, ...)``; on failure, export ``original`` (the unfolded model, if
    given and intact) too, to tell the user whose fault it is."""
    try:
        return torch.export.export(folded, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as err:
        if original is not None and original is not folded:
            try:
                torch.export.export(original, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
            except Exception:
                raise TraceError(f"torch.export.export rejects {type(original).__name__} itself, before folding "
                                 f"({_first_line(err)}); make the model exportable first (see the torch.export "
                                 "docs), fxnorm cannot help there") from err
            raise TraceError(f"torch.export.export accepts {type(original).__name__} but not its folded version "
                             f"({_first_line(err)}): an fxnorm bug, please report it; meanwhile export the "
                             "unfolded model") from err
        hint = "; TorchDynamo could not trace it (export_strict=True): try export_strict=False" if strict else ""
        raise TraceError(f"torch.export.export failed on the folded {type(folded).__name__} ({_first_line(err)}); "
                         f"check that torch.export accepts the unfolded model{hint}") from err


def _args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise FxNormError("example_inputs must be a tuple of positional arguments for model(*example_inputs), "
                          f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def export_folded(
    model: nn.Module,
    example_inputs: tuple,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    export_strict: bool = False,
    **fold_options: Any,
) -> torch.export.ExportedProgram:
    """Fold ``model`` with :func:`fxnorm.fold` and export it with ``torch.export.export``.

    A model that already came from :func:`fxnorm.fold` is exported as it is (unless ``fold_options``
    are given). ``example_inputs`` also goes to ``fold`` to record tensor ranks. Batch norms in
    training mode are not folded: call ``model.eval()`` first for an inference program.

    Args:
        model: the model (not changed unless ``inplace=True`` is passed on to ``fold``).
        example_inputs: positional arguments of ``model(*example_inputs)``.
        kwargs, dynamic_shapes: passed to ``torch.export.export``.
        export_strict: ``torch.export.export``'s ``strict`` (TorchDynamo tracing).
        fold_options: passed to :func:`fxnorm.fold` (``standalone``, ``norm_affine``, ``leaf_modules``...;
            ``strict=True`` to fail when a batch norm cannot fold).

    Returns:
        The ``ExportedProgram``; ``fxnorm.report_of(program, FoldReport)`` is the fold report. Its
        batch-norm ops (:func:`fxnorm.count_batch_norm_ops`) are exactly the batch norms the report
        lists as skipped.

    Raises:
        TraceError: ``torch.export`` failed; the message says whether it rejects the unfolded model too.
        FoldError: from :func:`fxnorm.fold` (e.g. ``strict=True`` and a batch norm cannot fold).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
        >>> import fxnorm
        >>> from fxnorm import batch_norm_nodes
        >>> program = export_folded(model, (torch.randn(1, 3, 8, 8),))
        >>> rep = fxnorm.report_of(program, FoldReport)
        >>> batch_norm_nodes(program), [(s.name, s.reason) for s in rep.skipped]  # doctest: +ELLIPSIS
        (['batch_norm'], [('3', 'producer ... (ReLU) is not a conv/linear; consumer the graph output is not a conv or linear')])
    """
    args = _args(example_inputs)
    intact = not fold_options.get("inplace", False)  # an in-place fold leaves ``model`` inconsistent
    folded, fold_rep = _folded(model, fold_options, args, kwargs)
    program = _export(folded, model if intact else None, args, kwargs, dynamic_shapes, export_strict)
    record_report(program, fold_rep)
    return program


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{module} is not installed: pip install 'fxnorm[{extra}]'") from err


def require_onnx(dynamo: bool = True) -> Any:
    """The ``onnx`` module, once every package :func:`export_onnx` needs is known to import (``onnx``,
    and ``onnxscript`` for the dynamo exporter). Call it before doing work whose result would be lost
    (the CLI checks ``--onnx`` before it loads or writes anything).

    Raises:
        MissingExtraError: a package of the ``onnx`` extra is missing; the message gives the
            ``pip install`` command.

    Example:
        >>> require_onnx().__name__  # doctest: +SKIP
        'onnx'
    """
    onnx = _require("onnx", "onnx")
    if dynamo:
        _require("onnxscript", "onnx")
    return onnx


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | None = None,
    *,
    dynamo: bool = True,
    opset_version: int | None = None,
    optimize: bool = True,
    dynamic_shapes: Any = None,
    **fold_options: Any,
) -> Any:
    """Fold ``model`` (as :func:`export_folded` does) and export it to ONNX; needs the ``onnx`` extra.

    Args:
        model: the model, or a model returned by :func:`fxnorm.fold`.
        example_inputs: positional arguments of ``model(*example_inputs)``.
        path: also write the ONNX file there.
        dynamo: ``torch.onnx.export``'s exporter: ``True`` (torch.export based, the default of torch)
            or ``False`` (the TorchScript one, faster where torch still ships it).
        opset_version: ONNX opset (default: the exporter's).
        optimize: let the exporter optimize (dynamo: ``optimize``; TorchScript: ``do_constant_folding``).
            Both exporters fuse a Conv followed by BatchNormalization themselves when optimizing;
            fxnorm also folds what they do not (a batch norm before a conv, Linear -> BatchNorm1d...).
        dynamic_shapes: for the dynamo exporter (``torch.export`` style).
        fold_options: passed to :func:`fxnorm.fold`.

    Returns:
        The ``onnx.ModelProto``.

    Raises:
        MissingExtraError: onnx (and onnxscript for ``dynamo=True``) is not installed.
        TraceError: the exporter failed.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
        >>> proto = export_onnx(model, (torch.randn(1, 3, 8, 8),), dynamo=False)  # doctest: +SKIP
        >>> [n.op_type for n in proto.graph.node]                                 # doctest: +SKIP
        ['Conv']
    """
    if dynamic_shapes is not None and not dynamo:
        raise FxNormError("dynamic_shapes is for the dynamo exporter: pass dynamo=True (the TorchScript "
                          "exporter, dynamo=False, exports fixed shapes here)")
    onnx = require_onnx(dynamo)
    args = _args(example_inputs)
    folded, _ = _folded(model, fold_options, args)
    try:
        if dynamo:
            program = torch.onnx.export(folded, args, dynamo=True, opset_version=opset_version, optimize=optimize,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            if program is None:
                raise TraceError("torch.onnx.export returned no program")
            proto = program.model_proto
        else:
            import io

            buffer = io.BytesIO()
            torch.onnx.export(folded, args, buffer, dynamo=False,  # type: ignore[arg-type]  # file-like works opset_version=opset_version,
                              do_constant_folding=optimize)
            proto = onnx.load_from_string(buffer.getvalue())
    except Exception as err:
        raise TraceError(f"ONNX export ({'dynamo' if dynamo else 'TorchScript'} exporter) of the folded "
                         f"{type(model).__name__} failed: {_first_line(err)}; try dynamo={not dynamo}") from err
    if path is not None:
        onnx.save(proto, path)
    return proto


def export_for_quantization(
    model: nn.Module,
    example_inputs: tuple,
    *,
    calibration_data: Any = None,
    num_batches: int | None = None,
    dynamic_shapes: Any = None,
    export_strict: bool = True,
    **fold_options: Any,
) -> fx.GraphModule:
    """The normalization-side preparation for PT2E quantization, on a copy of ``model``: eval mode,
    recalibrate the norms' statistics on ``calibration_data`` (if given, with
    :func:`fxnorm.recalibrate`), fold, ``torch.export.export(...).module()``.

    The result goes to torchao's ``prepare_pt2e(graph_module, quantizer)``. ``model`` is not changed.

    Args:
        model: the float model.
        example_inputs: positional arguments of ``model(*example_inputs)``.
        calibration_data: batches for :func:`fxnorm.recalibrate` (a DataLoader, a list...).
        num_batches: use that many batches of ``calibration_data``.
        dynamic_shapes: passed to ``torch.export.export``.
        export_strict: ``torch.export.export(..., strict=True)`` (TorchDynamo): it records the
            ``source_fn_stack`` that PT2E quantizers match patterns with. With ``strict=False`` (torch's
            default) they fall back to grouping nodes by module path, and torchao's
            X86InductorQuantizer then fails on a module called twice (resnet's shared ``relu``:
            "Input partition has more than one output node"). Pass ``False`` for a model that
            TorchDynamo cannot trace.
        fold_options: passed to :func:`fxnorm.fold` (``norm_affine=True`` for rotation/smoothing recipes;
            ``strict=True`` to fail when a batch norm cannot fold). ``fxnorm.report_of(result,
            FoldReport)`` is the fold report.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
        >>> from fxnorm import count_batch_norm_ops
        >>> gm = export_for_quantization(model, (torch.randn(1, 3, 8, 8),), calibration_data=data)
        >>> count_batch_norm_ops(gm), model.training, int(model[1].num_batches_tracked)  # model unchanged
        (0, True, 0)
    """
    args = _args(example_inputs)
    try:
        work = copy.deepcopy(model)
    except Exception as err:
        raise FxNormError(f"could not copy {type(model).__name__} ({err}); fold it with fxnorm.fold(model, "
                          "inplace=True) and export that instead") from err
    work.eval()
    if calibration_data is not None:
        from .calibration.recalibration import recalibrate

        recalibrate(work, calibration_data, num_batches=num_batches)
    _renamed_fold_strict(fold_options)
    fold_options = {"example_inputs": args, **fold_options, "inplace": True}
    folded = fold(work, **fold_options)
    module = _export(folded, None, args, None, dynamic_shapes, export_strict).module()
    record_report(module, report_of(folded, FoldReport))
    return module


def __getattr__(name: str) -> Any:
    """Names this module had in fxnorm 0.1 (``count_batch_norm_ops``...): they moved to
    :mod:`fxnorm.inspection.programs`; importing them from here still works and warns."""
    return resolve_renamed(__name__, name)
