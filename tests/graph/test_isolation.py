"""fxnorm.graph.isolation: tracing leaves the model's attributes and hooks as they were."""

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules import module as module_globals

from fxnorm.graph.isolation import attributes_restored, hooks_held
from fxnorm.graph.tracing import trace


class _Caches(nn.Module):
    """Sets, replaces and deletes attributes in its forward (torchvision's MultiScaleRoIAlign caches
    ``self.scales`` on its first call)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale = 1.0
        self.name = "x"

    def forward(self, x):
        self.seen = x.shape  # a proxy while traced
        self.scale = x.sum()
        del self.name
        self.name = "x"  # same value, re-added last: the key order changed
        return self.conv(x)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Caches()

    def forward(self, x):
        y = self.inner(x)
        if y.sum() > 0:  # the whole model does not trace: its children are tried next
            return y
        return -y


def test_attributes_put_back_after_a_traced_part_and_a_failed_attempt():
    model = _DataDependent()
    before = {id(m): (list(m.__dict__), list(m.__dict__.values())) for m in model.modules()}
    traced = trace(model)
    assert isinstance(traced.inner, torch.fx.GraphModule)  # the model failed, its child traced
    for m in model.modules():
        keys, values = before[id(m)]
        assert list(m.__dict__) == keys, type(m).__name__
        assert all(a is b for a, b in zip(m.__dict__.values(), values)), type(m).__name__
    assert not hasattr(model.inner, "seen")


def test_attributes_restored_restores_only_what_changed():
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    b_state = b.__dict__
    with attributes_restored([a, b]):
        a.extra = 1
        a.training = False
    assert "extra" not in a.__dict__ and a.training is True
    assert b.__dict__ is b_state


def test_hooks_held_while_tracing_and_back_afterwards():
    model = _DataDependent()
    seen, seen_global = [], []
    handle = model.inner.conv.register_forward_hook(lambda m, a, o: seen.append(o))
    global_handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen_global.append(type(m)))
    try:
        trace(model)
        assert seen == [] and seen_global == []  # no hook saw a proxy
        model(torch.ones(1, 3, 2, 2))
        assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
        assert nn.Conv2d in seen_global
    finally:
        handle.remove()
        global_handle.remove()
    assert not model.inner.conv._forward_hooks


def test_hooks_held_reports_hooked_modules_and_restores_globals():
    layer, plain = nn.Linear(2, 2), nn.Linear(2, 2)
    layer.register_forward_pre_hook(lambda m, a: None)
    tables = {name: getattr(module_globals, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")}
    with attributes_restored([layer, plain]), hooks_held([layer, plain]) as hooked:
        assert hooked == {id(layer)}
        assert not layer._forward_pre_hooks
    assert len(layer._forward_pre_hooks) == 1
    assert all(getattr(module_globals, name) is table for name, table in tables.items())
