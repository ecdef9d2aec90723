"""fxnorm.cli.launch without processes: torchrun's environment, the shards, rank 0's write."""

from __future__ import annotations

import pytest
import torch

from fxnorm.cli.launch import Launch, ShardedBatches, launched, on_rank_zero, process_group
from fxnorm.errors import UsageError

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launched_reads_torchrun_environment(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    assert launched() is None
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    assert launched() == Launch(rank=1, world=3, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None  # one process: nothing to pool
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UsageError, match="must be integers"):
        launched()


def test_shards_cover_every_batch_once_in_order():
    data = list(range(11))
    shards = [list(ShardedBatches(data, rank, 3, None)) for rank in range(3)]
    assert sorted(sum(shards, [])) == data and shards[0] == [0, 3, 6, 9]
    assert [len(ShardedBatches(data, rank, 3, 4)) for rank in range(3)] == [2, 1, 1]  # --num-batches 4 in all


def test_one_process_runs_the_action_and_keeps_no_group(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    done = []
    with process_group(torch.device("cpu")) as (launch, device):
        assert launch is None and device == torch.device("cpu")
        on_rank_zero(launch, lambda: done.append(1))
    assert done == [1]
    with pytest.raises(OSError):
        on_rank_zero(None, lambda: (_ for _ in ()).throw(OSError("disk full")))
