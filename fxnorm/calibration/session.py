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
import weakref
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from ..errors import CalibrationError, StopForward
from .engine import OPEN, SCOPE, Engine
from .observers import NormTarget, Tally
from .selection import Select, lazy_uninitialized, select_norms

__all__ = ["RecalibrationSession", "unwrap"]


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
        busy = {id(t.running_mean): t.label for engine in list(OPEN) for t in engine.targets}
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
        self._engine.begin(SCOPE, num_samples)
        ok = False
        try:
            yield self
            ok = True
        except StopForward:  # ended early on purpose: complete
            ok = True
            raise
        finally:
            self._engine.end(ok)

    def __enter__(self) -> RecalibrationSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
