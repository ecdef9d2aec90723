"""The fxnorm command line: in-process through ``fxnorm.cli.main(argv)``, plus a few real processes
(``python -m fxnorm`` and the ``fxnorm`` console script) for exit codes and clean stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from fxnorm.cli import main, relative_error
from fxnorm import batch_norm_nodes, count_batch_norm_ops, report_dict, find_norms

REPO = Path(__file__).resolve().parents[2]

FACTORIES = textwrap.dedent('''
    import torch
    import torch.nn as nn


    def _randomize(model):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                    m.num_batches_tracked.fill_(7)
        return model


    class Squeeze(nn.Module):
        def forward(self, x):
            return x.squeeze(-1).squeeze(-1)


    def net():
        """conv-bn (folds), relu-bn before a padded conv (cannot fold: zero padding), linear-bn1d (folds
        once ranks are recorded: a squeezed tensor's rank is not known statically)."""
        torch.manual_seed(0)
        return _randomize(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), Squeeze(), nn.Linear(8, 4), nn.BatchNorm1d(4),
        ))


    def foldable():
        torch.manual_seed(1)
        return _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4)))


    class Nothing(nn.Module):
        def forward(self, x):
            return x[:, :0]


    def empty():
        return _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Nothing()))


    class RepBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.one = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.id = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.dense(x) + self.one(x) + self.id(x))


    def rep():
        torch.manual_seed(2)
        return _randomize(nn.Sequential(RepBlock(), RepBlock()))


    def broken():
        raise RuntimeError("no such checkpoint on this machine")


    def number():
        return 3


    INSTANCE = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
''')


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The name of an importable module holding model factories."""
    folder = tmp_path_factory.mktemp("factories")
    name = f"fxnorm_cli_models_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(FACTORIES)
    sys.path.insert(0, str(folder))
    yield name
    sys.path.remove(str(folder))
    sys.modules.pop(name, None)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _net(factories: str) -> nn.Module:
    import importlib

    return importlib.import_module(factories).net().eval()


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_resnet18_json_matches_the_api(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--format", "json")
    assert code == 0
    report = json.loads(out)  # stdout is exactly one JSON object
    assert sorted(report) == ["model", "norms", "summary", "untraced"]
    assert report["model"] == "torchvision:resnet18"
    norms = report["norms"]
    assert len(norms) == 20
    assert all(n["kind"] == "BatchNorm2d" and n["producer_type"] == "Conv2d" and n["fold"] == "into_producer"
               for n in norms)
    assert report["untraced"] == [] and report["summary"]["foldable"] == 20
    model = torchvision.models.resnet18(weights=None).eval()
    assert report == json.loads(json.dumps(report_dict("torchvision:resnet18", find_norms(model))))
    assert "loading torchvision:resnet18" in err  # logs go to stderr


def test_inspect_default_model_table(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "inspect", "-q")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["norm", "kind", "features"]
    assert lines[-1] == "20 norms (BatchNorm2d: 20); 20 foldable, 0 not foldable; 0 untraced parts"
    assert sum("into_producer" in line for line in lines) == 20


def test_inspect_detection_model_names_untraced_parts(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "inspect", "torchvision:fasterrcnn_resnet50_fpn", "--format", "json")
    assert code == 0
    report = json.loads(out)
    untraced = {u["name"]: u for u in report["untraced"]}
    assert {"", "transform", "rpn", "roi_heads"} <= set(untraced)
    assert untraced[""]["type"] == "FasterRCNN" and untraced[""]["reason"].startswith("TraceError")
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    bn_modules = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bn_modules) == 53
    assert {n["name"] for n in report["norms"] if n["kind"] == "BatchNorm2d"} == bn_modules
    assert all(n["op"] == "call_module" and n["graph"] == "backbone" for n in report["norms"])
    assert report["summary"]["untraced_parts"] == len(report["untraced"])
    # the table names them too
    code, out, _ = run(capsys, "inspect", "torchvision:fasterrcnn_resnet50_fpn", "-q")
    assert "untraced parts" in out and "RegionProposalNetwork" in out
    assert out.strip().splitlines()[-1].endswith(f"{len(untraced)} untraced parts")


def test_inspect_densenet_explains_pre_activation_norms(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "inspect", "torchvision:densenet121", "--format", "json")
    assert code == 0
    norms = json.loads(out)["norms"]
    pre = [n for n in norms if n["name"].endswith("norm1") or n["name"].endswith(".norm")
           or n["name"] == "features.norm5"]
    assert len(pre) == 58 + 3 + 1  # one per dense layer, one per transition, the final norm
    for n in pre:
        assert n["fold"] is None
        assert n["reason"].startswith(f"producer {n['producer']} (") and "is not a conv/linear" in n["reason"]
        assert "; consumer " in n["reason"]
    code, wide, _ = run(capsys, "inspect", "torchvision:densenet121", "--wide", "-q")
    assert "no: producer cat (torch.cat) is not a conv/linear; consumer features_denseblock1_denselayer1_relu1 " \
           "(ReLU) is not a conv" in wide


def test_inspect_factory_with_input_shape_and_leaf(capsys: pytest.CaptureFixture, factories: str) -> None:
    code, out, _ = run(capsys, "inspect", f"{factories}:net", "--format", "json")
    assert code == 0
    norms = {n["name"]: n for n in json.loads(out)["norms"]}
    assert norms["1"]["fold"] == "into_producer"
    assert norms["3"]["fold"] is None and "pads with zeros" in norms["3"]["reason"]
    assert norms["9"]["fold"] is None and "is not known" in norms["9"]["reason"]
    assert norms["1"]["num_batches_tracked"] == 7
    # one forward on --input-shape records ranks: the Linear -> BatchNorm1d fold becomes possible
    code, out, _ = run(capsys, "inspect", f"{factories}:net", "--format", "json", "--input-shape", "2,3,6,6")
    assert code == 0
    assert {n["name"]: n for n in json.loads(out)["norms"]}["9"]["fold"] == "into_producer"
    # an instance attribute works as a factory; --leaf keeps a module opaque
    code, out, _ = run(capsys, "inspect", f"{factories}:INSTANCE", "--format", "json", "--leaf", "1")
    assert code == 0 and [n["name"] for n in json.loads(out)["norms"]] == ["1"]


def test_inspect_saved_model_file_and_weights(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    model = _net(factories)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    code, out, err = run(capsys, "inspect", str(path), "--format", "json")  # its Squeeze class is not allowed
    assert code == 1 and "Squeeze" in json.loads(out)["error"] and "--trust-file" in err
    code, out, _ = run(capsys, "inspect", str(path), "--format", "json", "--trust-file")
    assert code == 0
    assert json.loads(out)["norms"] == json.loads(json.dumps([s.to_dict() for s in find_norms(model)]))
    # --weights: a state_dict with other statistics
    with torch.no_grad():
        model[1].running_var[0] = 1e-9
        model[1].num_batches_tracked.fill_(123)
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    code, out, _ = run(capsys, "inspect", f"{factories}:net", "--weights", str(weights), "--format", "json")
    assert code == 0
    first = json.loads(out)["norms"][0]
    assert first["num_batches_tracked"] == 123 and first["health"] == ["running_var below eps in 1 channel(s)"]


def test_factory_from_the_current_directory(capsys: pytest.CaptureFixture, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import torch.nn as nn\n"
                                         "def make():\n    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    code, out, _ = run(capsys, "inspect", f"{name}:make", "--format", "json")
    sys.modules.pop(name, None)
    assert code == 0 and [n["kind"] for n in json.loads(out)["norms"]] == ["BatchNorm1d"]


# --------------------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "torchvision:resnet81"], "Did you mean torchvision:resnet18"),
        (["inspect", "resnet18"], "Did you mean torchvision:resnet18?"),
        (["inspect", "not a model"], "MODEL is one of: torchvision:<name>"),
        (["inspect", "missing.pt"], "There is no file 'missing.pt'"),
        (["inspect", "no_such_package_xyz.models:net"], "cannot import 'no_such_package_xyz.models'"),
        (["inspect", "--format", "xml"], "invalid choice: 'xml'"),
        (["inspect", "--input-shape", "1,3,a"], "is not a shape like 1,3,224,224"),
        (["inspect", "--input-shape", "1,0,4"], "positive sizes"),
        (["fold", "--tolerance", "-1"], "must be positive"),
        (["fold", "-o", "/no/such/dir/out.pt"], "directory /no/such/dir does not exist"),
        (["recalibrate", "torchvision:resnet18", "-o", "x.pt"], "--data"),
        (["recalibrate", "torchvision:resnet18", "--data", "/no/such/data", "-o", "x.pt"], "no such file or folder"),
        (["reset", "torchvision:resnet18"], "-o/--output"),
        ([], "COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert any(line.startswith("fxnorm: error: ") and needle in line for line in err.splitlines()), err
    assert "Traceback" not in err


def test_factory_module_attribute_errors_exit_2(capsys: pytest.CaptureFixture, factories: str) -> None:
    code, _, err = run(capsys, "inspect", f"{factories}:nope")
    assert code == 2 and "has no attribute 'nope'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_gpu_exits_2(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "inspect", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_failures_exit_1_with_one_line(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    code, out, err = run(capsys, "inspect", f"{factories}:broken")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1] == "fxnorm: error: calling " + factories + ":broken() failed: RuntimeError: no such " \
                        "checkpoint on this machine"
    assert "Traceback" not in err
    code, _, err = run(capsys, "inspect", f"{factories}:broken", "--verbose")
    assert code == 1 and "Traceback (most recent call last)" in err
    code, _, err = run(capsys, "inspect", f"{factories}:number")
    assert code == 1 and "returned an int, not an nn.Module" in err
    # a state_dict given as MODEL, and weights that do not match
    state = tmp_path / "state.pt"
    torch.save(_net(factories).state_dict(), state)
    code, _, err = run(capsys, "inspect", str(state))
    assert code == 1 and "give the architecture as MODEL and this file with --weights" in err
    code, _, err = run(capsys, "inspect", "torchvision:resnet18", "--weights", str(state))
    assert code == 1 and "do not match the model" in err and "missing" in err and "unexpected" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "inspect", str(garbage))
    assert code == 1 and f"fxnorm: error: cannot load {garbage}: not a file written by torch.save, or a damaged " \
                         "one\n" in err


def test_help_and_version(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out and "recalibrate" in out and "torchvision:<name>" in out
    code, out, _ = run(capsys, "fold", "--help")
    assert code == 0 and "--tolerance" in out and "--standalone" in out and "--export" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("fxnorm ")


# --------------------------------------------------------------------------------------------- fold


def test_fold_check_saves_an_equivalent_model(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    out_path = tmp_path / "folded.pt"
    code, out, err = run(capsys, "fold", f"{factories}:net", "-o", str(out_path), "--check",
                         "--input-shape", "2,3,6,6", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == str(out_path)
    assert report["before"]["summary"]["by_kind"] == {"BatchNorm1d": 1, "BatchNorm2d": 2}
    folded_names = {f["name"]: f for f in report["fold"]["folded"]}
    assert set(folded_names) == {"1", "9"}  # conv-bn and (ranks recorded) linear-bn1d
    assert folded_names["1"]["into"] == "0" and folded_names["9"]["into"] == "8"
    assert [s["name"] for s in report["fold"]["skipped"]] == ["3"]
    assert report["after"]["summary"]["total"] == 1  # only the unfoldable one is left
    check = report["check"]
    assert check["passed"] and check["tolerance"] == 1e-4 and 0 < check["rel_err"] < 1e-5
    assert check["elements"] == 2 * 4
    # the saved file loads and computes what the original computes
    folded = torch.load(out_path, weights_only=False)
    model = _net(factories)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) < 1e-5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1


def test_fold_table_default_output_and_standalone(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "fold", f"{factories}:foldable", "--check", "--input-shape", "1,3,5,5")
    assert code == 0
    assert (tmp_path / "foldable-folded.pt").is_file()
    lines = out.splitlines()
    assert lines[0] == "before: 2 norms (BatchNorm2d: 2); 2 foldable, 0 not foldable; 0 untraced parts"
    assert "folded 2 norm(s) (into_producer); 0 skipped" in lines
    assert "after:  0 norms (none); 0 foldable, 0 not foldable; 0 untraced parts" in lines
    assert any(line.startswith("check: max|folded - original| / max|original| = ") and line.endswith(": ok")
               for line in lines)
    assert lines[-1] == "saved foldable-folded.pt"
    # --standalone affine turns the unfoldable BN into a per-channel affine op
    code, out, _ = run(capsys, "fold", f"{factories}:net", "-o", "aff.pt", "--standalone", "affine", "--check",
                       "--input-shape", "2,3,6,6", "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert {f["name"]: f["mode"] for f in report["fold"]["folded"]}["3"] == "affine"
    assert report["after"]["summary"]["total"] == 0 and report["check"]["passed"]


def test_fold_merge_branches(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    out_path = tmp_path / "rep.pt"
    code, out, err = run(capsys, "fold", f"{factories}:rep", "-o", str(out_path), "--merge-branches", "--check",
                         "--input-shape", "2,4,6,6", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert [(m["block"], m["branches"], m["into"]) for m in report["fold"]["merged"]] == [
        ("0", ["dense", "one", "id"], "dense"), ("1", ["dense", "one", "id"], "dense")]
    assert report["check"]["passed"] and report["after"]["summary"]["total"] == 0
    folded = torch.load(out_path, weights_only=False)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2
    code, out, _ = run(capsys, "fold", f"{factories}:rep", "-o", str(tmp_path / "rep2.pt"), "--merge-branches")
    assert code == 0 and "merged 2 sum(s) of conv branches; 0 not merged" in out.splitlines()


def test_fold_strict_and_failed_check_save_nothing(capsys: pytest.CaptureFixture, factories: str,
                                                   tmp_path: Path) -> None:
    out_path = tmp_path / "strict.pt"
    code, out, err = run(capsys, "fold", f"{factories}:net", "-o", str(out_path), "--strict")
    assert code == 1 and out == "" and not out_path.exists()
    assert "cannot fold exactly" in err and "3 (BatchNorm2d)" in err and "Traceback" not in err
    code, out, err = run(capsys, "fold", f"{factories}:foldable", "-o", str(out_path), "--check",
                         "--input-shape", "1,3,5,5", "--tolerance", "1e-30", "--format", "json")
    assert code == 1 and not out_path.exists()
    report = json.loads(out)
    assert report["check"]["passed"] is False and report["output"] is None
    assert "exceeds the tolerance 1e-30; nothing was saved" in err


def test_fold_check_of_empty_outputs_warns(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    code, out, err = run(capsys, "fold", f"{factories}:empty", "-o", str(tmp_path / "e.pt"), "--check",
                         "--input-shape", "1,3,4,4", "--format", "json")
    assert code == 0
    assert json.loads(out)["check"] == {"rel_err": 0.0, "tolerance": 1e-4, "passed": True, "elements": 0}
    assert "--check compared nothing" in err


def test_fold_check_needs_inputs_for_unknown_models(capsys: pytest.CaptureFixture, factories: str) -> None:
    code, _, err = run(capsys, "fold", f"{factories}:net", "--check")
    assert code == 2 and "pass --input-shape" in err


def test_fold_export_program(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    pt2 = tmp_path / "folded.pt2"
    code, out, err = run(capsys, "fold", f"{factories}:foldable", "-o", str(tmp_path / "f.pt"),
                         "--input-shape", "1,3,5,5", "--export", str(pt2), "-q")
    assert code == 0, err
    program = torch.export.load(str(pt2))
    model = __import__(factories).foldable().eval()
    x = torch.randn(1, 3, 5, 5)  # the program is specialized to the example shape
    with torch.no_grad():
        assert relative_error(program.module()(x), model(x)) < 1e-5
    assert count_batch_norm_ops(program) == 0, batch_norm_nodes(program)  # every batch-norm op variant


def test_relative_error() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": [torch.tensor([3.0])]}
    b = {"x": torch.tensor([1.0, 2.5]), "y": [torch.tensor([-4.0])]}
    assert relative_error(a, b) == pytest.approx(7.0 / 4.0)  # max|a-b| = |3 - -4|, max|b| = 4
    assert relative_error(b, b) == 0.0
    with pytest.raises(Exception, match="differ in structure"):
        relative_error({"x": torch.zeros(2)}, {"x": torch.zeros(3)})


# ---------------------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_m_fxnorm_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fxnorm", "inspect", "torchvision:resnet18", "--format", "json"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["total"] == 20  # nothing but JSON on stdout
    assert "loading torchvision:resnet18" in done.stderr


def test_console_script_exit_codes(tmp_path: Path) -> None:
    """The installed ``fxnorm`` script (``python -m fxnorm`` where the package is not installed)."""
    script = shutil.which("fxnorm", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "fxnorm"]
    bad = subprocess.run([*command, "fold", "torchvision:nope", "--strict"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "fxnorm: error: torchvision has no model named 'nope'" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------- calibration data


def _write_images(folder: Path) -> list[tuple[Path, tuple[int, int, int]]]:
    """Constant-colour images in class subfolders and at the top, PNG and BMP, of different sizes."""
    from PIL import Image

    images = []
    specs = [("cats/a.png", (10, 200, 30), (40, 60)), ("cats/b.png", (255, 0, 128), (30, 30)),
             ("dogs/c.bmp", (0, 0, 0), (50, 40)), ("top.png", (128, 128, 128), (36, 36)),
             ("dogs/d.jpeg.txt", (1, 1, 1), (8, 8))]
    for rel, colour, (h, w) in specs:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "BMP" if rel.endswith(".bmp") else "PNG"
        Image.new("RGB", (w, h), colour).save(path, format=fmt)
        if not rel.endswith(".txt"):
            images.append((path, colour))
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are skipped
    return sorted(images)


def test_image_folder_batches(tmp_path: Path) -> None:
    from fxnorm.cli.images import IMAGENET_MEAN, IMAGENET_STD, calibration_data, find_images

    images = _write_images(tmp_path)
    assert find_images(str(tmp_path)) == [str(p) for p, _ in images]
    data = calibration_data(str(tmp_path), batch_size=3, image_size=8)
    batches = list(data)
    assert len(data) == 2 and [tuple(b.shape) for b in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    stacked = torch.cat(batches)
    for i, (_, colour) in enumerate(images):
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
        torch.testing.assert_close(stacked[i], expected.view(3, 1, 1).expand(3, 8, 8), rtol=0, atol=1e-5)
    custom = next(iter(calibration_data(str(tmp_path), batch_size=1, image_size=4, mean=[0.5], std=[0.5])))
    assert tuple(custom.shape) == (1, 3, 4, 4)
    colour = images[0][1]  # one mean/std value for every channel
    for ch in range(3):
        assert torch.allclose(custom[0, ch], torch.full((4, 4), 2 * colour[ch] / 255 - 1), atol=1e-5)


def test_tensor_files(tmp_path: Path) -> None:
    from fxnorm.cli.images import calibration_data

    t = torch.randn(10, 3, 4, 4)
    torch.save(t, tmp_path / "t.pt")
    batches = list(calibration_data(str(tmp_path / "t.pt"), batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2] and torch.equal(torch.cat(batches), t)
    torch.save([t[:3], t[3:]], tmp_path / "l.pt")
    batches = list(calibration_data(str(tmp_path / "l.pt"), batch_size=1))  # a list: each item one batch
    assert [len(b) for b in batches] == [3, 7]


@pytest.mark.parametrize(
    "content,kwargs,needle",
    [
        (torch.tensor([[1.0, float("nan")]]), {}, "contains NaN or Inf"),
        (torch.zeros(4, 3, dtype=torch.uint8), {}, "must be floating point"),
        ([], {}, "empty list"),
        ({"x": torch.zeros(2)}, {}, "holds a dict"),
        (torch.zeros(0, 3), {}, "is empty"),
        (torch.zeros(2, 3), {"batch_size": 0}, "batch size must be a positive integer"),
        (torch.zeros(2, 3), {"mean": [0.5, 0.5], "std": [0.5]}, r"mean needs 3 values \(R G B\) or 1 for every channel, got 2"),
        (torch.zeros(2, 3), {"std": [float("nan")]}, "std values must be finite"),
        (torch.zeros(2, 3), {"std": [0.2, 0.0, 0.2]}, "std values must be positive"),
    ],
)
def test_bad_tensor_files(tmp_path: Path, content: object, kwargs: dict, needle: str) -> None:
    from fxnorm.cli.images import calibration_data
    from fxnorm import DataError

    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(DataError, match=needle):
        calibration_data(str(path), **kwargs)


def test_bad_folders(tmp_path: Path) -> None:
    from fxnorm.cli.images import calibration_data
    from fxnorm import DataError

    with pytest.raises(DataError, match="no images found"):
        calibration_data(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        calibration_data(str(tmp_path / "nope"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        list(calibration_data(str(tmp_path)))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read .*junk.pt"):
        calibration_data(str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------------------- recalibrate and reset


def test_recalibrate_image_folder(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    from fxnorm.cli.images import calibration_data

    images = tmp_path / "images"
    _write_images(images)
    out_path = tmp_path / "recal.pt"
    code, out, err = run(capsys, "recalibrate", f"{factories}:net", "--data", str(images), "-o", str(out_path),
                         "--batch-size", "3", "--image-size", "6", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == str(out_path)
    calib = report["calibration"]
    assert calib["num_batches"] == 2 and calib["num_samples"] == 4
    assert {layer["name"] for layer in calib["layers"]} == {"1", "3", "9"}
    model = torch.load(out_path, weights_only=False)
    # the first BN sees the conv output: its new statistics are that output's exact mean and variance
    original = _net(factories)
    x = torch.cat(list(calibration_data(str(images), batch_size=3, image_size=6)))
    with torch.no_grad():
        y = original[0](x).transpose(0, 1).reshape(8, -1).double()
    torch.testing.assert_close(model[1].running_mean.double(), y.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), y.var(1, unbiased=True), rtol=1e-4, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 2
    assert not model.training and original[1].momentum == model[1].momentum


def test_recalibrate_tensor_file_table_and_select(capsys: pytest.CaptureFixture, factories: str,
                                                  tmp_path: Path) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(12, 3, 6, 6), data)
    out_path = tmp_path / "recal.pt"
    code, out, _ = run(capsys, "recalibrate", f"{factories}:net", "--data", str(data), "-o", str(out_path),
                       "--batch-size", "4", "--num-batches", "2", "--select", "1", "--select", "9", "-q")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "recalibrated 2 norm(s) on 2 batch(es), 8 sample(s)"
    assert lines[1].startswith("statistics that moved most")
    assert lines[2].split() == ["norm", "kind", "batches", "mean", "shift", "var", "change"]
    assert {line.split()[0] for line in lines[4:6]} == {"1", "9"}
    assert lines[-1] == f"saved {out_path}"
    model, original = torch.load(out_path, weights_only=False), _net(factories)
    assert torch.equal(model[3].running_mean, original[3].running_mean)  # not selected: untouched
    assert not torch.equal(model[1].running_mean, original[1].running_mean)


def test_recalibrate_failures(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(4, 5, 6, 6), data)  # 5 channels: the model takes 3
    out_path = tmp_path / "recal.pt"
    code, out, err = run(capsys, "recalibrate", f"{factories}:net", "--data", str(data), "-o", str(out_path))
    assert code == 1 and out == "" and not out_path.exists()
    assert "fxnorm: error: batch 0: the model raised RuntimeError" in err and "Traceback" not in err
    code, _, err = run(capsys, "recalibrate", f"{factories}:net", "--data", str(data), "-o", str(out_path),
                       "--select", "nothing*")
    assert code == 1 and "nothing*" in err


def test_reset(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    out_path = tmp_path / "reset.pt"
    code, out, _ = run(capsys, "reset", f"{factories}:net", "-o", str(out_path), "--select", "[13]", "--format", "json")
    assert code == 0
    assert json.loads(out) == {"model": f"{factories}:net", "output": str(out_path), "reset": ["1", "3"]}
    model, original = torch.load(out_path, weights_only=False), _net(factories)
    for i in (1, 3):
        assert torch.equal(model[i].running_mean, torch.zeros(8)) and torch.equal(model[i].running_var, torch.ones(8))
        assert int(model[i].num_batches_tracked) == 0
    assert torch.equal(model[9].running_var, original[9].running_var)
    torch.testing.assert_close(model[0].weight, original[0].weight)
    code, out, _ = run(capsys, "reset", f"{factories}:net", "-o", str(out_path), "-q")
    assert code == 0 and out.splitlines()[0] == "reset the running statistics of 3 norm(s):"


def test_recalibrate_sequential_order(capsys: pytest.CaptureFixture, factories: str, tmp_path: Path) -> None:
    """``--order sequential``: one pass per level; batch size 1 and 4 give the same statistics."""
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, 6, 6), data)
    states = []
    for batch in ("1", "4"):
        out_path = tmp_path / f"seq{batch}.pt"
        code, out, err = run(capsys, "recalibrate", f"{factories}:net", "--data", str(data), "-o", str(out_path),
                             "--batch-size", batch, "--order", "sequential", "-q")
        assert code == 0, err
        assert out.splitlines()[0] == f"recalibrated 3 norm(s) on {8 // int(batch)} batch(es), 8 sample(s) (3 passes, one per level)"
        states.append(torch.load(out_path, weights_only=False).state_dict())
    for key, value in states[0].items():
        if "running" in key:
            torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-5, msg=key)
    code, out, _ = run(capsys, "recalibrate", f"{factories}:net", "--data", str(data), "-o", str(tmp_path / "j.pt"),
                       "--order", "sequential", "--format", "json")
    calibration = json.loads(out)["calibration"]
    assert calibration["passes"] == 3 and calibration["levels"] == [["1"], ["3"], ["9"]]
