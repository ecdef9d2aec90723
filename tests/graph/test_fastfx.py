"""fxnorm.graph.fastfx: the math wrappers made once give torch's graphs, and leave math as it was."""

import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxnorm.graph.fastfx import LazyGraphModule, autowrapped, can_autowrap, module_patches_hoisted
from fxnorm.graph.tracing import NormTracer, trace


class _MathUser(nn.Module):
    def forward(self, x):
        return x * math.sqrt(x.size(1)) + math.floor(x.sum())


class _Fails(nn.Module):
    def forward(self, x):
        math.sqrt(2.0)
        if x.sum() > 0:  # data-dependent: the trace fails
            return x
        return -x


def test_math_calls_recorded_as_torch_records_them():
    sqrt, floor = math.sqrt, math.floor
    ours = NormTracer().trace(_MathUser())
    torchs = fx.Tracer().trace(_MathUser())
    assert ours.python_code("self").src == torchs.python_code("self").src
    assert [n.target for n in ours.nodes if n.op == "call_function"][:1] == [sqrt]
    assert math.sqrt is sqrt and math.floor is floor


def test_math_restored_after_a_failed_trace():
    sqrt = math.sqrt
    tracer = NormTracer()
    assert can_autowrap(tracer)
    with pytest.raises(Exception):
        tracer.trace(_Fails())
    assert math.sqrt is sqrt
    assert tracer._autowrap_search == [math]  # the tracer is left as torch made it


def test_autowrapped_outside_a_trace_calls_the_function():
    sqrt = math.sqrt
    with autowrapped([math], {id(sqrt)}):
        assert math.sqrt is not sqrt and math.sqrt(9.0) == 3.0
    assert math.sqrt is sqrt


def test_lazy_trace_runs_and_reads_code_like_the_eager_one():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    lazy, eager = trace(model, lazy=True), trace(model)
    assert isinstance(lazy, LazyGraphModule) and isinstance(lazy, fx.GraphModule)
    x = torch.randn(2, 4)
    assert torch.equal(lazy(x), eager(x))
    assert lazy.code == eager.code


class _Unpacks(nn.Module):
    def forward(self, x):
        a, b = x.unbind(0)  # UNPACK_SEQUENCE 2
        return a - b


class _Iterates(nn.Module):
    def forward(self, x):
        return [t * 2 for t in x]


def _unpacks(count: int) -> nn.Module:
    """A module whose forward unpacks ``count`` values at once (``count > 255`` needs EXTENDED_ARG)."""
    names = [f"v{i}" for i in range(count)]
    source = f"def forward(self, x):\n    {', '.join(names)}, = x.unbind(0)\n    return {names[0]} + {names[-1]}\n"
    scope: dict = {}
    exec(source, scope)
    return type(f"Unpacks{count}", (nn.Module,), {"forward": scope["forward"]})()


@pytest.mark.parametrize("module, count", [(_Unpacks(), 2), (_unpacks(3), 3), (_unpacks(300), 300)],
                         ids=["unpack2", "unpack3", "unpack300"])
def test_unpacking_proxies_give_torchs_graphs(module, count):
    ours, torchs = NormTracer().trace(module), fx.Tracer().trace(module)
    assert [n.args[1] for n in ours.nodes if n.target is operator.getitem] == list(range(count))
    assert ours.python_code("self").src == torchs.python_code("self").src


def test_iterating_a_proxy_fails_as_with_torch():
    with pytest.raises(fx.proxy.TraceError, match="cannot be iterated") as ours:
        NormTracer().trace(_Iterates())
    with pytest.raises(fx.proxy.TraceError) as torchs:
        fx.Tracer().trace(_Iterates())
    assert str(ours.value) == str(torchs.value)


class _Nested(nn.Module):
    """Module calls two levels deep, a parameter read through ``nn.Module.__getattr__``, and a
    non-leaf child traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.block(x) * self.scale


def test_hoisted_module_patches_give_torchs_graphs_and_are_put_back():
    from torch.fx._symbolic_trace import _Patcher

    call, getattr_, patch_method = nn.Module.__call__, nn.Module.__getattr__, _Patcher.patch_method
    expected = fx.Tracer().trace(_Nested()).python_code("self").src
    with module_patches_hoisted():
        assert nn.Module.__call__ is not call and nn.Module.__getattr__ is not getattr_
        first = fx.Tracer().trace(_Nested()).python_code("self").src
        with pytest.raises(fx.proxy.TraceError):
            fx.Tracer().trace(_Iterates())  # a failed trace in between
        second = NormTracer().trace(_Nested()).python_code("self").src
        eager = _Nested()(torch.ones(1, 3))  # modules run as usual between traces
    assert first == expected and second == expected
    assert eager.shape == (1, 3)
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_ and _Patcher.patch_method is patch_method


def test_hoisted_module_patches_put_back_after_an_error():
    call = nn.Module.__call__
    with pytest.raises(RuntimeError, match="boom"):
        with module_patches_hoisted():
            raise RuntimeError("boom")
    assert nn.Module.__call__ is call
    seen = []
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(lambda m, a, o: seen.append(o))
    layer(torch.ones(1, 2))
    assert len(seen) == 1
