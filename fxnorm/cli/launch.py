"""``fxnorm recalibrate`` under ``torchrun``: one process per rank, each running every N-th batch.

``torchrun --nproc_per_node N -m fxnorm recalibrate MODEL --data D -o OUT`` starts N copies of the
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`process_group` initializes ``torch.distributed`` from them (gloo on the CPU; NCCL with
``--device cuda``, each rank on GPU ``LOCAL_RANK``), :class:`ShardedBatches` gives rank ``r`` the
batches ``r, r + N, r + 2N, ...`` of the data (after ``--num-batches``, in the same order on every
rank), the statistics are pooled (:mod:`fxnorm.calibration.distributed`), and
:func:`on_rank_zero` has rank 0 alone write the output while every rank learns whether it did.
A process group the command finds already initialized is used as it is and left open.

Example:
    >>> [list(ShardedBatches(list("abcdefg"), rank, 3, limit=None)) for rank in range(3)]
    [['a', 'd', 'g'], ['b', 'e'], ['c', 'f']]
    >>> list(ShardedBatches(list("abcdefg"), 1, 2, limit=5)), launched() is None
    (['b', 'd'], True)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..calibration.distributed import collective_device
from ..errors import FxNormError, UsageError

__all__ = ["Launch", "launched", "process_group", "ShardedBatches", "on_rank_zero"]

#: what ``torchrun`` sets for every process (``LOCAL_RANK`` is optional: 0)
_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int = 0


def launched() -> Launch | None:
    """The rank, world size and local rank ``torchrun`` set; None outside it (or for one process).

    Raises:
        UsageError: the variables are not integers.
    """
    if not all(os.environ.get(name) for name in _ENVIRONMENT):
        return None
    try:
        launch = Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return launch if launch.world > 1 else None


def _device_of_rank(device: torch.device, launch: Launch) -> torch.device:
    """``--device cuda`` under torchrun: GPU ``LOCAL_RANK`` (each rank needs its own)."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise UsageError(f"--device {device} under torchrun: give --device cuda, and each process takes GPU "
                         "LOCAL_RANK")
    if launch.local_rank >= torch.cuda.device_count():
        raise UsageError(f"--device cuda under torchrun: process {launch.rank} (LOCAL_RANK {launch.local_rank}) has "
                         f"no GPU of its own ({torch.cuda.device_count()} on this machine): start at most that many "
                         "processes per machine, or use --device cpu")
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Launch | None, torch.device]]:
    """This process's :class:`Launch` (None: one process) and its device, with ``torch.distributed``
    initialized for the block when ``torchrun`` started it (and destroyed after)."""
    if dist.is_available() and dist.is_initialized():
        given = Launch(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        yield (given if given.world > 1 else None), device
        return
    launch = launched()
    if launch is None:
        yield None, device
        return
    if not dist.is_available():
        raise UsageError("started by torchrun, but this PyTorch has no torch.distributed")
    device = _device_of_rank(device, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank, world_size=launch.world)
    try:
        yield launch, device
        # every rank done with every collective before any tears its connections down (gloo aborts
        # a process whose peer closed while its own work objects were still alive)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class ShardedBatches:
    """Rank ``rank``'s batches of ``data``: those at ``rank, rank + world, ...`` among its first
    ``limit`` (all when None); ``data`` is indexable and has a length."""

    def __init__(self, data: Sequence[Any], rank: int, world: int, limit: int | None) -> None:
        self.data = data
        end = len(data) if limit is None else min(limit, len(data))
        self.indices = range(rank, end, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices:
            yield self.data[i]


def on_rank_zero(launch: Launch | None, action: Callable[[], Any]) -> None:
    """Run ``action`` on rank 0 only (every process when not distributed); every rank learns whether
    it succeeded (one collective), and the others raise an :class:`~fxnorm.errors.FxNormError` when
    it did not, so that no rank reports success for an output that was not written."""
    if launch is None:
        action()
        return
    error: BaseException | None = None
    if launch.rank == 0:
        try:
            action()
        except BaseException as err:  # told to the other ranks first, then raised
            error = err
    flag = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    with contextlib.suppress(Exception):
        dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item():
        raise FxNormError("process 0 could not write the output (its error says why)")
