"""The recalibration session (fxnorm.prepare_recalibration / finish_recalibration): hooks on the user's
own model that always come off — leaving the ``with`` block normally, on an exception or on
KeyboardInterrupt, on close(), or when the session is dropped — torch.compile and TorchScript refused
with the remedy, DistributedDataParallel looked through (a real one-process gloo group), and the
misuses a session refuses."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from helpers import (STAT_BUFFERS, assert_model_unchanged, capture_norm_inputs, float64_moments, model_snapshot,
                     randomize_norms)

from fxnorm import (
    CalibrationError,
    CalibrationReport,
    DataError,
    RecalibrationSession,
    finish_recalibration,
    prepare_recalibration,
    recalibrate,
    report_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(nn.Module):
    """Raises ``error`` on the calls listed in ``at`` (counted from 1); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.at, self.error = 0, (), RuntimeError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.at:
            raise self.error("stop")
        return x


def small_model() -> nn.Sequential:
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3), Stop(),
                                         nn.BatchNorm2d(4))).train()


def data(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 6, 6, generator=gen) + i for i in range(n)]


def unchanged(model: nn.Sequential, snap: dict) -> None:
    model[3].calls = 0  # Stop counts its calls
    assert_model_unchanged(model, snap)


def test_session_runs_the_model_itself_and_changes_nothing_until_finished():
    model = small_model()
    snap = model_snapshot(model)
    state = copy.deepcopy(model.state_dict())
    with capture_norm_inputs(model) as seen, prepare_recalibration(model) as session:
        assert isinstance(session, RecalibrationSession) and session.model is model
        with torch.inference_mode():
            for b in data():
                model(b)
                assert [m.training for m in model.modules()] == [True] * 6  # flags back after every forward
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing written yet
    unchanged(model, snap)  # and the hooks are gone
    assert session.closed and not session.finished
    assert finish_recalibration(session) is model  # after the block: the statistics were kept
    for name in ("1", "4"):
        mean, var, _ = float64_moments(seen[name], unbiased=True)
        bn = model.get_submodule(name)
        assert ((bn.running_var.double() - var).abs() / var).max() < 1e-6 and bn.num_batches_tracked.item() == 3
    with pytest.raises(CalibrationError, match="finished already"):
        finish_recalibration(session)


@pytest.mark.parametrize("how", ["exception", "interrupt"])
def test_leaving_the_block_on_an_error_between_forwards_keeps_the_statistics(how):
    model = small_model()
    snap = model_snapshot(model)
    error = RuntimeError if how == "exception" else KeyboardInterrupt
    with pytest.raises(error):
        with prepare_recalibration(model) as session:
            model(data()[0])
            raise error("user code")
    unchanged(model, snap)
    assert finish_recalibration(session) is model and model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("how", ["exception", "interrupt"])
def test_an_error_inside_the_forward_leaves_nothing_and_blocks_finishing(how):
    model = small_model()
    model[3].at = (2,)
    model[3].error = RuntimeError if how == "exception" else KeyboardInterrupt
    snap = model_snapshot(model)
    with pytest.raises(model[3].error):
        with prepare_recalibration(model) as session:
            for b in data():
                model(b)
    unchanged(model, snap)
    why = "raised" if how == "exception" else "was interrupted"
    with pytest.raises(CalibrationError, match=f"the forward of batch 1 {why}"):
        finish_recalibration(session)
    unchanged(model, snap)


def test_an_interrupted_forward_is_ended_by_the_next_one():
    """Without a ``with`` block, an interrupt skips the always_call hook: the next forward ends the
    interrupted one (flags back, mode off the stack) and its batch makes the statistics unusable."""
    model = small_model()
    model[3].at, model[3].error = (1,), KeyboardInterrupt
    snap = model_snapshot(model)
    session = prepare_recalibration(model)
    with pytest.raises(KeyboardInterrupt):
        model(data()[0])
    assert not model.training and torch._C._len_torch_function_stack() == 1  # left by the interrupt
    model(data()[1])
    assert model.training and torch._C._len_torch_function_stack() == 0
    with pytest.raises(CalibrationError, match="the forward of batch 0 was interrupted"):
        finish_recalibration(session)
    unchanged(model, snap)


def test_exiting_without_finishing_writes_nothing_and_a_dropped_session_takes_its_hooks():
    model = small_model()
    snap = model_snapshot(model)
    with prepare_recalibration(model):
        for b in data():
            model(b)
    unchanged(model, snap)
    session = prepare_recalibration(model)
    model(data()[0])
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None  # the hooks do not keep the session alive
    unchanged(model, snap)
    prepare_recalibration(model).close()  # and a new session may start


def test_one_session_per_norm_at_a_time():
    model = small_model()
    with prepare_recalibration(model) as session:
        with pytest.raises(CalibrationError, match="already in a recalibration session"):
            prepare_recalibration(model)
        with pytest.raises(CalibrationError, match=r"norm\(s\) 1 are already"):
            prepare_recalibration(model[1])  # a part of it
        session.close()
        session.close()  # idempotent
        prepare_recalibration(model).close()


def test_a_norm_run_outside_a_forward_of_the_model_is_refused_and_batch_covers_it():
    model = randomize_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(8, 3)
    with prepare_recalibration(model) as session:
        with pytest.raises(CalibrationError, match="norm '1' ran outside a forward of the model"):
            model[1](model[0](x))
        with session.batch(len(x)):  # e.g. model.forward_features(x): any code, as one calibration batch
            model[1](model[0](x))
        finish_recalibration(session)
    report = report_of(model, CalibrationReport)
    assert report.num_batches == 1 and report.num_samples == 8 and model[1].num_batches_tracked.item() == 1
    with torch.no_grad():
        mean, var, _ = float64_moments([model[0](x)], unbiased=True)
    assert ((model[1].running_var.double() - var).abs() / var).max() < 1e-6


def test_a_copy_made_during_the_session_is_not_calibrated():
    model = randomize_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).eval()
    before = model[1].running_var.clone()
    with prepare_recalibration(model) as session:
        twin = copy.deepcopy(model)  # carries the hooks along: they act on the model only
        with torch.no_grad():
            twin(torch.randn(8, 3))
        with pytest.raises(DataError, match="no batch was run through the model"):
            finish_recalibration(session)
        assert not session.closed  # nothing merged: more batches may come
        model(torch.randn(8, 3))
        finish_recalibration(session)
    assert model[1].num_batches_tracked.item() == 1
    assert torch.equal(twin[1].running_var, before) and twin[1].num_batches_tracked.item() == 10


def test_finish_refuses_what_it_cannot_use():
    with pytest.raises(CalibrationError, match="not made by fxnorm.prepare_recalibration"):
        finish_recalibration(nn.BatchNorm1d(2))
    bn = nn.BatchNorm1d(2)
    session = prepare_recalibration(bn)
    bn(torch.randn(4, 2))
    bn.to(torch.float64)  # replaces the buffers
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(CalibrationError, match="replaced after prepare"):
        finish_recalibration(session)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items()) and session.closed


def test_user_graph_module_is_not_rewritten():
    gm = fx.symbolic_trace(randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval())
    code = gm.code
    batches = data()
    with torch.no_grad():
        mean, var, _ = float64_moments([gm.get_submodule("0")(x) for x in batches], unbiased=True)
    assert recalibrate(gm, batches) is gm and gm.code == code
    assert ((gm.get_submodule("1").running_var.double() - var).abs() / var).max() < 1e-6


# ------------------------------------------------------------------ torch.compile, TorchScript, DDP
def test_compiled_models_are_refused_with_the_remedy():
    model = small_model()
    compiled = torch.compile(model, backend="eager")  # nothing compiles until it runs
    snap = model_snapshot(model)  # (torch.compile marks the module it wraps)
    with pytest.raises(CalibrationError, match=r"the model is compiled with torch.compile.*m\._orig_mod"):
        recalibrate(compiled, data())
    inner = nn.Sequential(copy.deepcopy(model[0]), small_model())
    inner[1].compile(backend="eager")
    with pytest.raises(CalibrationError, match="'1' is compiled with torch.compile"):
        prepare_recalibration(inner)
    unchanged(model, snap)
    recalibrate(compiled._orig_mod, data())  # the remedy works
    assert model[1].num_batches_tracked.item() == 3


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_models_are_refused():
    model = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with pytest.raises(CalibrationError, match="TorchScript"):
        prepare_recalibration(model)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_distributed_data_parallel_is_looked_through(tmp_path):
    """A real DDP wrapper (a one-process gloo group): recalibrate runs the wrapped module itself (DDP's
    forward would re-broadcast the buffers), returns the wrapper, and equals the unwrapped result; a
    session also works with batches run through the wrapper."""
    base = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    batches = data()
    expected = recalibrate(copy.deepcopy(base).eval(), batches)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        module_snap = model_snapshot(ddp.module)
        assert recalibrate(ddp, batches) is ddp
        assert report_of(ddp, CalibrationReport).num_batches == 3
        assert_model_unchanged(ddp.module, module_snap, except_buffers={"1": STAT_BUFFERS, "3": STAT_BUFFERS})
        ddp2 = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        with prepare_recalibration(ddp2) as session, torch.inference_mode():
            assert session.model is ddp2.module
            for b in batches:
                ddp2(b)
            assert finish_recalibration(session) is ddp2
    finally:
        dist.destroy_process_group()
    for got in (ddp.module, ddp2.module):
        for (k, v), v2 in zip(got.state_dict().items(), expected.state_dict().values()):
            torch.testing.assert_close(v, v2, rtol=1e-12, atol=0, msg=k)
