"""What every rank of a real multi-process group runs for ``test_distributed.py``: the model, the
data and its shards, and one function per scenario.

:func:`run_rank` is the entry point of each spawned process (``torch.multiprocessing``, gloo on the
CPU, one intra-op thread): for every scenario it joins a fresh process group (its own ``FileStore``
and a finite timeout, so a scenario that hangs fails alone), runs the scenario, and keeps what it
returned — the model's ``state_dict``, the error it raised, whether the model is unchanged — or the
traceback of a crash. The test process reads them back (```rank<N>.pt``) and compares them with one
process on all the data and with a float64 run.

Example:
    >>> [len(shard(0, 2)), len(shard(1, 2))], [sum(len(b) for b in shard(r, 3)) for r in range(3)]
    ([4, 3], [22, 13, 10])
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fxnorm import CalibrationReport, FxNormError, recalibrate, report_of
from helpers import assert_model_unchanged, model_snapshot, randomize_norms

__all__ = ["BATCH_SIZES", "SHARDS", "SCENARIOS", "net", "all_batches", "shard", "run_rank"]

#: Batch sizes of the whole data, in order (unequal; the last one short).
BATCH_SIZES = (8, 6, 8, 8, 5, 7, 3)
#: Which batches each rank gets, by world size: different counts and sizes, one rank with the short batch.
SHARDS = {2: [[0, 1, 2, 3], [4, 5, 6]], 3: [[0, 1, 2], [3, 4], [5, 6]]}


def net(width: int = 6, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU, a conv and a tracked InstanceNorm, a 1x1 conv-BN-ReLU, a linear layer and a
    BatchNorm1d (norms ``1``, ``4``, ``7``, ``12``); random statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width, affine=True, track_running_stats=True), nn.ReLU(),
        nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4), nn.BatchNorm1d(4),
    )
    return randomize_norms(model, seed).eval()


def all_batches(sizes: tuple[int, ...] = BATCH_SIZES) -> list[torch.Tensor]:
    """Unshuffled batches whose mean and spread drift from batch to batch (pooling across ranks counts)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=gen) * (1 + 0.2 * i) + 0.5 * i for i, n in enumerate(sizes)]


def shard(rank: int, world: int, sizes: tuple[int, ...] = BATCH_SIZES) -> list[torch.Tensor]:
    """The batches of ``rank``."""
    data = all_batches(sizes)
    return [data[i] for i in SHARDS[world][rank]]


def _outcome(model: nn.Module, run: Callable[[], Any], snap: dict | None = None) -> dict[str, Any]:
    """Run ``run()``; keep the statistics, the report or the error, and whether a failure left the model unchanged."""
    try:
        result = run()
    except FxNormError as err:
        unchanged = ""
        if snap is not None:
            try:
                assert_model_unchanged(model, snap)
            except AssertionError as why:
                unchanged = f"changed: {why}"
        return {"error": (type(err).__name__, str(err)), "unchanged": unchanged}
    inner = getattr(result, "module", result)
    return {"error": None, "result_is_model": result is model,
            "state": {k: v.detach().clone() for k, v in inner.state_dict().items()},
            "report": report_of(result, CalibrationReport).to_dict()}


def equal(rank: int, world: int) -> dict[str, Any]:
    """Every rank its own shard: every rank must end with the statistics of all the data."""
    model = net()
    return _outcome(model, lambda: recalibrate(model, shard(rank, world)))


def empty_rank(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 has no batch at all (more ranks than batches): it takes part with nothing."""
    model = net()
    data = [] if rank == 1 else shard(rank, world)
    return _outcome(model, lambda: recalibrate(model, data))


def loader_raises(rank: int, world: int) -> dict[str, Any]:
    """The loader of the last rank raises at its second batch."""
    model = net()
    snap = model_snapshot(model)
    data = shard(rank, world)

    def broken() -> Iterator[torch.Tensor]:
        yield data[0]
        raise OSError("disk gone")

    return _outcome(model, lambda: recalibrate(model, broken() if rank == world - 1 else data), snap)


def non_finite(rank: int, world: int) -> dict[str, Any]:
    """The second batch of the last rank holds a NaN."""
    model = net()
    snap = model_snapshot(model)
    data = shard(rank, world)
    if rank == world - 1:
        data[1] = data[1].clone()
        data[1][0, 1, 2, 3] = float("nan")
    return _outcome(model, lambda: recalibrate(model, data), snap)


def prepare_fails(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 selects a norm its model does not have: it fails before running any batch."""
    model = net()
    snap = model_snapshot(model)
    select = "no_such_norm" if rank == 1 else None
    return _outcome(model, lambda: recalibrate(model, shard(rank, world), select=select), snap)


def different_norms(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 recalibrates another model (wider norms)."""
    model = net(width=8 if rank == 1 else 6)
    snap = model_snapshot(model)
    return _outcome(model, lambda: recalibrate(model, shard(rank, world)), snap)


def different_select(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 recalibrates only two of the norms."""
    model = net()
    snap = model_snapshot(model)
    select = ["1", "4"] if rank == 1 else None
    return _outcome(model, lambda: recalibrate(model, shard(rank, world), select=select), snap)


def sync_batch_norm(rank: int, world: int) -> dict[str, Any]:
    """The model as DDP users train it: every BatchNorm converted to SyncBatchNorm."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(net()).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 3
    return _outcome(model, lambda: recalibrate(model, shard(rank, world)))


def ddp(rank: int, world: int) -> dict[str, Any]:
    """A DistributedDataParallel wrapper (buffers broadcast at every forward of the wrapper): with
    unequal shards, running the batches through it would hang; recalibrate runs its module."""
    wrapper = nn.parallel.DistributedDataParallel(net())
    out = _outcome(wrapper, lambda: recalibrate(wrapper, shard(rank, world)))
    return out


def sequential(rank: int, world: int) -> dict[str, Any]:
    """``order="sequential"``: every level pooled over the ranks before the next level's pass."""
    model = net()
    return _outcome(model, lambda: recalibrate(model, shard(rank, world), order="sequential"))


def rank_zero_write_fails(rank: int, world: int) -> dict[str, Any]:
    """fxnorm.cli.launch.on_rank_zero (what the CLI writes its output with): rank 0's write raises."""
    from fxnorm.cli.launch import Launch, on_rank_zero

    ran = []

    def write() -> None:
        ran.append(rank)
        raise OSError("disk full")

    try:
        on_rank_zero(Launch(rank, world), write)
    except (OSError, FxNormError) as err:
        return {"error": (type(err).__name__, str(err)), "ran": ran}
    return {"error": None, "ran": ran}


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    f.__name__: f for f in (equal, empty_rank, loader_raises, non_finite, prepare_fails, different_norms,
                            different_select, sync_batch_norm, ddp, sequential, rank_zero_write_fails)
}


def run_rank(rank: int, folder: str, scenarios: list[tuple[int, str]], timeout: float) -> None:
    """One spawned process: every ``(world, name)`` scenario it is part of (ranks below ``world``), each in
    a fresh gloo group; the outcomes saved to ``folder/rank<N>.pt`` by ``(world, name)``."""
    torch.set_num_threads(1)
    results: dict[tuple[int, str], Any] = {}
    for world, name in scenarios:
        if rank >= world:
            continue
        store = dist.FileStore(os.path.join(folder, f"store-{world}-{name}"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            results[world, name] = SCENARIOS[name](rank, world)
        except BaseException:
            results[world, name] = {"crashed": traceback.format_exc()}
        finally:
            dist.destroy_process_group()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
