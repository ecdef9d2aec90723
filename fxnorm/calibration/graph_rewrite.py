"""The graph side of :func:`fxnorm.prepare_recalibration`: trace in eval mode, put observers in place of the chosen
norms (graph nodes, functional calls of traced-through subclasses, children of untraced glue), and
wrap the prepared model's forward so that every module runs in eval mode for its duration.

Nothing here writes to the user's model: graph parts are fxnorm's own (or copies of the user's
``GraphModule`` s), untraced glue is shallow-copied by :func:`fxnorm.trace`, and the training flags of
shared modules are put back after every forward, also when it raises.

Example:
    >>> import torch.nn as nn
    >>> from fxnorm.calibration.observers import NormTarget, Session
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    >>> root = build_prepared(model, [NormTarget.for_module("1", model[1])], Session())[0]
    >>> [n.target for n in root.graph.nodes if n.op == "call_module"]   # the conv's bias gets a shift
    ['_fxnorm_shifted_1', '_fxnorm_observer_0']
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .batches import batch_size
from ..errors import CalibrationError
from ..graph.calls import bind_node, constant_value
from ..graph.kinds import functional_norm_kind, is_plain
from .fast_path import ShiftedProducer, add_into
from .observers import NormObserver, NormTarget, Session
from ..graph.tracing import graph_parts, trace

__all__ = ["PreparedState", "ShiftedProducer", "state_of", "build_prepared", "install_forward", "set_training"]

STATE_ATTR = "_fxnorm_calibration"
# producers whose output is a new tensor that only the graph holds: an observer may normalize over it
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)
_SHIFTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # calls whose bias can take a shift
_FRESH_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    F.linear, torch.conv1d, torch.conv2d, torch.conv3d)


@dataclass(eq=False)
class PreparedState:
    """Everything :func:`fxnorm.finish_recalibration` needs, kept on the prepared model."""

    model: nn.Module
    session: Session
    targets: list[NormTarget]
    unsupported: dict[str, str]
    modules: list[nn.Module] = field(default_factory=list)  # every module a prepared forward can run
    depth: int = 0
    converted: bool = False


def state_of(prepared: nn.Module) -> PreparedState:
    """The state :func:`fxnorm.prepare_recalibration` left on ``prepared`` (CalibrationError for anything else)."""
    state = getattr(prepared, "__dict__", {}).get(STATE_ATTR)
    if not isinstance(state, PreparedState):
        raise CalibrationError(f"{type(prepared).__name__} was not made by fxnorm.prepare_recalibration: call "
                               "fxnorm.prepare_recalibration(model) "
                               "first and run the calibration batches through what it returns")
    return state


def set_training(module: nn.Module, mode: bool) -> None:
    """Set one module's flag (not its children's, and without a user ``train()`` override)."""
    if "training" in module.__dict__:
        module.__dict__["training"] = mode
    else:
        module.training = mode


def install_forward(root: nn.Module, state: PreparedState) -> None:
    """Wrap the prepared root's forward: count the batch, run every module in eval mode, put the
    flags back afterwards (also on an exception or interrupt) and mark a failed forward."""
    inner = root.forward
    session = state.session

    def forward(*args: Any, **kwargs: Any) -> Any:
        if state.converted:
            raise CalibrationError("this prepared model was already finished: call fxnorm.prepare_recalibration(model) again")
        if state.depth:  # re-entrant call: the outer one owns the flags
            return inner(*args, **kwargs)
        state.depth = 1
        session.batch += 1
        flipped = [m for m in state.modules if m.training]
        for m in flipped:
            set_training(m, False)
        done = False
        try:
            out = inner(*args, **kwargs)
            done = True
            return out
        finally:
            for m in flipped:
                set_training(m, True)
            state.depth = 0
            if done:
                session.num_batches += 1
                session.num_samples += batch_size(args, kwargs)
            elif session.failed is None:
                session.failed = f"the forward of batch {session.batch} raised"

    root.__dict__["forward"] = forward


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph that shares every submodule, parameter and buffer with ``gm``."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph, type(gm).__name__)


def _constant(gm: fx.GraphModule, value: Any) -> Any:
    """A ``get_attr`` argument's value (None for anything computed in the graph)."""
    try:
        return constant_value(gm, value) if isinstance(value, fx.Node) else None
    except (LookupError, AttributeError):
        return None


def _functional_call(node: fx.Node) -> tuple[Any, dict[str, Any]] | None:
    """(input, arguments by ``F.batch_norm`` name) of a functional batch/instance norm node."""
    kind = functional_norm_kind(node.target) if node.op == "call_function" else None
    args = bind_node(node) if kind in ("batch_norm", "instance_norm") else None
    if args is None:
        return None
    named = {k: v for k, v in args.items() if k not in ("input", "cudnn_enabled")}
    if "use_input_stats" in named:
        named["training"] = named.pop("use_input_stats")
    return args["input"], named


class _Rewriter:
    """Puts observers in place of the chosen norms of a traced model (graph parts and eager glue)."""

    def __init__(self, model: nn.Module, targets: list[NormTarget], session: Session) -> None:
        self.user_ids = {id(m) for m in model.modules()}
        self.by_module = {id(t.module): t for t in targets if t.module is not None}
        self.by_buffer = {id(t.running_mean): t for t in targets}
        self.session = session
        self.observed: set[int] = set()
        self.count = 0

    def observer(self, target: NormTarget, module: nn.Module | None) -> NormObserver:
        self.observed.add(id(target))
        return NormObserver(target, self.session, module=module)

    def graph(self, gm: fx.GraphModule) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "call_module":
                module = gm.get_submodule(str(node.target))
                target = self.by_module.get(id(module))
                if target is None or not is_plain(module):
                    continue
                node.target = self.add(gm, self.observer(target, module))
            elif node.op == "call_method" and node.target == "add_" and not node.users:
                counter = _constant(gm, node.args[0]) if node.args else None
                if any(counter is t.num_batches_tracked for t in self.by_buffer.values()):
                    graph.erase_node(node)  # a training-mode trace's num_batches_tracked.add_(1)
            else:
                call = _functional_call(node)
                target = self.by_buffer.get(id(_constant(gm, call[1].get("running_mean")))) if call else None
                if target is None:
                    continue
                name = self.add(gm, self.observer(target, None))
                with graph.inserting_before(node):
                    new = graph.call_module(name, (call[0],), call[1])
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
        self.inplace_adds(gm)
        self.mark_overwrites(gm)
        graph.lint()
        gm.recompile()

    def inplace_adds(self, gm: fx.GraphModule) -> None:
        """Give back the in-place residual adds that tracing made out of place (see :func:`add_into`)."""
        observers = {node for node in gm.graph.nodes
                     if node.op == "call_module" and str(node.target).startswith("_fxnorm_observer_")}
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.args) != 2 \
                    or node.kwargs:
                continue
            for i, arg in enumerate(node.args):
                if arg in observers and len(arg.users) == 1:
                    node.target = add_into
                    node.args = (arg, node.args[1 - i])
                    break

    def mark_overwrites(self, gm: fx.GraphModule) -> None:
        """Let observers write their output over their input when it is a conv/linear output that
        nothing else reads (saves a new tensor and half the normalization's memory traffic)."""
        for node in gm.graph.nodes:
            if node.op != "call_module" or not str(node.target).startswith("_fxnorm_observer_") or not node.args:
                continue
            source = node.args[0]
            if not isinstance(source, fx.Node) or len(source.users) != 1:
                continue
            producer = gm.get_submodule(str(source.target)) if source.op == "call_module" else None
            if producer is not None and type(producer) in _FRESH_MODULES \
                    or source.op == "call_function" and any(source.target is f for f in _FRESH_FUNCTIONS):
                observer = gm.get_submodule(str(node.target))
                observer.overwrite_input = True
                observer.__dict__["producer"] = producer
                if type(producer) in _SHIFTABLE and not observer.target.instance and len(source.args) == 1 \
                        and not source.kwargs:
                    source.target = self.add(gm, ShiftedProducer(producer, observer), "_fxnorm_shifted_")
                    observer.shiftable = True

    def add(self, gm: fx.GraphModule, module: nn.Module, prefix: str = "_fxnorm_observer_") -> str:
        name = f"{prefix}{self.count}"
        self.count += 1
        gm.add_submodule(name, module)
        return name

    def eager(self, module: nn.Module) -> None:
        if isinstance(module, fx.GraphModule):
            return
        for child_name, child in list(module._modules.items()):
            if child is None or isinstance(child, NormObserver):
                continue
            target = self.by_module.get(id(child))
            if target is not None and is_plain(child) and id(module) not in self.user_ids:
                module._modules[child_name] = self.observer(target, child)
            elif id(child) not in self.user_ids or child._modules:
                self.eager(child)


def _trace_in_eval(model: nn.Module) -> nn.Module:
    """Trace with every module in eval mode (so traced-through code bakes in eval behaviour: no
    dropout, no stochastic depth, no running-statistics update), then put the flags back."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            set_training(m, False)
        return trace(model)
    finally:
        for m, mode in flags:
            set_training(m, mode)


def _own_root(model: nn.Module, traced: nn.Module) -> nn.Module:
    """The prepared root must be a new object (its forward gets wrapped)."""
    if isinstance(traced, fx.GraphModule):
        return _copy_graph_module(traced) if traced is model else traced
    if traced is model:
        new = copy.copy(model)
        new._modules = dict(model._modules)  # type: ignore[assignment]
        return new
    return traced


def build_prepared(model: nn.Module, targets: list[NormTarget], session: Session) -> tuple[nn.Module, set[int]]:
    """The prepared root (a new object) with observers for ``targets``, and the ids of the targets
    that got at least one observer."""
    rewriter = _Rewriter(model, targets, session)
    root_target = rewriter.by_module.get(id(model))
    if root_target is not None and is_plain(model):
        return rewriter.observer(root_target, model), rewriter.observed
    root = _own_root(model, _trace_in_eval(model))
    for prefix, gm in list(graph_parts(root)):
        if id(gm) in rewriter.user_ids:  # a GraphModule of the user's: rewrite a copy
            parent, _, child = prefix.rpartition(".")
            holder = root.get_submodule(parent)
            if id(holder) in rewriter.user_ids:
                continue
            gm = holder._modules[child] = _copy_graph_module(gm)
        rewriter.graph(gm)
    rewriter.eager(root)
    return root, rewriter.observed
