"""graph.calls: every argument layout matches the real signature (Python signature or ATen schema),
so a wrong order cannot pass; binding fills defaults and refuses calls it cannot read."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxnorm.graph.calls import LAYOUTS, bind, bind_node, replace_argument
from fxnorm.graph.readers import value_users

#: the ATen op whose schema each torch.* builtin follows (torch.conv2d has two overloads: int and str
#: padding; both put the arguments in the same order)
_SCHEMAS = {
    torch.batch_norm: "batch_norm", torch.instance_norm: "instance_norm", torch.layer_norm: "layer_norm",
    torch.group_norm: "group_norm", torch.native_batch_norm: "native_batch_norm", F.linear: "linear",
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
}
if hasattr(torch, "rms_norm"):
    _SCHEMAS[torch.rms_norm] = "rms_norm"


def _real_parameters(fn) -> list[tuple[str, object]]:
    """(name, default or inspect.Parameter.empty) in positional order, from the real signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        return [(p.name, p.default) for p in sig.parameters.values() if p.kind != p.KEYWORD_ONLY]
    packet = getattr(torch.ops.aten, _SCHEMAS[fn])
    overload = "default" if "default" in packet.overloads() else packet.overloads()[0]
    schema = getattr(packet, overload)._schema
    return [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in schema.arguments if not a.kwarg_only]


def _same_default(ours: object, real: object) -> bool:
    if isinstance(real, list):
        real = tuple(real)
    if isinstance(ours, tuple) and isinstance(real, tuple) and len(real) == 1:
        return all(o == real[0] for o in ours) or ours == real  # SymInt[2] stride=1 in some schemas
    return ours == real


@pytest.mark.parametrize("fn", list(LAYOUTS), ids=lambda f: f"{getattr(f, '__module__', '') or ''}.{f.__name__}")
def test_every_layout_matches_the_real_signature(fn):
    layout = LAYOUTS[fn]
    real = _real_parameters(fn)
    assert layout.names == tuple(name for name, _ in real), f"{fn.__name__}: {layout.names} vs {real}"
    for name, default in real:
        if name in layout.defaults:
            if default is not inspect.Parameter.empty:
                assert _same_default(layout.defaults[name], default), (fn.__name__, name, layout.defaults[name], default)
        else:
            assert default is inspect.Parameter.empty, f"{fn.__name__}: {name} has a default {default!r} we lack"


def test_torch_batch_norm_puts_weight_and_bias_first():
    args = bind(torch.batch_norm, ("x", "w", "b", "rm", "rv", False, 0.1, 1e-5, True), {})
    assert (args["weight"], args["bias"], args["running_mean"], args["running_var"]) == ("w", "b", "rm", "rv")
    args = bind(F.batch_norm, ("x", "rm", "rv", "w", "b"), {})
    assert (args["weight"], args["bias"], args["running_mean"], args["running_var"]) == ("w", "b", "rm", "rv")


def test_conv_transpose_puts_groups_before_dilation():
    args = bind(F.conv_transpose2d, ("x", "w", None, 2, 1, 1, 4, 3), {})
    assert (args["stride"], args["padding"], args["output_padding"], args["groups"], args["dilation"]) == (2, 1, 1, 4, 3)


@pytest.mark.parametrize("args, kwargs", [
    (("x",), {}),                                     # running_mean/running_var are required
    (("x", "rm", "rv", None, None, False, 0.1, 1e-5, "extra"), {}),  # one positional too many
    (("x", "rm", "rv"), {"nonsense": 1}),             # unknown keyword
    (("x", "rm", "rv"), {"running_mean": "again"}),   # given twice
])
def test_calls_that_do_not_fit_are_not_guessed(args, kwargs):
    assert bind(F.batch_norm, args, kwargs) is None


def test_unknown_callables_have_no_layout():
    assert bind(torch.relu, ("x",), {}) is None
    assert bind([], (), {}) is None  # unhashable


def test_traced_functional_calls_are_bound_with_their_keywords():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rm", torch.zeros(3))
            self.register_buffer("rv", torch.ones(3))

        def forward(self, x):
            a = F.batch_norm(x, self.rm, self.rv, eps=0.5)
            return torch.batch_norm(a, None, None, self.rm, self.rv, False, 0.2, 0.25, False)

    gm = fx.symbolic_trace(M())
    first, second = [n for n in gm.graph.nodes if n.op == "call_function"]
    a, b = bind_node(first), bind_node(second)
    assert a["eps"] == 0.5 and a["running_mean"].target == "rm" and a["weight"] is None
    assert b["eps"] == 0.25 and b["momentum"] == 0.2 and b["running_var"].target == "rv" and b["weight"] is None


def test_replace_argument_positional_keyword_and_default():
    gm = fx.symbolic_trace(lambda x, w, b: torch.layer_norm(x, (3,), w, bias=b))
    node = [n for n in gm.graph.nodes if n.op == "call_function"][0]
    assert replace_argument(node, "weight", None).name == "w" and node.args[2] is None
    assert replace_argument(node, "bias", None).name == "b" and node.kwargs["bias"] is None
    assert replace_argument(node, "eps", 0.5) == 1e-5 and node.kwargs["eps"] == 0.5
    with pytest.raises(KeyError, match="no argument 'groups'"):
        replace_argument(node, "groups", 1)


def test_shape_reads_are_not_value_users():
    gm = fx.symbolic_trace(lambda x: x.relu() + x.size(0) + x.shape[1] + x.dim() + getattr(x, "dtype").itemsize)
    x = next(iter(gm.graph.nodes))
    assert [u.op + ":" + str(u.target) for u in value_users(x)] == ["call_method:relu"]
