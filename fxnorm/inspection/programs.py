"""Inspect what an export produced: the batch-norm ops left in an ``ExportedProgram``, an fx graph
or an ONNX model, and the layer/group/RMS norms that still carry an affine part.

Used to check that nothing foldable was left behind (:func:`count_batch_norm_ops`) and that
rotation/smoothing quantization recipes get affine-free norms (:func:`norms_with_affine`).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> count_batch_norm_ops(torch.export.export(model, (torch.randn(1, 3, 8, 8),)))
    1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FxNormError
from ..graph.kinds import BN_KINDS, norm_kind

__all__ = ["BATCH_NORM_OPS", "NORM_OPS", "batch_norm_nodes", "count_batch_norm_ops", "norms_with_affine"]

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
        >>> import fxnorm
        >>> norms_with_affine(fxnorm.export_folded(model, x, norm_affine=True))
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
