"""The hooks of a recalibration session: :class:`Engine` installs them on the user's model and
keeps everything they need (the chosen norms, the interception mode, the forward in flight).

A *calibration forward* starts in the model's forward pre-hook (run first): every module is put in
eval mode and the :class:`~fxnorm.calibration.interception.NormInterceptor` is pushed; it ends in the
model's ``always_call`` forward hook (run last), which pops the mode and puts every flag back, also
when the forward raised. :meth:`fxnorm.RecalibrationSession.batch` starts and ends one around any
code (its owner is :data:`SCOPE`). The hooks hold the engine weakly and never the session.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxnorm.calibration.observers import NormTarget
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    >>> engine = Engine(model, [NormTarget.for_module("1", model[1])])
    >>> engine.install()
    >>> _ = model(torch.randn(8, 3))
    >>> engine.tally.num_batches, engine.targets[0].calls, model.training
    (1, 1, True)
    >>> engine.remove(); len(model._forward_hooks)
    0
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..errors import CalibrationError
from .batches import batch_size
from .interception import NormInterceptor, remove_mode
from .observers import NormTarget, Tally, observe_batch_norm, observe_instance_norm

__all__ = ["Engine", "SCOPE", "OPEN", "set_training"]

SCOPE = object()  #: owner of a forward started by RecalibrationSession.batch()
OPEN: weakref.WeakSet[Engine] = weakref.WeakSet()  #: engines with hooks installed (for overlap checks)


def set_training(module: nn.Module, mode: bool) -> None:
    """Set one module's flag (not its children's, and without a user ``train()`` override)."""
    if "training" in module.__dict__:
        module.__dict__["training"] = mode
    else:
        module.training = mode



@dataclass(eq=False)
class _Forward:
    """The calibration forward in flight."""

    owner: Any  #: SCOPE, or the frame of the model call that started it
    thread: int
    #: per model call in flight, the exception being handled around it (not a failure of the call)
    outer: list[BaseException | None]
    flipped: list[nn.Module]
    samples: int | None


class Engine:
    """Everything the hooks need; referenced by the hooks, never referencing the session."""

    def __init__(self, model: nn.Module, targets: list[NormTarget]) -> None:
        self.model, self.targets, self.tally = model, targets, Tally()
        self.modules = list(model.modules())
        self.by_module = {id(t.module): t for t in targets}
        self.mode = NormInterceptor({id(t.running_mean): (t, t.running_mean, t.running_var) for t in targets},
                                    self.answer)
        self.handles: list[RemovableHandle] = []
        self.forward: _Forward | None = None

    def answer(self, target: NormTarget, kind: str, bound: dict[str, Any]) -> Any:
        """Answer an intercepted norm call (see :mod:`fxnorm.calibration.interception`)."""
        x, weight, bias, eps = bound["input"], bound["weight"], bound["bias"], float(bound["eps"])
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != target.num_channels:  # torch says what is wrong
            norm = F.instance_norm if kind == "instance_norm" else F.batch_norm
            return norm(x, target.running_mean, target.running_var, weight, bias, False, 0.0, eps)
        if kind == "instance_norm":
            return observe_instance_norm(target, self.tally, x, weight, bias, eps)
        return observe_batch_norm(target, self.tally, x, weight, bias, eps)

    # -- forwards ----------------------------------------------------------------------------
    def begin(self, owner: Any, samples: int | None) -> None:
        if self.forward is not None:
            raise CalibrationError("a calibration forward is already running (session.batch() inside a forward "
                                   "of the model?)")
        flipped = [m for m in self.modules if m.training]
        for m in flipped:
            set_training(m, False)
        self.tally.batch += 1
        calls = [] if owner is SCOPE else [sys.exc_info()[1]]
        self.forward = _Forward(owner, threading.get_ident(), calls, flipped, samples)
        self.mode.__enter__()

    def end(self, ok: bool, why: str = "raised") -> None:
        forward, self.forward = self.forward, None
        if forward is None:
            return
        remove_mode(self.mode)
        for m in forward.flipped:
            set_training(m, True)
        if ok:
            self.tally.num_batches += 1
            self.tally.num_samples += forward.samples or 0
            self.tally.largest = max(self.tally.largest, forward.samples or 0)
        elif self.tally.failed is None:
            self.tally.failed = f"the forward of batch {self.tally.batch} {why}"

    def stale(self) -> bool:
        """Whether the forward in flight was abandoned by an interrupt (its model call is gone)."""
        forward = self.forward
        if forward is None or forward.owner is SCOPE or forward.thread != threading.get_ident():
            return False
        frame = sys._getframe(1)
        while frame is not None:
            if frame is forward.owner:
                return False
            frame = frame.f_back  # type: ignore[assignment]
        return True

    def root_pre(self, call: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        forward = self.forward
        if forward is not None and forward.thread != threading.get_ident():
            raise CalibrationError("the model is being recalibrated and runs in another thread: run the calibration "
                                   "batches from one thread")
        if forward is not None and self.stale():
            self.end(False, "was interrupted")
            forward = None
        if forward is None:
            self.begin(call, batch_size(args, kwargs))
            return
        forward.outer.append(sys.exc_info()[1])  # the model called inside a forward, or inside session.batch()
        if forward.samples is None:
            forward.samples = batch_size(args, kwargs)

    def root_post(self) -> None:
        forward = self.forward
        if forward is None or forward.thread != threading.get_ident() or not forward.outer:
            return
        outer = forward.outer.pop()
        failed = sys.exc_info()[1] is not None and sys.exc_info()[1] is not outer
        if failed and self.tally.failed is None:
            self.tally.failed = f"the forward of batch {self.tally.batch} raised"
        if not forward.outer and forward.owner is not SCOPE:
            self.end(not failed)

    def norm_pre(self, target: NormTarget) -> None:
        forward = self.forward
        if forward is None or forward.thread != threading.get_ident():
            raise CalibrationError(
                f"norm '{target.label}' ran outside a forward of the model being recalibrated (a submodule or a "
                "method called directly, or another thread): run the batches through the model itself, inside "
                "`with session.batch(): ...`, or recalibrate that submodule")
        target.module_calls += 1

    # -- installation --------------------------------------------------------------------------
    def install(self) -> None:
        ref = weakref.ref(self)

        # a copy of the model (copy.deepcopy) carries these hooks along: they only act on the model itself
        def root_pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            engine = ref()
            if engine is not None and module is engine.model:  # the caller's frame lives as long as this call
                engine.root_pre(sys._getframe(1), args, kwargs)

        def root_post(module: nn.Module, args: tuple, kwargs: dict[str, Any], result: Any) -> None:
            engine = ref()
            if engine is not None and module is engine.model:
                engine.root_post()

        def norm_pre(module: nn.Module, args: tuple) -> None:
            engine = ref()
            target = engine.by_module.get(id(module)) if engine is not None else None
            if engine is not None and target is not None and target.module is module:
                engine.norm_pre(target)

        try:
            self.handles.append(self.model.register_forward_pre_hook(root_pre, prepend=True, with_kwargs=True))
            self.handles.append(self.model.register_forward_hook(root_post, with_kwargs=True, always_call=True))
            for module in {id(t.module): t.module for t in self.targets}.values():
                self.handles.append(module.register_forward_pre_hook(norm_pre))
        except BaseException:
            self.remove()
            raise
        OPEN.add(self)

    def remove(self) -> None:
        """End a forward left in flight (an interrupt), take every hook off; idempotent."""
        if self.forward is not None:
            self.end(False, "was interrupted")
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        OPEN.discard(self)
