"""``torchrun --nproc_per_node 2 -m fxnorm recalibrate``: every process runs every 2nd batch, the
statistics are pooled, rank 0 alone prints the report (pooled totals) and writes the output; the
result equals one process on all the batches (to float32 noise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fxnorm.cli import main

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

REPO = Path(__file__).resolve().parents[2]

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn


    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                              nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
                              nn.BatchNorm1d(4))
        return model.eval()
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A folder holding a module of model factories and 23 samples of data (5 batches of 5, the last short)."""
    folder = tmp_path_factory.mktemp("torchrun")
    (folder / "torchrun_models.py").write_text(MODELS)
    gen = torch.Generator().manual_seed(0)
    torch.save(torch.randn(23, 3, 8, 8, generator=gen) * 2 + 1, folder / "data.pt")
    sys.path.insert(0, str(folder))
    yield folder, "torchrun_models"
    sys.path.remove(str(folder))
    sys.modules.pop("torchrun_models", None)


def torchrun(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fxnorm", *argv]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same_statistics(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_two_processes_equal_one(setup, capsys: pytest.CaptureFixture) -> None:
    folder, models = setup
    done = torchrun(folder, "recalibrate", f"{models}:net", "--data", "data.pt", "-o", "two.pt", "--batch-size", "5")
    assert done.returncode == 0, done.stderr
    assert main(["recalibrate", f"{models}:net", "--data", str(folder / "data.pt"), "-o", str(folder / "one.pt"),
                 "--batch-size", "5", "-q"]) == 0
    one = capsys.readouterr().out
    # one report, printed by rank 0, with the pooled totals: the same as one process's
    assert done.stdout.count("recalibrated 3 norm(s) on 5 batch(es), 23 sample(s)") == 1, done.stdout
    assert done.stdout.splitlines()[0] == one.splitlines()[0]
    assert done.stdout.count("saved two.pt") == 1
    assert done.stderr.count("CalibrationWarning") == 1  # batches of 5: warned once, by rank 0
    assert sorted(os.listdir(folder)) == ["data.pt", "one.pt", "torchrun_models.py", "two.pt"]  # no temporary file
    two_model, one_model = (torch.load(folder / f"{n}.pt", weights_only=False) for n in ("two", "one"))
    assert_same_statistics(statistics(two_model), statistics(one_model))
    assert int(two_model[1].num_batches_tracked) == 5


def test_num_batches_counts_all_processes_json(setup) -> None:
    folder, models = setup
    done = torchrun(folder, "recalibrate", f"{models}:net", "--data", "data.pt", "-o", "three.pt", "--batch-size", "5",
                    "--num-batches", "3", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert report["calibration"]["num_batches"] == 3 and report["calibration"]["num_samples"] == 15
    model = torch.load(folder / "three.pt", weights_only=False)
    assert int(model[1].num_batches_tracked) == 3
    (folder / "three.pt").unlink()


def test_a_failing_run_fails_every_process_and_writes_nothing(setup) -> None:
    folder, models = setup
    torch.save(torch.randn(10, 5, 8, 8), folder / "bad.pt")  # 5 channels: the model takes 3
    try:
        done = torchrun(folder, "recalibrate", f"{models}:net", "--data", "bad.pt", "-o", "bad_out.pt",
                        "--batch-size", "5")
    finally:
        (folder / "bad.pt").unlink()
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("fxnorm: error: batch 0: the model raised RuntimeError") == 2, done.stderr
    assert not (folder / "bad_out.pt").exists()
