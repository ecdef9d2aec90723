"""What a model really does on example inputs: which modules are called how often, and which calls
read the tensors a fold would change.

A model traced part by part runs eager glue that symbolic tracing cannot see: it may call a module of
a traced part directly, or read a weight. :func:`record_run` runs the user's model once (``no_grad``,
buffers restored afterwards) with a global forward pre-hook that counts module calls and a
``TorchFunctionMode`` that notes, for each watched tensor, the torch function and the innermost
module of every call that reads it. It also follows the outputs of chosen producer layers: which
norm received each one, and every other call that read (or wrote) it — the dataflow of the run.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    >>> run = record_run(model, (torch.randn(1, 3, 4, 4),), watched=[model[0].weight])
    >>> run.calls[id(model[0])], [(f, m is model[0]) for f, m in run.reads[id(model[0].weight)]]
    (1, [('conv2d', True)])
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import FxNormError

__all__ = ["RunRecord", "record_run", "flatten_outputs", "relative_error", "METADATA_FUNCTIONS"]


@dataclass
class RunRecord:
    """Module calls and watched-tensor reads of one run."""

    calls: Counter = field(default_factory=Counter)  #: id(module) -> calls
    #: id(tensor) -> [(torch function name, innermost module running it (None: the top level))]
    reads: dict[int, list[tuple[str, nn.Module | None]]] = field(default_factory=lambda: defaultdict(list))
    #: id(norm) -> for each call: (the producer whose output it received, or None; that tensor's rank)
    feeds: dict[int, list[tuple[nn.Module | None, int]]] = field(default_factory=lambda: defaultdict(list))
    #: id(producer) -> for each of its outputs: every (torch function, innermost module) that read it
    output_reads: dict[int, list[list[tuple[str, nn.Module | None]]]] = field(default_factory=lambda: defaultdict(list))
    output: Any = None  #: what the model returned


#: torch functions (and properties) that read a tensor's metadata only, never its values
METADATA_FUNCTIONS = frozenset({"__get__", "size", "dim", "numel", "shape", "dtype", "device", "ndim", "stride",
                       "is_contiguous", "element_size", "nelement", "ndimension", "get_device", "__len__"})


class _Reads(TorchFunctionMode):
    def __init__(self, watched: dict[int, torch.Tensor], record: RunRecord, stack: list[nn.Module],
                 outputs: dict[int, tuple[torch.Tensor, list]]) -> None:
        super().__init__()
        self.watched, self.record, self.stack, self.outputs = watched, record, stack, outputs

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        scope = self.stack[-1] if self.stack else None
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor):
                if id(value) in self.watched:
                    self.record.reads[id(value)].append((name, scope))
                held = self.outputs.get(id(value))
                if held is not None and held[0] is value and name not in METADATA_FUNCTIONS:
                    held[1].append((name, scope))
        return func(*args, **kwargs)


@torch.no_grad()
def record_run(model: nn.Module, example_inputs: tuple, *, watched: Iterable[torch.Tensor] = (),
               producers: Iterable[nn.Module] = (), norms: Iterable[nn.Module] = ()) -> RunRecord:
    """Run ``model(*example_inputs)`` once and record module calls, reads of ``watched`` tensors, and
    the dataflow from ``producers`` (their outputs, who read them) to ``norms`` (what each received).

    Long because the hooks that record the run are closures over its state.

    Raises:
        FxNormError: the model does not run on ``example_inputs`` (its buffers are restored first).
    """
    record = RunRecord()
    stack: list[nn.Module] = []
    watch = {id(t): t for t in watched}
    producer_ids, norm_ids = {id(m) for m in producers}, {id(m) for m in norms}
    outputs: dict[int, tuple[torch.Tensor, list]] = {}  # live producer outputs (kept alive by this dict)
    origin: dict[int, nn.Module] = {}
    saved = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]

    def pre(module: nn.Module, args: Any) -> None:
        record.calls[id(module)] += 1
        stack.append(module)
        if id(module) in norm_ids and args and isinstance(args[0], torch.Tensor):
            held = outputs.get(id(args[0]))
            source = origin.get(id(args[0])) if held is not None and held[0] is args[0] else None
            record.feeds[id(module)].append((source, args[0].dim()))

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()
        if id(module) in producer_ids and isinstance(out, torch.Tensor):
            readers: list = []
            outputs[id(out)] = (out, readers)
            origin[id(out)] = module
            record.output_reads[id(module)].append(readers)

    from torch.nn.modules import module as module_globals

    handles = [module_globals.register_module_forward_pre_hook(pre),
               module_globals.register_module_forward_hook(post, always_call=True)]
    try:
        with _Reads(watch, record, stack, outputs):
            record.output = model(*example_inputs)
        for value in flatten_outputs(record.output):  # a producer output returned as it is is read too
            held = outputs.get(id(value))
            if held is not None and held[0] is value:
                held[1].append(("<returned>", None))
    except Exception as err:
        raise FxNormError(f"example_inputs do not run through {type(model).__name__}: {type(err).__name__}: "
                          f"{err}; pass a tuple of the positional arguments model(*example_inputs) accepts") from err
    finally:
        for handle in handles:
            handle.remove()
        for buf, value in saved:
            buf.copy_(value)
    return record


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) output, in order.

    Example:
        >>> [tuple(t.shape) for t in flatten_outputs({"a": torch.zeros(2), "b": [torch.zeros(1, 3)]})]
        [(2,), (1, 3)]
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def relative_error(out: Any, ref: Any) -> float:
    """``max|out - ref| / max|ref|`` over every tensor of two (nested) outputs, in float64.

    Raises:
        FxNormError: the outputs differ in structure or shape.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    xs, ys = flatten_outputs(out), flatten_outputs(ref)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        raise FxNormError("the folded model's outputs differ in structure or shape from the original's")
    diff = ref_max = 0.0
    for x, y in zip(xs, ys):
        if x.numel() == 0:
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        diff = max(diff, float((x64 - y64).abs().max()))
        ref_max = max(ref_max, float(y64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / ref_max if ref_max > 0 else float("inf")
