"""Which normalization layers :func:`fxnorm.reset` and :func:`fxnorm.recalibrate` act on.

A *statistics norm* is a norm module that holds running statistics it updates in training mode:
``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants, subclasses of them, and ``InstanceNorm*d``
with ``track_running_stats=True``. torchvision's ``FrozenBatchNorm2d`` is frozen by design and is
never touched; ``LayerNorm``, ``GroupNorm`` and ``RMSNorm`` have no running statistics.

``select`` narrows them down, always against the qualified module names of the user's model:

- ``None``: every statistics norm;
- a glob (``"layer4.*"``) or a sequence of globs (any of them matches, ``fnmatch`` syntax);
- a class or a tuple of classes (``isinstance``);
- a predicate ``select(name, module) -> bool``.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(4), nn.BatchNorm2d(4))
    >>> [name for name, _ in select_norms(m)]
    ['1', '3']
    >>> [name for name, _ in select_norms(m, select="3")]
    ['3']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Union

import torch.nn as nn

from ..errors import CalibrationError
from ..graph.kinds import has_running_stats, norm_kind

__all__ = ["Select", "STAT_KINDS", "is_stat_norm", "stat_norms", "matcher", "select_norms", "lazy_uninitialized"]

#: What ``select`` may be (see the module docstring).
Select = Union[None, str, Sequence[str], type, tuple, Callable[[str, nn.Module], bool]]

#: Norm kinds that keep running statistics (InstanceNorm only with ``track_running_stats=True``).
STAT_KINDS = frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
})


def is_stat_norm(module: nn.Module) -> bool:
    """True for a norm module whose running statistics fxnorm resets and recalibrates.

    Example:
        >>> is_stat_norm(nn.BatchNorm2d(3)), is_stat_norm(nn.InstanceNorm2d(3)), is_stat_norm(nn.LayerNorm(3))
        (True, False, False)
    """
    return (
        norm_kind(module) in STAT_KINDS
        and bool(getattr(module, "track_running_stats", False))
        and has_running_stats(module)
    )


def stat_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every statistics norm of ``model`` with its qualified name, in ``named_modules`` order
    (a module registered under several names appears once, under its first name).

    Example:
        >>> [name for name, _ in stat_norms(nn.Sequential(nn.BatchNorm1d(2), nn.ReLU()))]
        ['0']
    """
    return [(name, m) for name, m in model.named_modules() if is_stat_norm(m)]


def matcher(select: Select) -> Callable[[str, nn.Module | None], bool]:
    """Turn ``select`` into a predicate ``(qualified name, module or None) -> bool``.

    Raises :class:`CalibrationError` for a value that is none of the accepted forms.

    Example:
        >>> match = matcher(["layer1.*", "fc"])
        >>> match("layer1.0.bn1", None), match("layer2.0.bn1", None)
        (True, False)
    """
    if select is None:
        return lambda name, module: True
    if isinstance(select, str):
        pattern = select
        return lambda name, module: fnmatch.fnmatchcase(name, pattern)
    if isinstance(select, type) or (isinstance(select, tuple) and select and all(isinstance(t, type) for t in select)):
        types = select
        return lambda name, module: module is not None and isinstance(module, types)
    if isinstance(select, Sequence) and select and all(isinstance(p, str) for p in select):
        patterns = tuple(select)
        return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if callable(select):
        predicate = select

        def call(name: str, module: nn.Module | None) -> bool:
            return bool(predicate(name, module))  # type: ignore[arg-type]  # module is None only for bare functions

        return call
    raise CalibrationError(
        f"select={select!r} is not understood: pass a name glob ('layer4.*'), a list of globs, a norm class "
        "(nn.BatchNorm2d), a tuple of classes, or a predicate f(name, module) -> bool"
    )


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_norms(model: nn.Module, select: Select = None) -> list[tuple[str, nn.Module]]:
    """The statistics norms of ``model`` chosen by ``select``.

    Raises:
        CalibrationError: ``model`` has no statistics norm, ``select`` matches none of them, or
            ``select`` is malformed. Nothing is changed either way.

    Example:
        >>> m = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
        >>> [name for name, _ in select_norms(m, select=lambda name, mod: name == "1")]
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"expected an nn.Module, got {type(model).__name__}")
    match = matcher(select)
    found = stat_norms(model)
    if not found:
        kinds = sorted({k for m in model.modules() if (k := norm_kind(m)) is not None})
        has = f" (it has {', '.join(kinds)}, which keep no running statistics)" if kinds else ""
        raise CalibrationError(
            f"{type(model).__name__} has no normalization layer with running statistics{has}: nothing to "
            "reset or recalibrate; the model was left unchanged"
        )
    chosen = [(name, m) for name, m in found if match(name, m)]
    if not chosen:
        raise CalibrationError(
            f"select={select!r} matches none of the {len(found)} norms with running statistics "
            f"({_preview([n for n, _ in found])}); the model was left unchanged"
        )
    return chosen


def lazy_uninitialized(module: nn.Module) -> bool:
    """True for a lazy norm whose buffers are not materialized yet (run one forward first)."""
    return isinstance(getattr(module, "running_mean", None), nn.parameter.UninitializedBuffer) or (
        isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter)
    )

