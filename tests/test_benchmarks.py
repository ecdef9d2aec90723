"""The recalibration benchmark (examples/benchmarks/bench_recalibrate.py) on a small configuration:
its loaders are what it says (the shuffled one holds the same images in the same batch sizes) and
the errors it reports separate fxnorm from update_bn the way the docs claim."""

from __future__ import annotations

import argparse

import pytest
import torch
from scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_recalibrate", "examples", "benchmarks", "bench_recalibrate.py")


def test_loaders_drift_and_shuffle_the_same_images(bench):
    batches = bench.make_batches(4, 6, 8, "cpu")
    assert [b.shape[0] for b in batches] == [6, 6, 6, 2]  # a short last batch
    means = [float(b.mean()) for b in batches]
    assert means == sorted(means) and means[-1] - means[0] > 0.2  # drifting by 0.1 per batch
    mixed = bench.shuffled(batches)
    assert [b.shape[0] for b in mixed] == [6, 6, 6, 2]
    flat = torch.cat(batches).flatten(1)
    mixed_flat = torch.cat(mixed).flatten(1)
    assert not torch.equal(flat, mixed_flat)
    assert torch.equal(flat[flat[:, 0].argsort()], mixed_flat[mixed_flat[:, 0].argsort()])  # a permutation


def test_benchmark_reports_exact_fxnorm_statistics_and_biased_update_bn(bench, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = argparse.Namespace(batches=4, batch_size=4, size=32, rounds=1, device="cpu")
        rows = {r["method"]: r for r in bench.run("resnet18", args)}
    finally:
        torch.set_num_threads(threads)
    assert "resnet18: 4 batches of 4x3x32x32" in capsys.readouterr().out
    fx, ub, ev = rows["fxnorm.recalibrate"], rows["swa_utils.update_bn"], rows["eval forward"]
    assert ev["throughput_vs_eval"] == 1.0 and ev["var_rel_err"] is None
    for suffix in ("", "_shuffled"):
        assert fx["own_inputs_var_rel_err" + suffix] < 1e-6
        # against a separate reference forward, 1x1 feature maps of 4 samples magnify float32 rounding
        assert ub["var_rel_err" + suffix] > 10 * fx["var_rel_err" + suffix]
    assert all(r["img_s"] > 0 and r["peak_mb"] >= 0 for r in rows.values())


def test_warm_heap_timings_join_the_fresh_rows(bench):
    fresh = [{"model": "m", "method": k, "img_s": s, "throughput_vs_eval": s / 10, "cpu_time_vs_eval": s / 10,
              "fxnorm_speedup": 9 / s, "var_rel_err": e} for k, s, e in (("eval forward", 10, None),
                                                                          ("fxnorm.recalibrate", 9, 1e-7))]
    warm = [dict(r, img_s=r["img_s"] * 2, throughput_vs_eval=r["throughput_vs_eval"] - 0.05, var_rel_err=None)
            for r in reversed(fresh)]
    rows = {r["method"]: r for r in bench.merge_heaps(fresh, warm)}
    fx = rows["fxnorm.recalibrate"]
    assert fx["img_s"] == 9 and fx["img_s_warm_heap"] == 18  # matched by method, not by position
    assert fx["throughput_vs_eval_warm_heap"] == pytest.approx(0.85) and fx["var_rel_err"] == 1e-7
    # the warm heap keeps freed blocks up to 32 MB (glibc's largest mmap threshold) and never trims
    assert int(bench.WARM_HEAP_ENV["MALLOC_MMAP_THRESHOLD_"]) == 32 * 2**20


def test_a_model_runs_in_its_own_process_with_the_warm_heap(bench, capfd):
    args = argparse.Namespace(batches=2, batch_size=2, size=32, rounds=1, device="cpu", threads=1)
    rows = {r["method"]: r for r in bench.run_isolated("resnet18", args, "warm")}
    assert "resnet18: 2 batches of 2x3x32x32 (last 2)" in capfd.readouterr().out  # printed by the child
    assert {"eval forward", "fxnorm.recalibrate", "swa_utils.update_bn"} <= set(rows)
    fx = rows["fxnorm.recalibrate"]
    assert fx["img_s"] > 0 and fx["fxnorm_speedup"] == 1.0
    assert fx["var_rel_err"] is None  # the warm heap is timed only


@pytest.fixture(scope="module")
def checks():
    return load_script("device_checks", "examples", "benchmarks", "device_checks.py")


def test_device_checks_plan_runs_the_cuda_tests_and_both_benchmarks_on_the_device(checks, tmp_path):
    steps = checks.plan("cuda", str(tmp_path), quick=False)
    assert [s.name for s in steps] == ["tests", "fold", "recalibrate"]
    pytest_args = steps[0].argv[steps[0].argv.index("pytest"):]
    assert pytest_args[pytest_args.index("-m") + 1] == "cuda"
    for step in steps[1:]:
        assert step.argv[step.argv.index("--device") + 1] == "cuda" and step.json.startswith(str(tmp_path))
    assert sum(s.timeout for s in steps) <= 600  # fits one device call with time to rerun
    quick = checks.plan("cpu", str(tmp_path), quick=True, only=("fold",))
    assert [s.name for s in quick] == ["fold"] and "--size" in quick[0].argv


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_device_checks_without_a_gpu_names_the_dry_run(checks, capsys):
    with pytest.raises(SystemExit) as exit_info:
        checks.main(["--device", "cuda", "--out", "unused"])
    assert exit_info.value.code == 2 and "--device cpu --quick" in capsys.readouterr().err


def test_device_checks_summary_renders_each_step_and_benchmark_rows(checks):
    summary = {"info": {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11", "python": "3.11"},
               "steps": {"tests": {"rc": 0, "seconds": 12.5},
                         "fold": {"rc": 1, "seconds": 3.0, "rows": [{"model": "resnet18", "fold/fuse": 0.9}]}}}
    text = checks.render(summary)
    assert text.startswith("# Device checks on NVIDIA H200")
    assert "| tests  |      0 |      12.5 |" in text and "| resnet18 |" in text and "## fold" in text
