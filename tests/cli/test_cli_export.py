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
from fxnorm import batch_norm_nodes, count_batch_norm_ops

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
    code, out, err = _run(capsys, "fold", str(source), "--trust-file", "-o", str(tmp_path / "folded.pt"),
                          "--input-shape", "2,3,8,8", "--onnx", str(path), "-q")  # a test class: trusted
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
    code, out, err = _run(capsys, "fold", str(source), "--trust-file", "-o", str(tmp_path / "folded.pt"),
                          "--input-shape", "2,3,8,8", "--onnx", str(tmp_path / "m.onnx"))
    assert code == 1 and "pip install 'fxnorm[onnx]'" in err and "Traceback" not in err
    assert out == "" and "loading" not in err  # checked before the model is even loaded
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "folded.pt").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_fold_onnx_checks_the_extra_before_writing(capsys: pytest.CaptureFixture, tmp_path, monkeypatch,
                                                   missing: str) -> None:
    import fxnorm.export
    from fxnorm import FxNormError, MissingExtraError

    asked: list[str] = []

    def fake_require(module: str, extra: str) -> object:
        asked.append(module)
        if module == missing:
            raise MissingExtraError(f"{module} is not installed: pip install 'fxnorm[{extra}]'")
        return object()

    monkeypatch.setattr(fxnorm.export, "_require", fake_require)
    assert issubclass(MissingExtraError, FxNormError) and issubclass(MissingExtraError, ImportError)
    assert fxnorm.export.MissingExtraError is MissingExtraError  # still importable from fxnorm.export
    source = tmp_path / "mixed.pt"
    torch.save(_mixed(), source)
    onnx_path, pt_path = tmp_path / "m.onnx", tmp_path / "folded.pt"
    code, out, err = _run(capsys, "fold", str(source), "--trust-file", "-o", str(pt_path), "--check", "--format", "json",
                          "--input-shape", "2,3,8,8", "--export", str(tmp_path / "m.pt2"), "--onnx", str(onnx_path))
    message = f"--onnx {onnx_path}: {missing} is not installed: pip install 'fxnorm[onnx]'; nothing was loaded or saved"
    assert code == 1 and json.loads(out) == {"error": message, "exit": 1}  # --format json: the error as JSON
    assert err.splitlines() == [f"fxnorm: error: {message}"]
    assert asked == ["onnx", "onnxscript"][: asked.index(missing) + 1]  # the dynamo exporter needs both
    assert list(tmp_path.iterdir()) == [source]  # no .pt, .pt2 or .onnx written
