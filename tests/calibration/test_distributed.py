"""Recalibration across real processes: 2 and 3 CPU processes (``torch.multiprocessing``, gloo, a
``FileStore``, finite timeouts), each with its own shard of the data — different batch counts and
sizes, one rank with the short batch. Every rank must end with the statistics of one process on all
the data, to float32 noise (both are compared with a float64 run); a rank that fails (its loader
raises, NaN data, a bad ``select``) or that recalibrates other norms makes every rank raise, leaving
every model unchanged, instead of leaving the others waiting.

The scenarios run in :mod:`distributed_ranks`; each world size is spawned once for all of them (each
scenario in a fresh process group), so the whole file takes seconds, not minutes. Marked
``distributed`` (``pytest -m distributed`` runs only these; they are part of the default suite).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import distributed_ranks as ranks
from fxnorm import fold, recalibrate, report_of, FoldReport

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]

#: seconds a collective may wait (a scenario that hangs fails after this) and the whole spawn may take
GROUP_TIMEOUT, SPAWN_TIMEOUT = 30, 300
#: (world size, scenario): one spawn of 3 processes runs them all; a 2-process scenario leaves rank 2 out
SCENARIOS = [(2, name) for name in ("equal", "loader_raises", "non_finite", "prepare_fails", "different_norms",
                                    "different_select", "sync_batch_norm", "ddp", "sequential",
                                    "rank_zero_write_fails")]
SCENARIOS += [(3, name) for name in ("equal", "empty_rank", "loader_raises", "non_finite")]


def spawn(processes: int, scenarios: list[tuple[int, str]], folder: str) -> list[dict]:
    """Run the scenarios on ``processes`` processes; every rank's outcomes (a crash or a hang fails the test)."""
    context = mp.start_processes(ranks.run_rank, args=(folder, scenarios, GROUP_TIMEOUT), nprocs=processes,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {processes} processes did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(processes)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every scenario's outcome, by rank, then by ``(world, name)``."""
    return spawn(3, SCENARIOS, str(tmp_path_factory.mktemp("ranks")))


def outcomes(results: list[dict], world: int, name: str) -> list[dict]:
    found = [r[world, name] for r in results[:world]]
    for rank, outcome in enumerate(found):
        assert "crashed" not in outcome, f"rank {rank} crashed:\n{outcome['crashed']}"
    return found


def one_process(batches: list[torch.Tensor], dtype: torch.dtype = torch.float32,
                order: str = "joint") -> dict[str, torch.Tensor]:
    model = recalibrate(ranks.net().to(dtype), [b.to(dtype) for b in batches], order=order)
    return model.state_dict()


def assert_statistics(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    """Every running mean within ``tol`` standard deviations, every running variance within ``tol``
    relative, every ``num_batches_tracked`` equal."""
    for key, ref in reference.items():
        got = state[key]
        if key.endswith("num_batches_tracked"):
            assert int(got) == int(ref), key
        elif key.endswith("running_mean"):
            std = reference[key.replace("running_mean", "running_var")].double().sqrt()
            assert ((got.double() - ref.double()).abs() / std).max().item() <= tol, key
        elif key.endswith("running_var"):
            assert ((got.double() - ref.double()).abs() / ref.double()).max().item() <= tol, key
        else:  # weights: untouched
            assert torch.equal(got, ref.to(got.dtype)), key


STAT_KEYS = [f"{layer}.{buffer}" for layer in ("1", "4", "7", "12")
             for buffer in ("running_mean", "running_var", "num_batches_tracked")]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_ends_with_the_statistics_of_one_process_on_all_the_data(results, world):
    found = outcomes(results, world, "equal")
    data = ranks.all_batches()
    float32, float64 = one_process(data), one_process(data, torch.float64)
    assert_statistics(float32, float64)  # one process is float32 noise away from float64 ...
    for rank, outcome in enumerate(found):
        assert outcome["error"] is None and outcome["result_is_model"], (rank, outcome["error"])
        assert_statistics(outcome["state"], float64)  # ... and so is every rank
        assert_statistics(outcome["state"], float32)
        for key in STAT_KEYS:  # the same statistics on every rank, bit for bit
            assert torch.equal(outcome["state"][key], found[0]["state"][key]), (rank, key)
        report = outcome["report"]  # the pooled totals, on every rank
        assert report["num_batches"] == len(data) and report["num_samples"] == sum(ranks.BATCH_SIZES)
        assert [layer["name"] for layer in report["layers"]] == ["1", "4", "7", "12"]
        assert all(layer["batches"] == len(data) for layer in report["layers"])
        assert report["layers"][0]["count"] == sum(ranks.BATCH_SIZES) * 64
    assert int(found[0]["state"]["1.num_batches_tracked"]) == len(data)


def test_a_rank_without_batches_takes_part(results):
    """More ranks than batches: a rank with no batch adds nothing and writes what the others saw."""
    found = outcomes(results, 3, "empty_rank")
    kept = [b for rank in (0, 2) for b in ranks.shard(rank, 3)]
    float64 = one_process(kept, torch.float64)
    for outcome in found:
        assert outcome["error"] is None
        assert_statistics(outcome["state"], float64)
        assert outcome["report"]["num_batches"] == len(kept)


@pytest.mark.parametrize("world,name,own_error,own_message", [
    (2, "loader_raises", "DataError", "reading calibration batch 1 failed: OSError: disk gone"),
    (3, "loader_raises", "DataError", "reading calibration batch 1 failed: OSError: disk gone"),
    # the NaN reaches every norm; the InstanceNorm's eager check may name it first
    (2, "non_finite", "NonFiniteStatistics", "NaN/Inf"),
    (3, "non_finite", "NonFiniteStatistics", "NaN/Inf"),
    (2, "prepare_fails", "CalibrationError", "select='no_such_norm' matches none of the 4 norms"),
])
def test_a_failing_rank_makes_every_rank_raise_and_changes_no_model(results, world, name, own_error, own_message):
    found = outcomes(results, world, name)
    failing = 1 if name == "prepare_fails" else world - 1
    for rank, outcome in enumerate(found):
        assert outcome["error"] is not None, f"rank {rank} did not raise"
        kind, message = outcome["error"]
        if rank == failing:
            assert kind == own_error and own_message in message, (kind, message)
            assert name != "non_finite" or message.startswith("batch 1: "), message
        else:
            assert kind == "CalibrationError", (kind, message)
            assert message.startswith(f"process(es) {failing} of {world} failed to recalibrate"), message
            assert "no process wrote any statistic" in message
        assert outcome["unchanged"] == "", (rank, outcome["unchanged"])


@pytest.mark.parametrize("name", ["different_norms", "different_select"])
def test_ranks_that_recalibrate_different_norms_all_raise(results, name):
    counts = "process 0: 4, process 1: 4" if name == "different_norms" else "process 0: 4, process 1: 2"
    for rank, outcome in enumerate(outcomes(results, 2, name)):
        assert outcome["error"] is not None, f"rank {rank} did not raise"
        kind, message = outcome["error"]
        assert kind == "CalibrationError" and message.startswith(
            f"the processes recalibrate different norms ({counts} norm(s); the names, kinds or channel counts differ)"
        ), message
        assert "same model with the same select=" in message
        assert outcome["unchanged"] == "", (rank, outcome["unchanged"])


def revert_sync_batch_norm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm back to BatchNorm1d/2d (by the input rank it was made for), sharing every tensor."""
    if isinstance(module, nn.SyncBatchNorm):
        cls = nn.BatchNorm2d if module.weight.shape[0] == 6 else nn.BatchNorm1d  # this model's layout
        plain = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        return plain.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batch_norm(child))
    return module


def test_sync_batch_norm_recalibrates_and_folds_after_converting_back(results):
    """SyncBatchNorm runs its eval-mode path during calibration: it is recalibrated like any batch
    norm, pooled over the ranks; converted back to BatchNorm2d/1d, the model folds exactly."""
    data = ranks.all_batches()
    float64 = one_process(data, torch.float64)
    for outcome in outcomes(results, 2, "sync_batch_norm"):
        assert outcome["error"] is None and outcome["report"]["layers"][0]["kind"] == "SyncBatchNorm"
        assert_statistics(outcome["state"], float64)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(ranks.net()).eval()
    synced.load_state_dict(outcome["state"])
    model = revert_sync_batch_norm(synced).eval()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = data[0]
    with torch.no_grad():
        expected = model(x)
        folded = fold(model, example_inputs=(x,))
        got = folded(x)
    # both BatchNorm2d and the tracked InstanceNorm2d into their convs, the BatchNorm1d into the linear layer
    assert [f.name for f in report_of(folded, FoldReport).folded] == ["1", "4", "7", "12"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ddp_wrapped_model_is_recalibrated_through_its_module(results):
    """The wrapper is returned; its module holds the pooled statistics on every rank. (DDP's own
    forward would broadcast the buffers at every batch, and hang with unequal shards.)"""
    float64 = one_process(ranks.all_batches(), torch.float64)
    for outcome in outcomes(results, 2, "ddp"):
        assert outcome["error"] is None and outcome["result_is_model"]
        assert_statistics(outcome["state"], float64)
        assert outcome["report"]["num_batches"] == len(ranks.BATCH_SIZES)


def test_sequential_order_pools_every_level_over_the_ranks(results):
    float64 = one_process(ranks.all_batches(), torch.float64, order="sequential")
    for outcome in outcomes(results, 2, "sequential"):
        assert outcome["error"] is None, outcome["error"]
        assert_statistics(outcome["state"], float64, tol=1e-5)
        report = outcome["report"]
        assert report["passes"] == 4 and report["levels"] == [["1"], ["4"], ["7"], ["12"]]
        assert report["num_batches"] == len(ranks.BATCH_SIZES)


def test_a_failed_write_on_rank_zero_fails_every_rank(results):
    """The CLI's output is written by rank 0 alone; when that fails, the other ranks do not report success."""
    zero, one = outcomes(results, 2, "rank_zero_write_fails")
    assert zero == {"error": ("OSError", "disk full"), "ran": [0]}
    assert one == {"error": ("FxNormError", "process 0 could not write the output (its error says why)"), "ran": []}
