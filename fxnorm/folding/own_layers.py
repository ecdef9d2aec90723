"""Conv and linear subclasses with their own forward: a norm folds into them when that forward is
"prepare the input, then call the layer's function with the module's own weight and bias".

TF-"same" padding convolutions are written this way (``x = F.pad(x, ...); return F.conv2d(x,
self.weight, self.bias, self.stride, 0, self.dilation, self.groups)``). fxnorm's tracer goes inside
such a module, so the graph holds a functional call made in the module's scope whose weight and bias
are the module's parameters. A fold into its producer gives the module new ``weight``/``bias``
Parameters and leaves its forward as it is (it reads ``self.weight`` at every call). That is exact
when the forward, traced alone, calls the layer's function once with ``self.weight`` and
``self.bias`` (read nowhere else) and returns its result: whatever happens to the input before
(padding) does not matter. A module without bias is traced once more with a zero bias Parameter on
a shallow copy, to see that its forward passes ``self.bias`` (and so will pass the new one). A
masked, binarized or otherwise computed weight refuses the fold.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F, fxnorm
    >>> class SameConv(nn.Conv2d):
    ...     def forward(self, x):
    ...         return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias, self.stride, 0)
    >>> model = nn.Sequential(SameConv(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    >>> [(s.fold, s.fold_into) for s in fxnorm.find_norms(model)]
    [('into_producer', '0')]
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.calls import bind_node, constant_value
from ..graph.kinds import is_plain, layer_kind
from ..graph.readers import value_users
from .forwards import trace_own_forward

__all__ = ["LAYER_FUNCTIONS", "own_call_owner", "own_call_problem", "own_forward_problem"]

#: the functions a conv/linear subclass's forward may call with its weight, by the kind they compute
LAYER_FUNCTIONS: dict[Any, str] = {F.conv1d: "Conv1d", F.conv2d: "Conv2d", F.conv3d: "Conv3d", torch.conv1d: "Conv1d",
                                   torch.conv2d: "Conv2d", torch.conv3d: "Conv3d", F.linear: "Linear"}


def _function_kind(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    try:
        return LAYER_FUNCTIONS.get(node.target)
    except TypeError:
        return None


def own_call_owner(root: nn.Module, node: fx.Node) -> nn.Module | None:
    """The conv/linear subclass whose own forward made the layer-function call at ``node`` (``root``:
    the module the graph was traced from), or None when ``node`` is not such a call."""
    kind = _function_kind(node)
    if kind is None:
        return None
    path = str(node.meta.get("fxnorm_scope") or "")
    try:
        owner = root.get_submodule(path) if path else root
    except AttributeError:
        return None
    if layer_kind(owner) != kind or is_plain(owner):
        return None
    return owner


def own_call_problem(gm: fx.GraphModule, node: fx.Node, owner: nn.Module, name: str) -> str | None:
    """Why the call at ``node`` (made by ``owner``'s forward) is not ``f(x, owner.weight, owner.bias, ...)``."""
    args = bind_node(node)
    if args is None:
        return f"{name} calls {node.name} with arguments fxnorm does not read"
    for attr in ("weight", "bias"):
        value, own = args.get(attr), getattr(owner, attr, None)
        if value is None and own is None and attr == "bias":
            continue
        try:
            found = constant_value(gm, value) if isinstance(value, fx.Node) else value
        except LookupError:
            found = None
        if found is not own or found is None:
            what = (f"computed in its forward ({value.name})" if isinstance(value, fx.Node) and found is None
                    else f"that is not self.{attr} ({value.name if isinstance(value, fx.Node) else value!r})")
            return (f"{name} ({type(owner).__name__}) calls {node.name} with a {attr} {what}: a masked or "
                    "binarized weight cannot take a fold")
    return None


def _with_bias(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with a zero ``bias`` Parameter (the module itself is not touched)."""
    probe = copy.copy(module)
    probe._parameters = dict(module._parameters)
    weight = getattr(module, "weight")
    probe._parameters["bias"] = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                             requires_grad=False)
    return probe


def own_forward_problem(module: nn.Module) -> str | None:
    """Why ``module``'s own forward is not "anything on the input, then one layer-function call with
    ``self.weight`` and ``self.bias`` whose result is returned" (None when it is)."""
    name = type(module).__name__
    probe = module if getattr(module, "bias", None) is not None else _with_bias(module)
    traced = trace_own_forward(probe)
    if isinstance(traced, str):
        return traced
    calls = [n for n in traced.graph.nodes if _function_kind(n) is not None]
    if len(calls) != 1:
        return f"{name}.forward makes {len(calls)} conv/linear calls, not one"
    call = calls[0]
    why = own_call_problem(traced, call, probe, f"{name}.forward")
    if why is not None:
        return why
    for node in traced.graph.nodes:
        if node.op == "get_attr" and str(node.target) in ("weight", "bias"):
            others = [u.name for u in value_users(node) if u is not call]
            if others:
                return f"{name}.forward also reads self.{node.target} in {', '.join(others)}"
    output = next(n for n in traced.graph.nodes if n.op == "output")
    if output.args[0] is not call or len(call.users) != 1:
        return f"{name}.forward does not return the result of its {call.name} call as it is"
    return None
