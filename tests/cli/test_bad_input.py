"""The ``fxnorm`` command under bad input, one table row per case (issue 15 and the cases that were
already right): the exit status, exactly one ``fxnorm: error:`` cause line on stderr and no
traceback, the JSON error object with ``--format json``, no input file changed, and no output, partial
output or temporary file left behind. Rows marked ``process`` also run as ``python -m fxnorm``; Ctrl-C
(SIGINT sent to a real process) and a closed stdout have their own tests at the end."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fxnorm.cli import main
from fxnorm.cli.outputs import write_outputs

REPO = Path(__file__).resolve().parents[2]

MODELS = textwrap.dedent('''
    import sys
    import time

    import torch
    import torch.nn as nn


    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


    class Custom(nn.Module):
        """A class outside fxnorm's allow-list: a file holding it is refused without --trust-file."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))


    def custom():
        return Custom()


    class Branch(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: folds, but torch.export cannot export it
                return x * 2
            return x - 1


    def unexportable():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Branch())


    def partly_usable():
        """At batch size 1 the BatchNorm2d sees many values per channel, the BatchNorm1d only one."""
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 2), nn.BatchNorm1d(2))


    def unfoldable():
        """A batch norm with a shift, after a relu and before a zero-padded conv: it cannot fold."""
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
        model[2].running_mean.fill_(0.5)
        return model


    def number():
        return 3


    def scripted():
        return torch.jit.script(tiny().eval())


    class Sleepy(nn.Module):
        def forward(self, x):
            if x.sum() > -1e30:  # data-dependent: stays eager, so it really runs during recalibration
                print("fxnorm-test: forward", file=sys.stderr, flush=True)
                time.sleep(120)
            return x


    def sleepy():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Sleepy())


    class SlowToSave(nn.Sequential):
        def __getstate__(self):
            print("fxnorm-test: pickling", file=sys.stderr, flush=True)
            time.sleep(120)
            return self.__dict__


    def slow_to_save():
        return SlowToSave(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
''')


class Payload:
    """Unpickling this runs code: it writes the file ``path`` (a real attack would do worse)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The name of an importable module of tiny model factories, and its folder."""
    folder = tmp_path_factory.mktemp("models")
    name = f"fxnorm_bad_input_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    yield name, folder
    sys.path.remove(str(folder))
    sys.modules.pop(name, None)


@pytest.fixture
def workspace(tmp_path: Path, models: tuple[str, Path]) -> Path:
    """The input files of every case, in a folder of their own."""
    from PIL import Image

    module = __import__(models[0])
    tiny = module.tiny().eval()
    torch.save(tiny, tmp_path / "tiny.pt")  # torch.nn classes only: safe
    torch.save(module.custom(), tmp_path / "custom.pt")
    torch.save(tiny.state_dict(), tmp_path / "state.pt")
    args = argparse.Namespace(lr=0.1, model="tiny", payload=Payload(tmp_path / "pwned"))
    torch.save({"model": tiny.state_dict(), "optimizer": {"lr": 0.1}, "args": args, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1)}, tmp_path / "no_state.pt")
    torch.save(Payload(tmp_path / "pwned"), tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    whole = (tmp_path / "tiny.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(whole[: len(whole) // 2])
    gen = torch.Generator().manual_seed(0)
    torch.save(torch.randn(8, 3, 8, 8, generator=gen), tmp_path / "data.pt")
    torch.save(torch.randn(4, 5, 8, 8, generator=gen), tmp_path / "data5.pt")
    torch.save(torch.full((4, 3, 8, 8), float("nan")), tmp_path / "nan.pt")
    torch.save([torch.randn(1, 3, 4, 4, generator=gen) for _ in range(3)], tmp_path / "onepix.pt")
    (tmp_path / "images").mkdir()
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)]):
        Image.new("RGB", (12, 10), colour).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notadir").write_text("a file")
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) with the hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {m}: the models module, {w}: the workspace
    exit: int
    cause: str = ""  # in the one "fxnorm: error:" line (every failure has exactly one)
    made: tuple[str, ...] = ()  # the files the run writes; anything else new is a leftover
    early: bool = False  # fails before the model is loaded ("loading" never logged)
    process: bool = False  # also run as `python -m fxnorm`
    warning: str = ""  # in a "fxnorm: warning:" line


FOLD_TINY = ("fold", "{m}:tiny", "--input-shape", "1,3,8,8")
RECAL_TINY = ("recalibrate", "{m}:tiny", "-o", "{w}/out.pt")

CASES = [
    # --- already right before issue 15
    Case("unknown-model", ("inspect", "torchvision:resnet81"), 2, "Did you mean torchvision:resnet18", process=True),
    Case("corrupt-file", ("inspect", "{w}/garbage.pt"), 1, "not a file written by torch.save, or a damaged one"),
    Case("truncated-file", ("inspect", "{w}/trunc.pt"), 1, "damaged one (PytorchStreamReader failed reading zip"),
    Case("state-dict-as-model", ("inspect", "{w}/state.pt"), 1,
         "holds an OrderedDict of 7 tensors (a state_dict), not a model: give the architecture as MODEL"),
    Case("factory-returns-int", ("inspect", "{m}:number"), 1, "returned an int, not an nn.Module"),
    Case("torchscript-model", ("inspect", "{m}:scripted"), 1, "is TorchScript (torch.jit.script/trace): fxnorm "
         "reads Python modules; pass the nn.Module it was made from"),
    Case("wrong-channels", (*RECAL_TINY, "--data", "{w}/data5.pt"), 1, "batch 0: the model raised RuntimeError"),
    Case("nan-data", (*RECAL_TINY, "--data", "{w}/nan.pt"), 1, "contains NaN or Inf", early=True),
    Case("empty-folder", (*RECAL_TINY, "--data", "{w}/empty"), 1, "no images found", early=True),
    Case("missing-data", (*RECAL_TINY, "--data", "{w}/nothing"), 2, "no such file or folder", early=True),
    Case("missing-output-dir", (*FOLD_TINY, "-o", "{w}/nodir/out.pt"), 2, "directory", early=True),
    Case("output-is-the-model", ("reset", "{w}/tiny.pt", "-o", "{w}/tiny.pt"), 2,
         "-o {w}/tiny.pt is the input MODEL: writing it would destroy the input", early=True, process=True),
    # --- 1: errors from inside torch are one line naming the layer
    Case("shape-mismatch-fold", ("fold", "torchvision:resnet18", "--check", "--input-shape", "1,3,224", "-o",
                                 "{w}/r.pt"), 1, "failed in layer conv1 (Conv2d): RuntimeError: Given groups=1",
         process=True),
    Case("shape-mismatch-inspect", ("inspect", "{m}:tiny", "--input-shape", "1,5,8,8"), 1,
         "on inputs of shape 1,5,8,8 failed in layer 0 (Conv2d)"),
    # --- 2: outputs distinct from each other and from the inputs; all written or none
    Case("o-and-export-same", (*FOLD_TINY, "-o", "{w}/x.pt", "--export", "{w}/x.pt"), 2,
         "-o {w}/x.pt and --export {w}/x.pt are the same file", early=True, process=True),
    Case("export-is-the-model", ("fold", "{w}/tiny.pt", "--input-shape", "1,3,8,8", "-o", "{w}/f.pt", "--export",
                                 "{w}/tiny.pt"), 2, "--export {w}/tiny.pt is the input MODEL", early=True),
    Case("onnx-same-as-o-other-spelling", (*FOLD_TINY, "-o", "{w}/a.pt", "--onnx", "{w}/images/../a.pt"), 2,
         "are the same file", early=True),
    Case("o-is-the-weights", (*FOLD_TINY, "--weights", "{w}/state.pt", "-o", "{w}/state.pt"), 2,
         "is the input --weights", early=True),
    Case("o-is-the-data", (*RECAL_TINY[:2], "--data", "{w}/data.pt", "-o", "{w}/data.pt"), 2,
         "is the input --data", early=True),
    Case("export-fails-nothing-saved", ("fold", "{m}:unexportable", "--input-shape", "1,3,8,8", "-o", "{w}/u.pt",
                                        "--export", "{w}/u.pt2"), 1,
         "writing {w}/u.pt2 failed: torch.export.export failed"),
    # --- 3: MODEL files are read without running code unless --trust-file
    Case("malicious-model", ("inspect", "{w}/evil.pt"), 1, "refused to load {w}/evil.pt: unpickling it needs "
         "exec, which is not on fxnorm's list of safe classes", process=True),
    Case("malicious-model-trusted", ("inspect", "{w}/evil.pt", "--trust-file"), 1, "holds a NoneType, not an "
         "nn.Module", made=("pwned",)),  # the payload is real: trusted, it runs
    Case("custom-class-refused", ("inspect", "{w}/custom.pt"), 1, "Custom, which is not on fxnorm's list of safe "
         "classes (torch.nn, torchvision.models, torchvision.ops, fxnorm), and that could run any code. Pass "
         "--trust-file if you trust this file"),
    Case("custom-class-trusted", ("inspect", "{w}/custom.pt", "--trust-file"), 0),
    Case("custom-class-as-weights", ("inspect", "{m}:custom", "--weights", "{w}/custom.pt"), 0),
    Case("safe-whole-model", ("reset", "{w}/tiny.pt", "-o", "{w}/fresh.pt"), 0, made=("fresh.pt",)),
    Case("trust-file-without-file", ("inspect", "torchvision:resnet18", "--trust-file"), 2,
         "--trust-file is for a MODEL file", early=True),
    # --- 4: --weights: training checkpoints, clean errors
    Case("training-checkpoint", ("inspect", "{m}:tiny", "--weights", "{w}/ckpt.pth"), 0),  # its payload never runs
    Case("weights-garbage", ("inspect", "{m}:tiny", "--weights", "{w}/garbage.pt"), 1,
         "cannot read weights {w}/garbage.pt: not a file written by torch.save"),
    Case("weights-no-state-dict", ("inspect", "{m}:tiny", "--weights", "{w}/no_state.pt"), 1,
         "holds a dict with keys epoch, args and no state_dict"),
    Case("weights-missing", ("inspect", "{m}:tiny", "--weights", "{w}/nothing.pt"), 2, "no such file", early=True),
    Case("weights-do-not-match", ("inspect", "torchvision:resnet18", "--weights", "{w}/state.pt"), 1,
         "do not match the model"),
    # --- 5: every output location is checked before loading
    Case("output-parent-is-a-file", (*FOLD_TINY, "-o", "{w}/notadir/out.pt"), 2, "notadir is not a directory",
         early=True),
    Case("output-is-a-folder", ("reset", "{m}:tiny", "-o", "{w}/images"), 2, "is a directory", early=True),
    Case("export-not-writable", (*FOLD_TINY, "-o", "{w}/ok.pt", "--export", "/proc/fxnorm-test.pt2"), 2,
         "cannot write --export /proc/fxnorm-test.pt2: cannot create files in /proc", early=True),
    # --- 7: --mean/--std
    Case("one-mean-for-all-channels", (*RECAL_TINY, "--data", "{w}/images", "--image-size", "8", "--mean", "0.5",
                                       "--std", "0.25"), 0, made=("out.pt",)),
    Case("two-means", (*RECAL_TINY, "--data", "{w}/images", "--mean", "0.5", "0.5"), 2,
         "--mean needs 3 values (R G B) or 1 for every channel, got 2", early=True),
    Case("zero-std", (*RECAL_TINY, "--data", "{w}/images", "--std", "0"), 2, "--std values must be positive",
         early=True),
    Case("nan-std", (*RECAL_TINY, "--data", "{w}/images", "--std", "nan"), 2, "--std values must be finite",
         early=True),
    Case("mean-with-tensor-data", (*RECAL_TINY, "--data", "{w}/data.pt", "--mean", "0.5"), 2,
         "--mean apply to a folder of images", early=True),
    Case("image-size-with-tensor-data", (*RECAL_TINY, "--data", "{w}/data.pt", "--image-size", "8"), 2,
         "--image-size apply to a folder of images", early=True),
    # --- 8: norms that could not be recalibrated
    Case("partial-recalibration", ("recalibrate", "{m}:partly_usable", "--data", "{w}/onepix.pt", "-o",
                                   "{w}/out.pt"), 1, "1 norm(s) could not be recalibrated (5); nothing was saved: "
         "pass --allow-partial", warning="norm 5 was not recalibrated: every batch gave it one value per channel",
         process=True),
    Case("partial-allowed", ("recalibrate", "{m}:partly_usable", "--data", "{w}/onepix.pt", "-o", "{w}/out.pt",
                             "--allow-partial"), 0, made=("out.pt",), warning="norm 5 was not recalibrated"),
    # --- 9: small ones
    Case("bogus-tablefmt", ("inspect", "--tablefmt", "bogus"), 2, "unknown table format 'bogus'", early=True),
    Case("unknown-leaf", ("inspect", "torchvision:resnet18", "--leaf", "layer5"), 2,
         "--leaf layer5: the model has no submodule named 'layer5'. Did you mean layer4"),
    Case("bad-tolerance", ("fold", "--tolerance", "-1"), 2, "argument --tolerance: '-1' must be positive", early=True),
    Case("no-command", (), 2, "the following arguments are required: COMMAND", early=True),
    Case("strict-fold-names-each-norm", ("fold", "{m}:unfoldable", "--strict", "-o", "{w}/s.pt"), 1,
         "1 batch norm(s) cannot fold exactly"),  # and one detail line per norm (stderr, JSON "details")
    Case("check-fails", (*FOLD_TINY, "--check", "--tolerance", "1e-30", "-o", "{w}/f.pt"), 1,
         "exceeds the tolerance 1e-30; nothing was saved"),
]


def _argv(case: Case, module: str, folder: Path) -> list[str]:
    return [a.format(m=module, w=folder) for a in case.argv]


def _check(case: Case, folder: Path, before: dict[str, str], code: int, err: str, module: str) -> None:
    assert code == case.exit, err
    assert "Traceback" not in err and "\x1b[" not in err and "weights_only=False" not in err, err
    causes = [line for line in err.splitlines() if line.startswith("fxnorm: error: ")]
    if case.exit == 0:
        assert causes == [], err
    else:
        assert len(causes) == 1, err
        assert case.cause.format(m=module, w=folder) in causes[0], err
        assert not causes[0].startswith(("fxnorm: error: fxnorm: ", "fxnorm: error: fxnorm "))  # no doubled prefix
    if case.early:
        assert "loading " not in err, err
    if case.warning:
        assert any(line.startswith("fxnorm: warning: ") and case.warning in line for line in err.splitlines()), err
    after = snapshot(folder)
    assert {p: h for p, h in after.items() if p in before} == before  # no input changed, none removed
    assert sorted(set(after) - set(before)) == sorted(case.made)  # no partial output, no temporary file


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, models: tuple[str, Path], workspace: Path, capfd: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    if any(a.startswith("/proc/") for a in case.argv) and not os.path.isdir("/proc"):
        pytest.skip("needs /proc (a folder where no file can be created, even by root)")
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    code = main(_argv(case, models[0], workspace))
    out, err = capfd.readouterr()
    _check(case, workspace, before, code, err, models[0])
    if case.exit == 0 or not case.argv:
        return
    for made in case.made:  # run again, in JSON, on the same inputs
        os.remove(workspace / made)
    code = main([*_argv(case, models[0], workspace), "--format", "json"])
    out, err = capfd.readouterr()
    _check(case, workspace, before, code, err, models[0])
    report = json.loads(out)  # stdout is one JSON object
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("fxnorm: error: "))
    assert report["error"] == lines[at][len("fxnorm: error: "):] and report["exit"] == case.exit
    details = [line.strip() for line in lines[at + 1:] if line.strip() and not line.startswith("(run with --verbose")]
    assert report.get("details", []) == details
    if case.id == "strict-fold-names-each-norm":
        assert details[0].startswith("- 2 (BatchNorm2d): ") and not details[1].startswith("-")


def _env(models: tuple[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(models[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("case", [c for c in CASES if c.process], ids=lambda c: c.id)
def test_bad_input_in_a_process(case: Case, models: tuple[str, Path], workspace: Path) -> None:
    before = snapshot(workspace)
    done = subprocess.run([sys.executable, "-m", "fxnorm", *_argv(case, models[0], workspace)], capture_output=True,
                          text=True, cwd=workspace, env=_env(models), timeout=300)
    _check(case, workspace, before, done.returncode, done.stderr, models[0])


def test_weights_from_a_training_checkpoint(models: tuple[str, Path], workspace: Path, capsys) -> None:
    """torchvision's reference scripts save {"model", "optimizer", "args": argparse.Namespace, "epoch"}:
    its weights load, and the code its pickle holds does not run."""
    module = __import__(models[0])
    with torch.no_grad():
        changed = module.tiny().eval()
        changed[1].running_var.fill_(4.0)
        changed[1].num_batches_tracked.fill_(9)
    args = argparse.Namespace(payload=Payload(workspace / "pwned"))
    torch.save({"model": {f"module.{k}": v for k, v in changed.state_dict().items()}, "args": args},
               workspace / "trained.pth")
    code = main(["reset", f"{models[0]}:tiny", "--weights", str(workspace / "trained.pth"), "-o",
                 str(workspace / "out.pt"), "--select", "nothing*", "-q"])
    assert code == 1  # no norm selected: reset fails, but only after the weights were read
    code = main(["inspect", f"{models[0]}:tiny", "--weights", str(workspace / "trained.pth"), "--format", "json"])
    norms = json.loads(capsys.readouterr().out)["norms"]
    assert code == 0 and norms[0]["num_batches_tracked"] == 9
    assert not (workspace / "pwned").exists()


def test_a_failed_writer_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.pt").write_text("old")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_outputs([(str(tmp_path / "a.pt"), lambda tmp: Path(tmp).write_text("new")),
                       (str(tmp_path / "b.pt"), interrupted)])
    assert snapshot(tmp_path) == {"a.pt": hashlib.sha256(b"old").hexdigest()}  # the old file is untouched


# ------------------------------------------------------------------------- signals and pipes


def _interrupt_when(argv: list[str], marker: str, models: tuple[str, Path], cwd: Path,
                    first_path: Path | None = None) -> tuple[int, str]:
    """Start ``python -m fxnorm argv`` (``first_path`` first on its import path), send SIGINT once
    ``marker`` is on its stderr; (exit, stderr)."""
    env = _env(models)
    if first_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(first_path), env["PYTHONPATH"]])
    # a suite started in the background (``pytest &``) passes SIGINT ignored to its children, and
    # Python then never installs its handler: give the child the default disposition
    proc = subprocess.Popen([sys.executable, "-m", "fxnorm", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)  # type: ignore[union-attr]
    reader.start()
    seen = []
    try:
        while not seen or marker not in seen[-1]:
            seen.append(lines.get(timeout=240))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=30)
    while not lines.empty():
        seen.append(lines.get())
    return code, "".join(seen)


@pytest.mark.parametrize("where", ["startup", "import", "recalibration", "saving"])
def test_ctrl_c_exits_130_and_leaves_nothing(where: str, models: tuple[str, Path], workspace: Path,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ctrl-C while fxnorm itself is imported (a slow ``tqdm`` stands in for torch's import), while
    the user's model module is imported, during a recalibration and while saving."""
    name = f"slow_import_{uuid.uuid4().hex[:8]}"
    (workspace / f"{name}.py").write_text("import sys, time\nprint('fxnorm-test: importing', file=sys.stderr, "
                                          "flush=True)\ntime.sleep(120)\n")
    argv = {
        "startup": ["inspect", f"{models[0]}:tiny"],
        "import": ["inspect", f"{name}:net"],
        "recalibration": ["recalibrate", f"{models[0]}:sleepy", "--data", "data.pt", "-o", "out.pt"],
        "saving": ["reset", f"{models[0]}:slow_to_save", "-o", "out.pt"],
    }[where]
    marker = {"startup": "importing", "import": "importing", "recalibration": "forward", "saving": "pickling"}[where]
    before = snapshot(workspace)
    shadow = None
    if where == "startup":
        shadow = tmp_path_factory.mktemp("shadow")
        (shadow / "tqdm.py").write_text("import sys, time\nprint('fxnorm-test: importing tqdm', file=sys.stderr, "
                                        "flush=True)\ntime.sleep(120)\n")
    code, err = _interrupt_when(argv, f"fxnorm-test: {marker}", models, workspace, shadow)
    assert code == 130, err
    assert "Traceback" not in err and "fxnorm: error: interrupted; nothing was saved" in err.splitlines(), err
    assert snapshot(workspace) == before  # no output, no temporary file


def test_closed_stdout_ends_quietly(models: tuple[str, Path], tmp_path: Path) -> None:
    """``fxnorm inspect | head -2`` where head is gone before fxnorm writes: exit 141, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "fxnorm", "inspect", f"{models[0]}:tiny", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=_env(models))
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=300) == 141
    assert err == ""  # no BrokenPipeError, no "Exception ignored"
