"""What runs *outside* the graphs of a traced model.

- Symbolic tracing executes a module's Python code: an operation on a real tensor of the model
  (``self.buf.sum()``) runs eagerly, its result baked into the graph as a constant. Such a read of a
  weight or a statistic is invisible in the graph; :func:`watch_eager_reads` notes it while tracing,
  so that a fold of that tensor can be refused.
- In a model traced part by part, norms called by the untraced glue (:func:`eager_norms`), with why
  their parent did not trace (:func:`eager_reason`).

Example:
    >>> import torch
    >>> buf = torch.ones(3)
    >>> with watch_eager_reads({id(buf)}) as found:
    ...     _ = buf.sum() * 2
    >>> found == {id(buf): ["sum"]}
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .calls import qualified_name
from .kinds import is_plain, norm_kind

if TYPE_CHECKING:
    from .tracing import TraceReport

__all__ = ["EAGER_READS", "watch_eager_reads", "eager_norms", "eager_reason"]

#: ``GraphModule.meta`` key: ``{id(tensor): [torch functions]}`` of the module's own parameters and
#: buffers that its code computed with eagerly while it was traced (``self.buf.sum()`` on a buffer):
#: the graph holds the result as a constant, so these reads are not graph nodes.
EAGER_READS = "fxnorm_eager_reads"
_METADATA_FUNCTIONS = frozenset({"size", "dim", "numel", "shape", "dtype", "device", "ndim", "is_floating_point",
                                 "__get__", "layout", "requires_grad", "is_cuda", "get_device", "stride",
                                 "storage_offset", "is_contiguous", "element_size", "nelement", "ndimension"})


class _EagerReads(TorchFunctionMode):
    """Notes the module tensors that traced code computes with outside the graph (no proxy involved)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.found: dict[int, list[str]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _METADATA_FUNCTIONS:
            values = tree_flatten((args, kwargs))[0]
            if not any(isinstance(v, fx.Proxy) for v in values):
                for value in values:
                    if isinstance(value, torch.Tensor) and id(value) in self.watched:
                        self.found.setdefault(id(value), []).append(name)
                target = kwargs.get("out", args[0] if args else None)
                writes = (name.endswith("_") and not name.endswith("__")) or "out" in kwargs
                if writes and isinstance(target, torch.Tensor) and id(target) in self.watched:
                    return target  # a traced forward never writes the model's tensors (num_batches_tracked += 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def watch_eager_reads(watched: set[int]) -> Iterator[dict[int, list[str]]]:
    """Inside the block, note every torch function that traced code runs eagerly (no proxy in its
    arguments) on a tensor whose ``id`` is in ``watched``: ``{id: [function names]}``; an in-place
    write into such a tensor is noted and not made (tracing must not change the model)."""
    mode = _EagerReads(watched)
    with mode:
        yield mode.found


def eager_norms(traced: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, kind)`` of every norm module of a traced model that runs in untraced
    (eager) code: the children of glue modules that are not ``GraphModule`` s. The model itself is
    not listed; a norm subclass with its own forward is listed and its children are searched too.

    Example:
        >>> import torch.nn as nn
        >>> from fxnorm.graph.tracing import trace
        >>> eager_norms(trace(nn.Sequential(nn.BatchNorm1d(2))))
        []
    """
    found: list[tuple[str, nn.Module, str]] = []
    stack: list[tuple[str, nn.Module]] = [("", traced)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, fx.GraphModule):
            continue
        kind = norm_kind(module)
        if kind is not None and name:
            found.append((name, module, kind))
            if is_plain(module):
                continue
        for child_name, child in reversed(list(module.named_children())):
            stack.append((qualified_name(name, child_name), child))
    return found


def eager_reason(name: str, report: TraceReport) -> str:
    """Why the norm at ``name`` (one of :func:`eager_norms`) is not in a graph: the untraced parent,
    with the tracer's reason when there is one.

    Example:
        >>> from fxnorm.graph.tracing import TraceReport, UntracedPart
        >>> eager_reason("head.bn", TraceReport(untraced=[UntracedPart("head", "Head", "TraceError: if x")]))
        "runs in untraced code of 'head' (TraceError: if x)"
    """
    parent = name.rpartition(".")[0]
    why = {u.name: u.reason for u in report.untraced}.get(parent)
    return f"runs in untraced code of '{parent or '<model>'}'" + (f" ({why})" if why else "")
