"""Hand a folded model to the tools that come next: ``torch.export``, ONNX, PT2E quantization.

- :func:`export_folded`: :func:`fxnorm.fold` then ``torch.export.export``; the program has no
  batch-norm op left except the ones the fold report lists as skipped.
- :func:`export_onnx`: the same, to an ONNX ``ModelProto`` (needs the ``onnx`` extra).
- :func:`export_for_quantization`: recalibrate (optional) -> fold -> export -> ``.module()``: the
  ``GraphModule`` that torchao's ``prepare_pt2e`` expects. The user's model is not changed.
- :func:`batch_norm_nodes` / :func:`count_batch_norm_ops`: the batch-norm ops left in an
  ``ExportedProgram``, an fx graph or an ONNX model, to check that nothing foldable was left.

See ``docs/quantization.md`` for the whole flow and the upstream limits met on the way.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = (torch.randn(1, 3, 8, 8),)
    >>> count_batch_norm_ops(torch.export.export(model, x)), count_batch_norm_ops(export_folded(model, x))
    (1, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import FoldError, FxNormError, MissingExtraError, TraceError
from .folding.apply import fold
from .folding.report import FoldReport, SkippedNorm, fold_report
from .graph.kinds import BN_KINDS, norm_kind

__all__ = [
    "BATCH_NORM_OPS", "NORM_OPS", "MissingExtraError", "batch_norm_nodes", "count_batch_norm_ops",
    "norms_with_affine", "skipped_batch_norms", "export_folded", "export_onnx", "export_for_quantization",
    "require_onnx",
]

#: ATen batch-norm ops (overload packets) that ``torch.export`` can leave in a graph, before and after
#: ``run_decompositions()``, in torch 2.4-2.14 (export keeps ``aten.batch_norm``; decomposing gives
#: ``_native_batch_norm_legit_no_training``). Instance norms are exported as batch norms too.
BATCH_NORM_OPS: frozenset[str] = frozenset({
    "aten.batch_norm", "aten.native_batch_norm", "aten._native_batch_norm_legit",
    "aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit_functional",
    "aten._batch_norm_impl_index", "aten._batch_norm_with_update", "aten._batch_norm_with_update_functional",
    "aten._batch_norm_no_update", "aten.cudnn_batch_norm", "aten.miopen_batch_norm",
})
_FUNCTIONS = (F.batch_norm, torch.batch_norm)


def _op_name(target: Any) -> str:
    """``aten.batch_norm`` for ``torch.ops.aten.batch_norm.default`` (the packet name without overload)."""
    packet = getattr(target, "overloadpacket", None)
    return str(packet if packet is not None else target)


def _graph_modules(obj: Any) -> Iterator[tuple[str, fx.GraphModule | None, fx.Graph]]:
    if isinstance(obj, torch.export.ExportedProgram):
        obj = obj.graph_module
    if isinstance(obj, fx.Graph):
        yield "", None, obj
        return
    if not isinstance(obj, nn.Module):
        raise FxNormError(f"batch_norm_nodes expects an ExportedProgram, an fx GraphModule/Graph, a module "
                          f"holding GraphModules, or an ONNX model; got {type(obj).__name__}")
    for name, module in obj.named_modules():  # nested graphs too: control flow, part-by-part traces
        if isinstance(module, fx.GraphModule):
            yield name, module, module.graph


def _onnx_graphs(graph: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    yield prefix, graph
    for node in graph.node:
        for attr in node.attribute:  # If/Loop/Scan bodies
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for i, sub in enumerate(subgraphs):
                yield from _onnx_graphs(sub, f"{prefix}{node.name}.{attr.name}[{i}]/")


def batch_norm_nodes(program: Any) -> list[str]:
    """Names of the batch-norm ops in ``program``.

    ``program`` is a ``torch.export.ExportedProgram``; an fx ``GraphModule`` or ``Graph`` (ATen
    batch-norm ops, ``F.batch_norm``/``torch.batch_norm`` calls and calls of batch-norm modules),
    or a module whose traced parts are GraphModules (nested graphs are searched, names are prefixed
    with their path); or an ONNX ``ModelProto``/``ONNXProgram`` (``BatchNormalization`` nodes of the
    graph, its subgraphs and its local functions).

    Example:
        >>> import torch, torch.nn as nn
        >>> ep = torch.export.export(nn.Sequential(nn.BatchNorm1d(2)).eval(), (torch.randn(3, 2),))
        >>> batch_norm_nodes(ep), batch_norm_nodes(ep.run_decompositions())
        (['batch_norm'], ['_native_batch_norm_legit_no_training'])
    """
    proto = getattr(program, "model_proto", program)  # torch.onnx.ONNXProgram
    if hasattr(proto, "graph") and hasattr(getattr(proto, "graph"), "node") and not isinstance(proto, nn.Module):
        names = [f"{p}{n.name or n.op_type}" for p, g in _onnx_graphs(proto.graph) for n in g.node
                 if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
        for function in getattr(proto, "functions", ()):
            names += [f"{function.name}/{n.name or n.op_type}" for n in function.node
                      if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
        return names
    found: list[str] = []
    for prefix, gm, graph in _graph_modules(program):
        for node in graph.nodes:
            if node.op == "call_function":
                hit = node.target in _FUNCTIONS or _op_name(node.target) in BATCH_NORM_OPS
            elif node.op == "call_module" and gm is not None:
                hit = norm_kind(gm.get_submodule(str(node.target))) in BN_KINDS - {"FrozenBatchNorm2d"}
            else:
                hit = False
            if hit:
                found.append(f"{prefix}.{node.name}" if prefix else node.name)
    return found


def count_batch_norm_ops(program: Any) -> int:
    """How many batch-norm ops :func:`batch_norm_nodes` finds in ``program``.

    Example:
        >>> import torch, torch.nn as nn
        >>> count_batch_norm_ops(torch.fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2))))
        2
    """
    return len(batch_norm_nodes(program))


#: ATen ops of the norms whose affine part ``fold(..., norm_affine=True)`` moves into the next layers.
NORM_OPS: frozenset[str] = frozenset({
    "aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten._fused_rms_norm",
    "aten.group_norm", "aten.native_group_norm",
})


def norms_with_affine(program: Any) -> dict[str, list[str]]:
    """The layer/RMS/group norm ops of an exported program (or fx graph of ATen ops) that still take
    a ``weight`` or ``bias``: ``{node name: ["weight", "bias"]}``. Empty once every norm's affine part
    folded (``fold(model, norm_affine=True)``), as rotation/smoothing quantization recipes require.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)).eval()
        >>> x = (torch.randn(3, 4),)
        >>> norms_with_affine(torch.export.export(model, x))
        {'layer_norm': ['weight', 'bias']}
        >>> norms_with_affine(export_folded(model, x, norm_affine=True))
        {}
    """
    found: dict[str, list[str]] = {}
    for prefix, _, graph in _graph_modules(program):
        for node in graph.nodes:
            if node.op != "call_function" or _op_name(node.target) not in NORM_OPS:
                continue
            schema = getattr(node.target, "_schema", None)
            names = [a.name for a in schema.arguments] if schema is not None else []
            given = [key for i, key in enumerate(names) if key in ("weight", "bias")
                     and (node.args[i] if i < len(node.args) else node.kwargs.get(key)) is not None]
            if given:
                found[f"{prefix}.{node.name}" if prefix else node.name] = given
    return found


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
    return [s for s in fold_report(folded).skipped if s.kind in BN_KINDS]


def _folded(model: nn.Module, fold_options: dict[str, Any], args: tuple,
            kwargs: dict | None = None) -> tuple[nn.Module, FoldReport]:
    """``model`` itself if it came from :func:`fxnorm.fold` (and no option asks for a new fold), else
    ``fold(model, **fold_options)`` (a copy unless ``inplace=True``), with ``args`` as example inputs
    to record tensor ranks (not when the model also needs keyword inputs)."""
    if "fold_strict" in fold_options:
        fold_options["strict"] = fold_options.pop("fold_strict")
    if not fold_options:
        try:
            return model, fold_report(model)
        except FoldError:
            pass
    if not kwargs:
        fold_options.setdefault("example_inputs", args)
    folded = fold(model, **fold_options)
    return folded, fold_report(folded)


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
        hint = "; TorchDynamo could not trace it (strict=True): try strict=False" if strict else ""
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
    strict: bool = False,
    report: bool = False,
    **fold_options: Any,
) -> torch.export.ExportedProgram | tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold ``model`` with :func:`fxnorm.fold` and export it with ``torch.export.export``.

    A model that already came from :func:`fxnorm.fold` is exported as it is (unless ``fold_options``
    are given). ``example_inputs`` also goes to ``fold`` to record tensor ranks. Batch norms in
    training mode are not folded: call ``model.eval()`` first for an inference program.

    Args:
        model: the model (not changed unless ``inplace=True`` is passed on to ``fold``).
        example_inputs: positional arguments of ``model(*example_inputs)``.
        kwargs, dynamic_shapes, strict: passed to ``torch.export.export``.
        report: also return the :class:`fxnorm.FoldReport`.
        fold_options: passed to :func:`fxnorm.fold` (``standalone``, ``norm_affine``, ``leaf_modules``...;
            ``fold_strict=True`` for fold's ``strict=True``).

    Returns:
        The ``ExportedProgram`` (and the fold report). Its batch-norm ops (:func:`count_batch_norm_ops`)
        are exactly the batch norms the report lists as skipped.

    Raises:
        TraceError: ``torch.export`` failed; the message says whether it rejects the unfolded model too.
        FoldError: from :func:`fxnorm.fold` (e.g. ``fold_strict=True`` and a batch norm cannot fold).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
        >>> program, rep = export_folded(model, (torch.randn(1, 3, 8, 8),), report=True)
        >>> batch_norm_nodes(program), [(s.name, s.reason) for s in rep.skipped]  # doctest: +ELLIPSIS
        (['batch_norm'], [('3', 'producer ... (ReLU) is not a conv/linear; consumer the graph output is not a conv')])
    """
    args = _args(example_inputs)
    intact = not fold_options.get("inplace", False)  # an in-place fold leaves ``model`` inconsistent
    folded, fold_rep = _folded(model, fold_options, args, kwargs)
    program = _export(folded, model if intact else None, args, kwargs, dynamic_shapes, strict)
    return (program, fold_rep) if report else program


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
    folded, _ = _folded(model, fold_options, args)  # export_onnx has no strict of its own: strict= is fold's
    try:
        if dynamo:
            program = torch.onnx.export(folded, args, dynamo=True, opset_version=opset_version, optimize=optimize,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            proto = program.model_proto
        else:
            import io

            buffer = io.BytesIO()
            torch.onnx.export(folded, args, buffer, dynamo=False, opset_version=opset_version,
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
    strict: bool = True,
    **fold_options: Any,
) -> fx.GraphModule:
    """The normalization-side preparation for PT2E quantization, on a copy of ``model``: eval mode,
    recalibrate the norms' statistics on ``calibration_data`` (if given, with
    :func:`fxnorm.calibration.recalibration.recalibrate`), fold, ``torch.export.export(...).module()``.

    The result goes to torchao's ``prepare_pt2e(graph_module, quantizer)``. ``model`` is not changed.

    Args:
        model: the float model.
        example_inputs: positional arguments of ``model(*example_inputs)``.
        calibration_data: batches for :func:`fxnorm.calibration.recalibration.recalibrate` (a DataLoader, a list...).
        num_batches: use that many batches of ``calibration_data``.
        dynamic_shapes: passed to ``torch.export.export``.
        strict: ``torch.export.export(..., strict=True)`` (TorchDynamo): it records the
            ``source_fn_stack`` that PT2E quantizers match patterns with. With ``strict=False`` (torch's
            default) they fall back to grouping nodes by module path, and torchao's
            X86InductorQuantizer then fails on a module called twice (resnet's shared ``relu``:
            "Input partition has more than one output node"). Pass ``False`` for a model that
            TorchDynamo cannot trace.
        fold_options: passed to :func:`fxnorm.fold` (``norm_affine=True`` for rotation/smoothing recipes;
            ``fold_strict=True`` for fold's ``strict``).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
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
    if "fold_strict" in fold_options:
        fold_options["strict"] = fold_options.pop("fold_strict")
    fold_options = {"example_inputs": args, **fold_options, "inplace": True}
    folded = fold(work, **fold_options)
    return _export(folded, None, args, None, dynamic_shapes, strict).module()
