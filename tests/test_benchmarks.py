"""The recalibration benchmark (examples/benchmarks/bench_recalibrate.py) on a small configuration:
its loaders are what it says (the shuffled one holds the same images in the same batch sizes) and
the errors it reports separate fxnorm from update_bn the way the docs claim. The designs benchmark
(bench_designs.py) counts what fxnorm folds and merges, and its docs section shows the stored figures."""

from __future__ import annotations

import argparse
import os

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


@pytest.mark.distributed
def test_scale_benchmark_runs_one_and_two_processes_and_both_orders(tmp_path):
    """examples/benchmarks/bench_scale.py, tiny: both process counts end with the same statistics, the
    sequential order takes one pass per level of resnet18, and the docs section renders its JSON."""
    import json
    import os
    import subprocess
    import sys

    from scripts import ROOT

    out = tmp_path / "scale.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "benchmarks", "bench_scale.py"),
                           "--batches", "4", "--batch-size", "4", "--size", "32", "--rounds", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["processes"] for r in data["processes"]] == [1, 2] and data["processes"][0]["speedup"] == 1.0
    assert all(r["img_s"] > 0 for r in data["processes"])
    assert data["processes"][1]["max_var_rel_diff"] < 1e-4  # the same statistics, to float32 noise
    assert {r["order"]: r["passes"] for r in data["orders"]} == {"joint": 1, "sequential": 17}
    tables = load_script("docs_tables", "examples", "benchmarks", "docs_tables.py")
    section = tables.scale_section({"scale": data})
    assert "speed-up" in section and "time vs joint" in section
    assert "sequential" in section and "Reproduce: `python examples/benchmarks/bench_scale.py" in section


@pytest.fixture(scope="module")
def designs():
    return load_script("bench_designs", "examples", "benchmarks", "bench_designs.py")


def test_designs_benchmark_counts_what_fxnorm_folds_and_merges(designs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {r["model"]: r for r in designs.coverage_rows([])}
        timing = designs.latency(size=16, batch=1, repeats=1, channels=8, blocks=2)
    finally:
        torch.set_num_threads(threads)
    assert set(rows) == set(designs.DESIGNS)
    for name, row in rows.items():  # every design folds (or merges) all its norms; torch's fuse none of these
        assert row["bn_left_fxnorm_merged"] == 0 and row["bn_left_fuse"] > 0 and row["rel_err"] < 1e-5, row
    rep = rows["RepVGG-style blocks"]
    assert rep["bn_left_fxnorm"] == 3 and rep["sums_merged"] == 4  # the identity norms go only with the merge
    assert timing["convs_folded"] == 4 and timing["convs_merged"] == 2 and timing["rel_err"] < 1e-5
    assert timing["merged/folded"] == pytest.approx(timing["merged_ms"] / timing["folded_ms"])


def test_designs_section_renders_the_stored_figures():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                    "benchmarks"))
    from docs_designs import designs_section

    row = {"model": "m", "bn_total": 2, "bn_left_fuse": "2 (fuse fails: TraceError)", "bn_left_fxnorm": 1,
           "bn_left_fxnorm_merged": 0, "sums_merged": 1, "rel_err": 1e-7}
    timing = {"blocks": 2, "channels": 8, "input": [1, 3, 16, 16], "repeats": 3, "eval_ms": 3.0, "folded_ms": 2.0,
              "merged_ms": 1.0, "merged/folded": 0.5, "merged/eval": 1 / 3, "convs_folded": 4, "convs_merged": 2,
              "rel_err": 1e-7}
    text = designs_section({"designs": {"meta": {"threads": 1}, "rows": [row], "latency": timing}})
    line = next(l for l in text.splitlines() if l.startswith("| m "))
    assert [c.strip() for c in line.strip("|").split("|")] == ["m", "2", "2 (fuse fails)", "1", "0", "1", "1.0e-07"]
    assert "| 3.00 | 2.00 | 1.00 | 0.50 | 0.33 | 1.0e-07 |" in " ".join(text.split())
