"""A recalibration session: the hooks and the interception mode installed on the user's own model
between :func:`fxnorm.prepare_recalibration` and :func:`fxnorm.finish_recalibration`.

Nothing of the model is replaced, copied or traced. The session adds

- a forward pre-hook on the model (run first) that starts a *calibration forward*: every module is
  put in eval mode (no dropout, no stochastic depth, no update of running statistics) and a
  :class:`fxnorm.calibration.interception.NormInterceptor` is pushed, which answers the
  ``batch_norm``/``instance_norm`` calls made with a chosen norm's buffers;
- a forward hook on the model (``always_call``, run last) that ends it: the mode is popped and every
  training flag is put back, also when the forward raised;
- a forward pre-hook on every chosen norm module, which counts its calls (a norm module that runs
  without any interceptable call is reported as unsupported) and refuses a norm run outside a
  calibration forward (a submodule called directly, another thread).

A ``KeyboardInterrupt`` skips ``always_call`` hooks (PyTorch runs them for ``Exception`` only): the
interrupted forward is then ended by the next forward, :meth:`RecalibrationSession.close`, the end
of the ``with`` block or :func:`fxnorm.finish_recalibration`, and its batch makes the statistics
unusable. :meth:`RecalibrationSession.batch` runs any code as one calibration forward inside a
``try``/``finally`` (what :func:`fxnorm.recalibrate` does), which an interrupt cannot skip.

The hooks do not keep the session alive: a session that is dropped without being closed removes
its hooks when it is garbage collected.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    >>> with RecalibrationSession.open(model) as session:
    ...     _ = model(torch.randn(8, 3))
    ...     session.targets[0].calls, model.training        # the modes are back between forwards
    (1, True)
    >>> session.closed, len(model[2]._forward_pre_hooks), len(model._forward_hooks)
    (True, 0, 0)
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator
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
from .selection import Select, lazy_uninitialized, select_norms

__all__ = ["RecalibrationSession", "Engine", "unwrap", "set_training"]

_SCOPE = object()  # owner of a forward started by RecalibrationSession.batch()
_OPEN: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines with hooks installed (for overlap checks)


def set_training(module: nn.Module, mode: bool) -> None:
    """Set one module's flag (not its children's, and without a user ``train()`` override)."""
    if "training" in module.__dict__:
        module.__dict__["training"] = mode
    else:
        module.training = mode


def _compiled(module: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled before dynamo is imported
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return (optimized is not None and isinstance(module, optimized)) \
        or module.__dict__.get("_compiled_call_impl") is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The module calibration batches run through: ``model`` without its ``DistributedDataParallel``
    or ``DataParallel`` wrappers (which re-broadcast or replicate buffers at every forward).

    Raises:
        CalibrationError: ``model`` (or a part of it) is compiled with ``torch.compile`` or scripted:
            hooks added now would not be seen by the compiled code.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> unwrap(nn.DataParallel(bn)) is bn
        True
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    for name, module in model.named_modules():
        where = f"'{name}'" if name else "the model"
        if _compiled(module):
            raise CalibrationError(
                f"{where} is compiled with torch.compile: code compiled before the recalibration does not run the "
                "hooks fxnorm adds, so no statistics would be gathered. Recalibrate the uncompiled module (for "
                "m = torch.compile(model): fxnorm.recalibrate(m._orig_mod, data), which shares its parameters and "
                "buffers), or compile after recalibrating; the model was left unchanged")
        if isinstance(module, getattr(sys.modules.get("torch.jit"), "ScriptModule", ())):
            raise CalibrationError(f"{where} is a TorchScript module: fxnorm cannot see its norm calls; recalibrate "
                                   "the Python module before scripting it. The model was left unchanged")
    return model


@dataclass(eq=False)
class _Forward:
    """The calibration forward in flight."""

    owner: Any  #: _SCOPE, or the frame of the model call that started it
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
        calls = [] if owner is _SCOPE else [sys.exc_info()[1]]
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
        elif self.tally.failed is None:
            self.tally.failed = f"the forward of batch {self.tally.batch} {why}"

    def stale(self) -> bool:
        """Whether the forward in flight was abandoned by an interrupt (its model call is gone)."""
        forward = self.forward
        if forward is None or forward.owner is _SCOPE or forward.thread != threading.get_ident():
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
        if not forward.outer and forward.owner is not _SCOPE:
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
        _OPEN.add(self)

    def remove(self) -> None:
        """End a forward left in flight (an interrupt), take every hook off; idempotent."""
        if self.forward is not None:
            self.end(False, "was interrupted")
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        _OPEN.discard(self)


class RecalibrationSession:
    """The state of one recalibration: made by :func:`fxnorm.prepare_recalibration`, ended by
    :func:`fxnorm.finish_recalibration` (writes the statistics) or :meth:`close` (writes nothing).

    Use it as a context manager: leaving the ``with`` block (normally, on an exception or on
    ``KeyboardInterrupt``) removes every hook and mode; the statistics stay in the session, so
    :func:`fxnorm.finish_recalibration` may be called inside the block or after it.

    Example:
        >>> import torch, torch.nn as nn, fxnorm
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> with fxnorm.prepare_recalibration(model) as session:
        ...     with torch.inference_mode():
        ...         _ = model(torch.randn(2, 3, 8, 8))
        >>> fxnorm.finish_recalibration(session) is model, model[1].num_batches_tracked.item()
        (True, 1)
    """

    def __init__(self, engine: Engine, result: nn.Module) -> None:
        self._engine = engine
        self.result = result  #: what :func:`fxnorm.finish_recalibration` returns (the model as given)
        self.finished = False  #: the statistics were written
        self._finalizer = weakref.finalize(self, Engine.remove, engine)

    @classmethod
    def open(cls, model: nn.Module, select: Select = None) -> RecalibrationSession:
        """Install the hooks on ``model`` (see :func:`fxnorm.prepare_recalibration`)."""
        if not isinstance(model, nn.Module):
            raise CalibrationError(f"expected an nn.Module, got {type(model).__name__}")
        inner = unwrap(model)
        chosen = select_norms(inner, select)
        lazy = [name for name, m in chosen if lazy_uninitialized(m)]
        if lazy:
            raise CalibrationError(f"lazy norm(s) {', '.join(lazy)} are not initialized yet: run one forward through "
                                   "the model first (or select other norms)")
        targets = [NormTarget.for_module(name, m) for name, m in chosen]
        busy = {id(t.running_mean): t.label for engine in list(_OPEN) for t in engine.targets}
        taken = [busy[id(t.running_mean)] for t in targets if id(t.running_mean) in busy]
        if taken:
            raise CalibrationError(f"norm(s) {', '.join(taken[:6])} are already in a recalibration session: finish "
                                   "or close it first (fxnorm.finish_recalibration(session) or session.close())")
        engine = Engine(inner, targets)
        engine.install()
        return cls(engine, model)

    @property
    def model(self) -> nn.Module:
        """The module the batches run through (``DistributedDataParallel`` and ``DataParallel`` unwrapped)."""
        return self._engine.model

    @property
    def targets(self) -> list[NormTarget]:
        """The chosen norms and what was gathered for each."""
        return self._engine.targets

    @property
    def tally(self) -> Tally:
        """Batches and samples seen, and why the statistics cannot be used (if they cannot)."""
        return self._engine.tally

    @property
    def closed(self) -> bool:
        """Whether the hooks are off the model (after :meth:`close`, the ``with`` block or finishing)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove every hook and mode from the model (idempotent). Writes nothing: the statistics
        stay in the session for :func:`fxnorm.finish_recalibration`."""
        self._finalizer()

    def end_interrupted(self) -> None:
        """End a forward an interrupt left in flight (its batch makes the statistics unusable)."""
        if self._engine.forward is not None and self._engine.stale():
            self._engine.end(False, "was interrupted")

    @contextlib.contextmanager
    def batch(self, num_samples: int | None = None) -> Iterator[RecalibrationSession]:
        """Run the block as one calibration forward: every module in eval mode, the norm calls
        intercepted, everything put back when it ends (also on an interrupt). For code that does not
        call the model itself (``model.forward_features(x)``...). ``num_samples``: the batch size
        (default: read from the first call of the model inside the block, else 0).

        Example:
            >>> import torch, torch.nn as nn, fxnorm
            >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
            >>> with fxnorm.prepare_recalibration(model) as session:
            ...     with session.batch(4):
            ...         _ = model[1](model[0](torch.randn(4, 2)))     # submodules called one by one
            >>> fxnorm.finish_recalibration(session).__class__.__name__, session.tally.num_samples
            ('Sequential', 4)
        """
        if self.closed:
            raise CalibrationError("this recalibration session is closed: call fxnorm.prepare_recalibration(model) again")
        self.end_interrupted()
        self._engine.begin(_SCOPE, num_samples)
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._engine.end(ok)

    def __enter__(self) -> RecalibrationSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
