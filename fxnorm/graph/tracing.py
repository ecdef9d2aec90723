"""Symbolic tracing that never gives up: whole model first, then part by part.

:func:`trace` runs ``torch.fx`` with :class:`NormTracer`, a tracer that keeps every plain norm,
conv and linear layer as a leaf (torchvision's ``FrozenBatchNorm2d`` and conv subclasses such as
``Conv3DSimple`` included), goes inside norm subclasses whose ``forward`` differs from their base,
and records in ``node.meta["fxnorm_scope"]`` the qualified name of the module each node came from.

When the whole model does not trace (torchvision detection models, data-dependent control flow),
its children are tried one by one, recursively: the largest traceable submodules become
``GraphModule`` s in place and the untraceable glue stays eager. Every part that could not be traced
is reported with the tracer's reason in :class:`TraceReport`, reachable with
``fxnorm.report_of(traced, TraceReport)``.

Example:
    >>> import torchvision
    >>> traced = trace(torchvision.models.resnet18())
    >>> import torch.fx
    >>> isinstance(traced, torch.fx.GraphModule), traced_report(traced).untraced
    (True, [])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FxNormError, TraceError
from ..reports import Report, record_report, report_of
from .fastfx import LazyGraphModule, UnpackingProxy, autowrapped, can_autowrap, module_patches_hoisted
from .eager import EAGER_READS, watch_eager_reads
from .isolation import attributes_restored, hooks_held, silenced_rank_check
from .readers import augmented_assignment
from .kinds import is_plain, known_base

__all__ = [
    "LeafSpec", "LeafModules", "NormTracer", "UntracedPart", "TraceReport", "trace", "traced_report", "is_traced",
    "graph_parts",
]

#: A module the tracer keeps opaque: a class, a qualified name, or a module instance.
LeafSpec = Union[type, str, nn.Module]
#: The ``leaf_modules`` argument of every fxnorm function that traces.
LeafModules = Iterable[LeafSpec]


@dataclass
class UntracedPart:
    """A module that stays eager, with why the tracer refused it."""

    name: str  #: qualified name in the model ("" for the model itself)
    type: str  #: class name
    reason: str  #: the tracer's error, one line


@dataclass
class TraceReport(Report):
    """What :func:`trace` did: which parts became graphs and which stayed eager (and why)."""

    missing_error: ClassVar[type[FxNormError]] = TraceError
    made_by: ClassVar[str] = "fxnorm.trace"

    graphs: list[str] = field(default_factory=list)  #: qualified names of the traced parts
    untraced: list[UntracedPart] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when the whole model is one graph."""
        return self.graphs == [""]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"graphs": [...], "untraced": [{"name", "type", "reason"}...]}``."""
        return asdict(self)


class NormTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps plain norm/conv/linear layers (and user leaves) as leaves and
    records the qualified name of the module every node comes from in ``node.meta["fxnorm_scope"]``
    (for a leaf's call: the leaf), and the modules being called when it was made, outermost first,
    in ``node.meta["fxnorm_stack"]`` (the leaf included).

    Example:
        >>> import torch.nn as nn
        >>> graph = NormTracer().trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> [n.target for n in graph.nodes if n.op == "call_module"]
        ['0', '1']
    """

    def __init__(self, leaf_modules: LeafModules = (), prefix: str = "") -> None:
        super().__init__()
        specs = tuple(leaf_modules)
        self._leaf_types = tuple(s for s in specs if isinstance(s, type))
        self._leaf_names = {s for s in specs if isinstance(s, str)}
        self._leaf_ids = {id(s) for s in specs if isinstance(s, nn.Module)}
        self._prefix = prefix
        self._scope = ""
        self._stack: list[str] = []
        self.hooked: set[int] = set()  #: ids of the modules whose hooks are held while tracing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        full = f"{self._prefix}.{module_qualified_name}" if self._prefix else module_qualified_name
        if (
            id(m) in self._leaf_ids
            or full in self._leaf_names
            or module_qualified_name in self._leaf_names
            or (self._leaf_types and isinstance(m, self._leaf_types))
        ):
            return True
        if known_base(m) is not None:
            return is_plain(m)
        if type(m) is nn.Identity and "forward" not in m.__dict__ and id(m) not in self.hooked:
            return False  # a folded norm: traced through, it leaves no node between its neighbours
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        outer = self._scope
        try:
            self._scope = self.path_of_module(m)
        except NameError:
            pass
        self._stack.append(self._scope)
        try:
            with silenced_rank_check(m):
                return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer
            self._stack.pop()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """``fx.Tracer.trace``, with a norm subclass root's input-rank check silenced too (and the
        ``math`` functions wrapped by :func:`fxnorm.graph.fastfx.autowrapped`, same graphs)."""
        search = self._autowrap_search if can_autowrap(self) else None  # else torch wraps them itself
        if search is not None:
            self._autowrap_search = []
        try:
            with silenced_rank_check(root if isinstance(root, nn.Module) else None), \
                    autowrapped(search or [], getattr(self, "_autowrap_function_ids", set())):
                return super().trace(root, concrete_args)
        finally:
            if search is not None:
                self._autowrap_search = search

    def proxy(self, node: fx.Node) -> fx.Proxy:
        """Proxies that find ``a, b = proxy`` cheaply (:class:`fxnorm.graph.fastfx.UnpackingProxy`)."""
        return UnpackingProxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["fxnorm_scope"] = self._scope
        node.meta["fxnorm_stack"] = tuple(self._stack)  # the modules whose call made this node, outermost first
        if node.op == "call_function":
            node.meta["fxnorm_inplace"] = augmented_assignment(node.target)
        return node


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:300]


def _trace_module(module: nn.Module, prefix: str, leaf_modules: tuple, concrete_args: Any,
                  lazy: bool = False) -> fx.GraphModule:
    # Code traced through runs on the real buffers too (a BatchNorm subclass in training mode does
    # ``self.num_batches_tracked.add_(1)``): watch_eager_reads keeps those writes from happening.
    modules = list(module.modules())
    tensors = {id(t) for m in modules for store in (m._parameters, m._buffers) for t in store.values() if t is not None}
    with attributes_restored(modules):
        tracer = NormTracer(leaf_modules, prefix)
        with watch_eager_reads(tensors) as reads, hooks_held(modules) as hooked:
            tracer.hooked = hooked
            graph = tracer.trace(module, concrete_args=concrete_args)
        graph.lint()
        gm = (LazyGraphModule if lazy else fx.GraphModule)(tracer.root, graph, module.__class__.__name__)
        gm.meta[EAGER_READS] = dict(reads)
        return gm


def _keep_plain_attributes(module: nn.Module, gm: fx.GraphModule) -> None:
    """Give a traced part the plain Python attributes of its module (eager parents read them:
    RAFT's forward reads ``self.update_block.hidden_state_size``). They are also recorded in
    ``gm.meta["_user_preserved_attributes"]``, which ``GraphModule`` copies keep (``copy.deepcopy``)."""
    meta = getattr(gm, "meta", None)
    for key, value in module.__dict__.items():
        if key.startswith("_") or key in gm.__dict__ or callable(value) or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        gm.__dict__[key] = value
        if isinstance(meta, dict):
            meta.setdefault("_user_preserved_attributes", {})[key] = value
    gm.training = module.training


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose child table can change without touching the original."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


def _trace_tree(
    module: nn.Module,
    name: str,
    report: TraceReport,
    leaf_modules: tuple,
    concrete_args: Any,
    inplace: bool,
    lazy: bool,
) -> nn.Module:
    is_leaf = known_base(module) is not None and is_plain(module)
    if not _is_container(module) and not is_leaf and not isinstance(module, fx.GraphModule):
        try:
            gm = _trace_module(module, name, leaf_modules, concrete_args, lazy)
        except Exception as err:  # any tracer failure means "trace the children instead"
            report.untraced.append(UntracedPart(name, type(module).__name__, _one_line(err)))
        else:
            report.graphs.append(name)
            _keep_plain_attributes(module, gm)
            return gm
    elif isinstance(module, fx.GraphModule):
        report.graphs.append(name)
        return module
    if is_leaf or not module._modules:
        return module
    new = module if inplace else _shallow_copy(module)
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        traced = _trace_tree(child, full, report, leaf_modules, None, inplace, lazy)
        if traced is not child:
            new._modules[child_name] = traced
    return new


def trace(
    model: nn.Module,
    *,
    leaf_modules: LeafModules = (),
    concrete_args: dict[str, Any] | None = None,
    inplace: bool = False,
    lazy: bool = False,
) -> nn.Module:
    """Trace ``model`` into a ``GraphModule``, or part by part when it does not trace as a whole.

    Args:
        model: any ``nn.Module``.
        leaf_modules: modules to keep opaque: classes, qualified names, or module instances.
        concrete_args: passed to the tracer for the top-level ``forward`` (``torch.fx`` semantics).
        inplace: replace the children of ``model`` itself. By default the untraced glue modules are
            shallow copies, and ``model`` is left as it was. Like ``torch.fx.symbolic_trace``, the
            result shares parameters and buffers with ``model``.
        lazy: build each ``GraphModule`` without generating its Python code, which is generated
            the first time it is called or its ``code`` is read (torch's ``_LazyGraphModule``):
            faster for passes that only read the graphs. Its first call runs its hooks twice.

    Returns:
        A ``GraphModule`` when the whole model traced; otherwise a module of the model's own type
        whose largest traceable submodules are ``GraphModule`` s. ``fxnorm.report_of(result, TraceReport)`` tells which.

    Raises:
        TraceError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torchvision
        >>> det = trace(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        ...     weights=None, weights_backbone=None))
        >>> traced_report(det).untraced[0].name   # the model itself has data-dependent control flow
        ''
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxnorm.trace expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(f"{type(model).__name__} is TorchScript (torch.jit.script/trace): fxnorm reads Python "
                         "modules; pass the nn.Module it was made from")
    report = TraceReport()
    with module_patches_hoisted():  # torch's tracer patches nn.Module once, not once per part
        result = _trace_tree(model, "", report, tuple(leaf_modules), concrete_args, inplace, lazy)
    record_report(result, report)
    return result


def traced_report(module: nn.Module) -> TraceReport:
    """The :class:`TraceReport` of a module returned by :func:`trace` (a report of one whole graph for
    a ``GraphModule`` traced elsewhere, and :class:`TraceError` for a module never traced).

    Example:
        >>> import torch.nn as nn
        >>> traced_report(trace(nn.Sequential(nn.Linear(2, 2)))).complete
        True
    """
    try:
        return report_of(module, TraceReport)
    except FxNormError:
        if isinstance(module, fx.GraphModule):
            return TraceReport(graphs=[""])
    raise TraceError(f"{type(module).__name__} was not traced by fxnorm: call fxnorm.trace(model) first")


def is_traced(module: nn.Module) -> bool:
    """True for the output of :func:`trace` or any ``GraphModule``."""
    if isinstance(module, fx.GraphModule):
        return True
    try:
        report_of(module, TraceReport)
    except FxNormError:
        return False
    return True


def graph_parts(module: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    """Every ``GraphModule`` in ``module`` (itself included), outermost first, with its qualified name.

    Example:
        >>> import torch.nn as nn
        >>> [name for name, _ in graph_parts(trace(nn.Sequential(nn.Linear(2, 2))))]
        ['']
    """
    if isinstance(module, fx.GraphModule):
        yield "", module
        return
    stack = [("", module)]
    while stack:
        name, mod = stack.pop()
        for child_name, child in reversed(list(mod.named_children())):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, fx.GraphModule):
                yield full, child
            else:
                stack.append((full, child))
