"""Tests for fxnorm.stats: references are float64 statistics of the concatenated data."""

from __future__ import annotations

import threading
import types

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import float64_moments
from fxnorm.calibration import moments as stats
from fxnorm import CalibrationError
from fxnorm.calibration.moments import ChannelMoments, pooled_moments



def elementwise_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs() / expected.double().abs()).max().item()


def feed(batches: list[torch.Tensor], channel_dim: int = 1) -> ChannelMoments:
    est = ChannelMoments(batches[0].shape[channel_dim])
    for b in batches:
        est.update(b, channel_dim)
    return est


def assert_same_totals(a: ChannelMoments, b: ChannelMoments, rtol: float = 1e-12) -> None:
    assert a.count == b.count
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=0.0)
    torch.testing.assert_close(a.m2, b.m2, rtol=rtol, atol=0.0)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_varying_batch_sizes_and_short_last_batch(gen):
    batches = [torch.randn(n, 5, 3, 3, generator=gen) * 2 + 1 for n in (7, 16, 16, 3)]
    est = feed(batches)
    mean, var, n = float64_moments(batches)
    assert est.count == n == 42 * 9
    assert elementwise_rel_err(est.mean, mean) <= 1e-6
    assert elementwise_rel_err(est.variance(), var) <= 1e-6
    assert est.mean.dtype == est.variance().dtype == torch.float64


def test_drifting_unshuffled_data_beats_equal_weight_averaging(gen):
    # Sorted data: the batch means drift from 0 to 15 and the last batch is short.
    batches = [torch.randn(32, 4, generator=gen) + 3.0 * b for b in range(5)]
    batches.append(torch.randn(4, 4, generator=gen) + 15.0)
    mean, var, _ = float64_moments(batches)
    # torch.optim.swa_utils.update_bn style: equal-weight average of per-batch statistics.
    naive_mean = torch.stack([b.double().mean(0) for b in batches]).mean(0)
    naive_var = torch.stack([b.double().var(0) for b in batches]).mean(0)
    assert elementwise_rel_err(naive_var, var) > 0.5  # loses the spread of the batch means
    assert elementwise_rel_err(naive_mean, mean) > 0.05  # over-weights the short last batch
    est = feed(batches)
    assert elementwise_rel_err(est.mean, mean) <= 1e-6
    assert elementwise_rel_err(est.variance(), var) <= 1e-6


def test_large_offset_has_no_catastrophic_cancellation(gen):
    batches = [(1e4 + 1e-2 * torch.randn(n, 3, 8, generator=gen, dtype=torch.float64)).float() for n in (50, 64, 9)]
    mean, var, _ = float64_moments(batches)  # float64 of the same float32 values
    flat = torch.cat([b.transpose(0, 1).reshape(3, -1) for b in batches], dim=1)
    cancelled = (flat * flat).mean(1) - flat.mean(1) ** 2  # E[x^2] - E[x]^2 in float32
    assert elementwise_rel_err(cancelled, var) > 1.0  # the test is sensitive to cancellation
    est = feed(batches)
    assert elementwise_rel_err(est.mean, mean) <= 1e-12
    assert elementwise_rel_err(est.variance(), var) <= 1e-6


@pytest.mark.parametrize(
    "shape, channel_dim",
    [((10, 6), 1), ((4, 6, 7), 1), ((3, 6, 5, 4), 1), ((2, 6, 3, 4, 5), 1), ((3, 5, 4, 6), -1), ((6, 9), 0)],
)
def test_ranks_and_channel_dims(gen, shape, channel_dim):
    batches = [torch.randn(shape, generator=gen) * 3 - 2 for _ in range(3)]
    est = feed(batches, channel_dim)
    mean, var, n = float64_moments(batches, channel_dim)
    assert est.count == n
    assert elementwise_rel_err(est.mean, mean) <= 1e-6 and elementwise_rel_err(est.variance(), var) <= 1e-6
    mean2, var2, n2 = pooled_moments(batches, channel_dim)
    assert n2 == n and elementwise_rel_err(mean2, mean) <= 1e-6 and elementwise_rel_err(var2, var) <= 1e-6


def test_channels_last_input(gen):
    batches = [torch.randn(n, 8, 5, 5, generator=gen).to(memory_format=torch.channels_last) + 4 for n in (4, 3)]
    assert not batches[0].is_contiguous()
    est = feed(batches)
    mean, var, _ = float64_moments(batches)
    assert elementwise_rel_err(est.mean, mean) <= 1e-6 and elementwise_rel_err(est.variance(), var) <= 1e-6
    batch_mean, batch_var = ChannelMoments(8).update(batches[0])
    ref_var, ref_mean = torch.var_mean(batches[0].contiguous(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(batch_mean, ref_mean)
    torch.testing.assert_close(batch_var, ref_var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(gen, dtype):
    batches = [(torch.randn(n, 4, 6, 6, generator=gen) * 0.5 + 2).to(dtype) for n in (8, 5)]
    est = ChannelMoments(4)
    batch_mean, batch_var = est.update(batches[0])
    assert batch_mean.dtype == batch_var.dtype == torch.float32
    est.update(batches[1])
    mean, var, _ = float64_moments(batches)  # float64 of the same half values
    assert elementwise_rel_err(est.mean, mean) <= 1e-6 and elementwise_rel_err(est.variance(), var) <= 1e-6


def test_merge_of_two_estimators_equals_one_estimator(gen):
    batches = [torch.randn(n, 3, 4, generator=gen, dtype=torch.float64) + 5 for n in (6, 2, 9, 1)]
    whole = feed(batches)
    a, b = feed(batches[:2]), feed(batches[2:])
    a.merge(b.count, b.mean, b.m2)
    assert_same_totals(a, whole)
    c = feed(batches[:2])
    c.merge(torch.tensor(b.count), b.mean.float().double(), b.m2)  # tensor count
    assert c.count == whole.count
    empty = ChannelMoments(3)
    empty.merge(whole.count, whole.mean, whole.m2)
    assert_same_totals(empty, whole)
    whole.merge(0, torch.zeros(3), torch.zeros(3))  # no-op
    assert whole.count == empty.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_returned_batch_statistics_match_var_mean(gen, dtype):
    est = ChannelMoments(5)
    est.update(torch.randn(4, 5, 3, generator=gen, dtype=dtype) + 7)  # later batches shift by the running mean
    x = torch.randn(6, 5, 3, generator=gen, dtype=dtype) * 2 + 10
    batch_mean, batch_var = est.update(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2), correction=0)
    assert batch_mean.dtype == batch_var.dtype == dtype
    torch.testing.assert_close(batch_mean, ref_mean)
    torch.testing.assert_close(batch_var, ref_var)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_and_leaves_totals_unchanged(gen, bad):
    est = feed([torch.randn(5, 4, generator=gen)])
    before = (est.count, est.mean, est.m2)
    x = torch.randn(3, 4, generator=gen)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match=r"channel\(s\) 2 .*non-finite"):
        est.update(x)
    assert est.count == before[0]
    assert torch.equal(est.mean, before[1]) and torch.equal(est.m2, before[2])


@pytest.mark.parametrize(
    "x, channel_dim",
    [
        (torch.randn(4, 5), 1),  # wrong channel count
        (torch.randn(4, 3, 2), 2),  # channels at the wrong dim
        (torch.randn(3), 0),  # too few dims
        (torch.randn(4, 3), 2),  # channel_dim out of range
        (torch.ones(4, 3, dtype=torch.int64), 1),  # not floating point
        (torch.randn(0, 3), 1),  # empty batch
        ([[1.0, 2.0, 3.0]], 1),  # not a tensor
    ],
)
def test_bad_input_raises(x, channel_dim):
    est = ChannelMoments(3)
    with pytest.raises(CalibrationError):
        est.update(x, channel_dim)
    assert est.count == 0


def test_bad_arguments_raise():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(CalibrationError):
            ChannelMoments(bad)
    est = ChannelMoments(2)
    with pytest.raises(CalibrationError):
        est.variance()
    est.update(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(CalibrationError):
        est.variance(unbiased=True)
    for count, mean, m2 in [
        (-1, torch.zeros(2), torch.zeros(2)),
        (1.5, torch.zeros(2), torch.zeros(2)),
        (torch.tensor([1, 2]), torch.zeros(2), torch.zeros(2)),
        (1, torch.zeros(3), torch.zeros(2)),
        (1, torch.zeros(2), -torch.ones(2)),
        (1, torch.tensor([0.0, float("nan")]), torch.zeros(2)),
    ]:
        with pytest.raises(CalibrationError):
            est.merge(count, mean, m2)
    assert est.count == 1
    with pytest.raises(CalibrationError):
        pooled_moments([])


def test_unbiased_variance_matches_batchnorm_running_var(gen):
    x = torch.randn(6, 4, 3, 3, generator=gen) * 3 + 1
    est = feed([x])
    n = est.count
    torch.testing.assert_close(est.variance(unbiased=True), est.variance() * n / (n - 1), rtol=1e-15, atol=0.0)
    bn = torch.nn.BatchNorm2d(4, momentum=1.0).train()  # momentum=1: running stats = this batch's
    with torch.no_grad():
        bn(x)
    torch.testing.assert_close(bn.running_var, est.variance(unbiased=True).float())
    torch.testing.assert_close(bn.running_mean, est.mean.float())


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    channels=st.integers(1, 4),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pooled_equals_concatenated_for_any_split(sizes, channels, offset, scale, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, channels, 2, generator=g, dtype=torch.float64) * scale + offset for n in sizes]
    mean, var, n = float64_moments(batches)
    est = feed(batches)
    assert est.count == n
    torch.testing.assert_close(est.mean, mean, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(est.variance(), var, rtol=1e-9, atol=1e-12 * scale**2)


def test_all_reduce_is_a_no_op_without_distributed(gen):
    assert not (dist.is_available() and dist.is_initialized())
    est = feed([torch.randn(5, 3, generator=gen)])
    before = (est.count, est.mean, est.m2)
    est.all_reduce()
    assert est.count == before[0] and torch.equal(est.mean, before[1]) and torch.equal(est.m2, before[2])


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_all_reduce_gloo_world_size_one_keeps_values(gen, tmp_path):
    est = feed([torch.randn(n, 3, 4, generator=gen) + 2 for n in (5, 2)])
    before = (est.count, est.mean, est.m2)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        est.all_reduce()
    finally:
        dist.destroy_process_group()
    assert est.count == before[0]
    torch.testing.assert_close(est.mean, before[1], rtol=1e-15, atol=0.0)
    torch.testing.assert_close(est.m2, before[2], rtol=1e-15, atol=0.0)


def test_all_reduce_combines_ranks_exactly(gen, monkeypatch):
    """Three simulated ranks (threads) with unequal data, one of them empty."""
    world = 3
    barrier, pending, lock = threading.Barrier(world), [], threading.Lock()

    def all_reduce(tensor, group=None):  # sum over ranks, in place, like dist.all_reduce
        with lock:
            pending.append(tensor)
        barrier.wait()
        total = torch.stack(pending).sum(0)
        barrier.wait()
        tensor.copy_(total)
        if barrier.wait() == 0:
            pending.clear()
        barrier.wait()

    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, all_reduce=all_reduce)
    monkeypatch.setattr(stats, "dist", fake)
    sizes_per_rank = [(4, 7), (1,), ()]
    shards = [[torch.randn(n, 2, 3, generator=gen) + 100 * r for n in sizes] for r, sizes in enumerate(sizes_per_rank)]
    estimators = [ChannelMoments(2) for _ in range(world)]
    for est, shard in zip(estimators, shards):
        for b in shard:
            est.update(b)
    threads = [threading.Thread(target=est.all_reduce) for est in estimators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    mean, var, n = float64_moments([b for shard in shards for b in shard])
    for est in estimators:
        assert est.count == n
        assert elementwise_rel_err(est.mean, mean) <= 1e-6 and elementwise_rel_err(est.variance(), var) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_batches(gen, device):
    batches = [(1e4 + 1e-2 * torch.randn(n, 4, 8, 8, generator=gen, dtype=torch.float64)).float() for n in (16, 5)]
    est = ChannelMoments(4, device=device)
    for b in batches:
        batch_mean, _ = est.update(b.cuda().to(memory_format=torch.channels_last))
        assert batch_mean.device.type == "cuda"
    mean, var, _ = float64_moments(batches)
    assert est.mean.device.type == device
    assert elementwise_rel_err(est.mean.cpu(), mean) <= 1e-12 and elementwise_rel_err(est.variance().cpu(), var) <= 1e-6
