"""The depth levels of ``recalibrate(..., order="sequential")``: which chosen norms feed which.

A :class:`DependencyTracker` watches the forwards of the first pass: a torch-function mode gives
every tensor a torch function returns the union of the *sources* of the tensors it was given, and
hooks on the chosen norms record the sources of each norm's input (the norms it depends on) and
make the norm's output a source of its own. :func:`levels` then orders the norms level by level: a
norm's level is one more than the deepest level among the norms it depends on (0: none), so the
norms of one level never feed each other and one pass over the data recalibrates them all, once the
levels before it hold their new statistics. The tracker also counts how often each norm runs in every
forward: when that is the same in every forward, :class:`EarlyStop` ends each forward of a later
pass as soon as every norm of its level has run that often (the rest of the forward would only feed
norms that pass does not recalibrate).

Values that leave torch (``.item()``, NumPy) lose their sources: a norm fed only through them would
be put on too early a level.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxnorm.calibration.observers import NormTarget
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    >>> targets = [NormTarget.for_module(n, model[int(n)]) for n in ("1", "4")]
    >>> with DependencyTracker(targets) as tracker:
    ...     _ = model.eval()(torch.randn(2, 3, 5, 5))
    >>> tracker.depends_on, [[t.name for t in level] for level in levels(targets, tracker.depends_on)]
    ({'1': set(), '4': {'1'}}, [['1'], ['4']])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import StopForward
from .interception import remove_mode
from .observers import NormTarget, Tally

__all__ = ["DependencyTracker", "EarlyStop", "levels"]


class DependencyTracker(TorchFunctionMode):
    """Records, for every target (by name), the targets its input depends on (see the module doc).
    Use it as a context manager around the forwards; leaving it removes its hooks."""

    def __init__(self, targets: Sequence[NormTarget], tally: Tally | None = None) -> None:
        super().__init__()
        self.targets = list(targets)
        self.tally = tally or Tally()
        self.depends_on: dict[str, set[str]] = {t.name: set() for t in self.targets}
        #: module calls of every target, by forward (``tally.batch``)
        self.calls: dict[str, Counter[int]] = {t.name: Counter() for t in self.targets}
        self.sources: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.handles: list[RemovableHandle] = []

    def _of(self, values: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for leaf in tree_leaves(values):
            if isinstance(leaf, torch.Tensor):
                found = found | self.sources.get(leaf, frozenset())
        return found

    def _mark(self, values: Any, sources: frozenset[str]) -> None:
        for leaf in tree_leaves(values):
            if isinstance(leaf, torch.Tensor):
                self.sources[leaf] = sources

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        sources = self._of((args, kwargs))
        if sources:
            self._mark(result, sources)
        return result

    def _before(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.depends_on[name] |= self._of((args, kwargs))
            self.calls[name][self.tally.batch] += 1
        return hook

    def _after(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self._mark(output, frozenset({name}))
        return hook

    def __enter__(self) -> DependencyTracker:
        for t in self.targets:
            self.handles.append(t.module.register_forward_pre_hook(self._before(t.name), with_kwargs=True))
            self.handles.append(t.module.register_forward_hook(self._after(t.name), with_kwargs=True))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        remove_mode(self)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.sources = WeakIdKeyDictionary()


    def calls_per_forward(self, forwards: int) -> dict[str, int]:
        """The targets that ran equally often (at least once) in each of the ``forwards`` forwards, and how often."""
        found = {}
        for name, calls in self.calls.items():
            counts = {calls.get(batch, 0) for batch in range(forwards)}
            if len(counts) == 1 and min(counts) > 0:
                found[name] = counts.pop()
        return found


class EarlyStop:
    """While entered: each calibration forward ends (:class:`~fxnorm.errors.StopForward`) as soon as
    every one of ``targets`` has run as often as ``expected`` says (their level is then gathered)."""

    def __init__(self, targets: Sequence[NormTarget], expected: dict[str, int], tally: Tally) -> None:
        self.targets, self.expected, self.tally = list(targets), dict(expected), tally
        self.batch, self.seen = -2, dict.fromkeys(self.expected, 0)
        self.handles: list[RemovableHandle] = []

    def _after(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.tally.batch != self.batch:
                self.batch, self.seen = self.tally.batch, dict.fromkeys(self.expected, 0)
            self.seen[name] += 1
            if all(self.seen[n] >= count for n, count in self.expected.items()):
                raise StopForward
        return hook

    def __enter__(self) -> EarlyStop:
        for t in self.targets:
            self.handles.append(t.module.register_forward_hook(self._after(t.name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def levels(targets: Sequence[NormTarget], depends_on: dict[str, set[str]]) -> list[list[NormTarget]]:
    """The targets by depth level (see the module doc), each level in the targets' order. A
    dependency cycle (a norm module called twice, feeding itself) puts the norms of the cycle one
    level after the deepest of the rest.

    Example:
        >>> import torch.nn as nn
        >>> ts = [NormTarget.for_module(n, nn.BatchNorm1d(2)) for n in "abc"]
        >>> [[t.name for t in level] for level in levels(ts, {"a": set(), "b": {"a"}, "c": {"a"}})]
        [['a'], ['b', 'c']]
    """
    depth: dict[str, int] = {}
    pending = {t.name: set(depends_on.get(t.name, ())) & set(depends_on) - {t.name} for t in targets}
    while pending:
        ready = [n for n, deps in pending.items() if deps <= depth.keys()]
        if not ready:  # a cycle: its norms go after everything else
            last = max(depth.values(), default=-1) + 1
            ready = list(pending)
            depth.update({n: last for n in ready})
        else:
            depth.update({n: 1 + max((depth[d] for d in pending[n]), default=-1) for n in ready})
        for n in ready:
            del pending[n]
    found: list[list[NormTarget]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for t in targets:
        found[depth[t.name]].append(t)
    return found
