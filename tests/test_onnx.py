"""ONNX export of folded models (the ``onnx`` extra: onnx, onnxscript, onnxruntime; these tests skip
cleanly without it): no ``BatchNormalization`` node is left where a fold was possible, and
onnxruntime's outputs match PyTorch's. Both exporters of ``torch.onnx.export`` are covered: the
torch.export-based one (``dynamo=True``, needs onnxscript) and the TorchScript one."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn as nn
from test_export import EXPECTED_LEFT, _mixed

import zoo
from fxnorm import FxNormError, MissingExtraError, batch_norm_nodes, count_batch_norm_ops, export_onnx, fold

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extra: pip install 'fxnorm[onnx]'")
EXPORTERS = [pytest.param(True, id="dynamo", marks=pytest.mark.skipif(not HAVE_ONNXSCRIPT, reason="needs onnxscript")),
             pytest.param(False, id="torchscript")]
TOL = 1e-4


def _run_ort(proto, inputs: tuple) -> list[torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _torch_onnx(model: nn.Module, x: tuple, dynamo: bool, optimize: bool):
    """The unfolded model through torch.onnx.export itself (the reference)."""
    import io

    import onnx

    if dynamo:
        return torch.onnx.export(model, x, dynamo=True, optimize=optimize, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, x, buffer, dynamo=False, do_constant_folding=optimize)
    return onnx.load_from_string(buffer.getvalue())


@needs_onnx
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_every_fold_kind_leaves_one_batch_normalization(dynamo: bool) -> None:
    """Unoptimized, the exporter keeps all 5 batch norms of the toy model; folded, only the one after a
    cat and before a relu is left. Optimizing exporters fuse Conv -> BatchNormalization themselves, not
    the others (a norm before a conv, after a Linear, a functional norm): fxnorm still leaves fewer."""
    model = _mixed()
    x = (torch.randn(3, 3, 8, 8),)
    assert count_batch_norm_ops(_torch_onnx(model, x, dynamo, optimize=False)) == 5
    assert count_batch_norm_ops(_torch_onnx(model, x, dynamo, optimize=True)) > 1
    proto = export_onnx(model, x, dynamo=dynamo)
    assert count_batch_norm_ops(proto) == 1, batch_norm_nodes(proto)
    (out,) = _run_ort(proto, x)
    with torch.no_grad():
        assert zoo.rel_err(out, model(*x)) < TOL


@needs_onnx
@pytest.mark.parametrize("name, dynamo", [
    pytest.param("resnet18", True, marks=EXPORTERS[0].marks),
    ("mobilenet_v3_small", False),
])
def test_zoo_models_through_onnxruntime(name: str, dynamo: bool) -> None:
    model = zoo.build(name)
    x = zoo.example_inputs(name, 2)
    folded = fold(model, example_inputs=x)
    proto = export_onnx(folded, x, dynamo=dynamo, optimize=False)  # no exporter fusion: what is left is fxnorm's
    assert count_batch_norm_ops(proto) == EXPECTED_LEFT.get(name, 0)
    (out,) = _run_ort(proto, x)
    with torch.no_grad():
        assert zoo.rel_err(out, model(*x)) < TOL


@needs_onnx
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_file_and_dynamic_batch(tmp_path, dynamo: bool) -> None:
    import onnx

    model = _mixed()
    path = tmp_path / "model.onnx"
    if dynamo:
        proto = export_onnx(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=True,
                            dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    else:
        proto = export_onnx(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False)
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved)
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in proto.graph.node]
    batch = 5 if dynamo else 2
    y = (torch.randn(batch, 3, 8, 8),)
    (out,) = _run_ort(saved, y)
    with torch.no_grad():
        assert zoo.rel_err(out, model(*y)) < TOL


def test_dynamic_shapes_need_the_dynamo_exporter() -> None:
    with pytest.raises(FxNormError, match="pass dynamo=True"):
        export_onnx(_mixed(), (torch.randn(2, 3, 8, 8),), dynamo=False,
                    dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_missing_extra_is_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'fxnorm\[onnx\]'") as info:
        export_onnx(_mixed(), (torch.randn(1, 3, 8, 8),))
    assert isinstance(info.value, FxNormError) and isinstance(info.value, ImportError)
