"""Folds across trace boundaries, seen in a recorded run (evidence ``"observed"``).

A conv inside a module that does not trace (TF-"same" padding computed from ``x.shape``, control
flow) can feed a batch norm that runs in untraced code too: no graph holds both. With example inputs,
the planner records one real run (:func:`fxnorm.graph.runtime.record_run`) and folds such a norm into
its producer when that run shows: every call of the norm received the output of the same plain
conv/linear, every output of that layer went to this norm and was read by nothing else (no other
op, no in-place write), and the usual rules hold (channels at the rank seen, hooks, hidden
references, other readers of the weights and statistics). That holds for *these* inputs, not proven
for every input: such folds are reported ``"observed"``, refused by ``strict=True``, and
:func:`fxnorm.fold` checks the folded model's outputs on the example inputs before keeping them.

Example:
    >>> import torch, torch.nn as nn, fxnorm
    >>> class Same(nn.Module):                       # pads from the input's shape: does not trace
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(3, 4, 3)
    ...     def forward(self, x):
    ...         pad = max(3 - x.shape[-1] % 2, 1)
    ...         return self.conv(nn.functional.pad(x, [pad // 2] * 4))
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.same, self.bn = Same(), nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return self.bn(self.same(x)) if float(x.sum()) > -1e30 else x
    >>> x = torch.randn(1, 3, 8, 8)
    >>> folded = fxnorm.fold(Net().eval(), example_inputs=(x,))
    >>> [(f.name, f.into, f.evidence) for f in fxnorm.report_of(folded, fxnorm.FoldReport).folded]
    [('bn', 'same.conv', 'observed')]
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.kinds import BN_KINDS, is_plain, layer_kind
from ..graph.readers import why_opaque
from ..graph.runtime import RunRecord, flatten_outputs, relative_error
from .constants import BNConstants, channel_dims, health_problem, module_constants
from .plan import Analysis, NormCall, layer_problem

__all__ = ["OBSERVED", "observed_call", "observed_fold", "outputs_agree", "DISAGREED"]

#: the ``NormCall.prefix`` of a norm that no graph holds (its decision comes from a recorded run)
OBSERVED = "<observed>"
_NORM_FUNCTIONS = ("batch_norm", "instance_norm")
#: the reason of an observed fold that :func:`fxnorm.fold` took back
DISAGREED = ("runs in untraced code; folding it as the example run suggested changed the model's outputs on "
             "example_inputs, so it was not folded")


def observed_call(an: Analysis, name: str, module: nn.Module, kind: str) -> NormCall:
    """A :class:`NormCall` standing for an eager norm module (no graph holds it)."""
    graph = fx.Graph()
    node = graph.placeholder("norm_input")
    graph.output(None)
    stats = getattr(module, "running_mean", None)
    return NormCall(OBSERVED, fx.GraphModule(nn.Module(), graph), node, kind, name,
                    id(stats) if stats is not None else id(module), module=module)


def _norm_problem(an: Analysis, norm: nn.Module) -> str | None:
    why = why_opaque(norm, allow_hooks=an.allow_hooks)
    if why is None and id(norm) in an.hidden:
        why = f"it is also held outside the module tree ({', '.join(an.hidden[id(norm)][:3])})"
    for attr in (*norm._parameters, *norm._buffers):
        if why is None and an.reads.get((id(norm), attr)):
            why = f"its {attr} is also read elsewhere"
    return why


def observed_fold(an: Analysis, call: NormCall, run: RunRecord,
                  taken: set[int]) -> tuple[nn.Module, BNConstants] | str:
    """The layer an eager norm folds into on the evidence of ``run`` (and its constants), or why not.
    ``taken``: ids of layers the static plan already folds into."""
    norm = call.module
    if norm is None or call.kind not in BN_KINDS or not is_plain(norm):
        return "runs in untraced code, and it is not a plain batch norm"
    consts = module_constants(norm, call.kind)
    if isinstance(consts, str):
        return consts
    feeds = run.feeds.get(id(norm), [])
    producers = {id(p) for p, _ in feeds}
    if not feeds or len(producers) != 1 or feeds[0][0] is None:
        return "runs in untraced code; the example run did not show one conv/linear feeding every call of it"
    layer, rank = feeds[0]
    kind = layer_kind(layer) if layer is not None else None
    if layer is None or kind is None:
        return "runs in untraced code, fed by something that is not a conv/linear"
    if not is_plain(layer) or id(layer) in taken:
        return f"its producer {an.name_of(layer)} already takes other folds, or overrides forward()"
    reads = run.output_reads.get(id(layer), [])
    if run.calls[id(layer)] != len(feeds) or len(reads) != len(feeds) or any(
            (f not in _NORM_FUNCTIONS or scope is not norm) for readers in reads for f, scope in readers):
        return (f"in the example run the output of {an.name_of(layer)} is also read elsewhere, or not every call "
                "of it feeds this norm")
    width = layer.out_features if kind == "Linear" else getattr(layer, "out_channels", None)
    if width != consts.num_features or channel_dims(call.kind).get(rank) != channel_dims(kind).get(rank) or (
            channel_dims(call.kind).get(rank) is None):
        return f"{an.name_of(layer)} and the norm do not have the same channels at rank {rank}"
    why = health_problem(consts) or _norm_problem(an, norm) or layer_problem(an, layer, "producer")
    return why or (layer, consts)


@torch.no_grad()
def outputs_agree(model: nn.Module, example_inputs: tuple, run: RunRecord) -> bool:
    """Whether ``model(*example_inputs)`` (changed by observed folds) still returns what the recorded run
    did, to rounding (1000 ulps of the output's dtype, relative to its largest value); buffers are
    restored afterwards. A model that fails to run does not agree."""
    saved = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    try:
        out = model(*example_inputs)
    except Exception:
        return False
    finally:
        for buf, value in saved:
            buf.copy_(value)
    tensors = [t for t in flatten_outputs(run.output) if t.is_floating_point()]
    tol = max((1e3 * torch.finfo(t.dtype).eps for t in tensors), default=0.0)
    try:
        return relative_error(out, run.output) <= min(tol, 1e-2)
    except Exception:
        return False
