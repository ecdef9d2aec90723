"""``fxnorm fold MODEL --export out.pt2 / --onnx out.onnx``: the written program and ONNX file hold no
batch-norm op where a fold was possible and compute what the model computes (the ONNX tests skip
without the ``onnx`` extra)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from test_export import _mixed

import zoo
from fxnorm.cli import main
from fxnorm.export import batch_norm_nodes, count_batch_norm_ops

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extra: pip install 'fxnorm[onnx]'")


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fold_export_resnet18_program(capsys: pytest.CaptureFixture, tmp_path) -> None:
    model = zoo.build("resnet18")
    source = tmp_path / "resnet18.pt"
    torch.save(model, source)
    pt2 = tmp_path / "resnet18.pt2"
    code, out, err = _run(capsys, "fold", str(source), "-o", str(tmp_path / "folded.pt"),
                          "--input-shape", "2,3,32,32", "--export", str(pt2), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["fold"]["counts"]["folded"] == 20 and report["exports"] == {"export": str(pt2)}
    program = torch.export.load(str(pt2))
    assert count_batch_norm_ops(program) == 0, batch_norm_nodes(program)
    x = zoo.example_inputs("resnet18", 2, seed=5)
    with torch.no_grad():
        assert zoo.rel_err(program.module()(*x), model(*x)) < 1e-4


@needs_onnx
def test_fold_onnx_keeps_only_the_unfoldable_batch_norm(capsys: pytest.CaptureFixture, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    model = _mixed()
    source = tmp_path / "mixed.pt"
    torch.save(model, source)
    path = tmp_path / "mixed.onnx"
    code, out, err = _run(capsys, "fold", str(source), "-o", str(tmp_path / "folded.pt"),
                          "--input-shape", "2,3,8,8", "--onnx", str(path), "-q")
    assert code == 0, err
    proto = onnx.load(str(path))
    assert count_batch_norm_ops(proto) == 1  # bn_cat: after a cat, before a relu
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8)
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert zoo.rel_err(torch.from_numpy(result), model(x)) < 1e-4


def test_fold_onnx_without_the_extra_names_it(capsys: pytest.CaptureFixture, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    source = tmp_path / "mixed.pt"
    torch.save(_mixed(), source)
    code, out, err = _run(capsys, "fold", str(source), "-o", str(tmp_path / "folded.pt"),
                          "--input-shape", "2,3,8,8", "--onnx", str(tmp_path / "m.onnx"))
    assert code == 1 and "pip install 'fxnorm[onnx]'" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
