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
