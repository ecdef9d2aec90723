"""What tracing must not change in the model it reads: every module's attributes are put back after
a module is traced (:func:`attributes_restored`), user hooks are held while it is traced
(:func:`hooks_held`), and a norm subclass's input-rank check is silenced while the tracer goes
through it (:func:`silenced_rank_check`).

Example:
    >>> import torch.nn as nn
    >>> seen = []
    >>> layer = nn.Linear(2, 2)
    >>> _ = layer.register_forward_hook(lambda m, a, o: seen.append(o))
    >>> with hooks_held([layer]) as hooked:
    ...     _ = layer(torch.ones(1, 2))
    >>> len(seen), hooked == {id(layer)}
    (0, True)
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .kinds import is_plain, known_base

__all__ = ["attributes_restored", "hooks_held", "silenced_rank_check"]

_MISSING = object()


@contextlib.contextmanager
def attributes_restored(modules: list[nn.Module]) -> Iterator[None]:
    """Every module's ``__dict__`` put back after the block as it was before it. Tracing runs a
    module's Python code on proxies, and some modules cache what they compute (torchvision's
    ``MultiScaleRoIAlign`` sets ``self.scales`` on its first call): neither the user's model nor the
    graph may keep a proxy. A ``__dict__`` is compared by identity, key by key and value by value,
    and restored whole when anything differs."""
    saved = [(m, dict(m.__dict__)) for m in modules]
    try:
        yield
    finally:
        for m, state in saved:
            current = m.__dict__
            if (len(current) != len(state) or not all(map(operator.is_, current, state))
                    or not all(map(operator.is_, current.values(), state.values()))):
                current.clear()
                current.update(state)


def _no_check(*args: Any, **kwargs: Any) -> None:
    """Stands in for a norm's ``_check_input_dim`` while the tracer goes inside it."""


@contextlib.contextmanager
def silenced_rank_check(m: nn.Module | None) -> Iterator[None]:
    """A norm subclass with its own forward is traced through; when it calls its base's forward, the
    base's input-rank check (``if input.dim() != 4: raise``) would branch on a proxy and fail the
    whole trace. Silence that check (on this instance, for this call only)."""
    if m is None or known_base(m) is None or is_plain(m) or not callable(getattr(m, "_check_input_dim", None)):
        yield
        return
    saved = m.__dict__.get("_check_input_dim", _MISSING)
    object.__setattr__(m, "_check_input_dim", _no_check)
    try:
        yield
    finally:
        if saved is _MISSING:
            del m.__dict__["_check_input_dim"]
        else:
            m.__dict__["_check_input_dim"] = saved


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_forward_hooks_with_kwargs")


@contextlib.contextmanager
def hooks_held(modules: Iterable[nn.Module]) -> Iterator[set[int]]:
    """No user hook runs while modules are traced (a hook that records hidden states would record
    proxies): the non-empty hook tables of ``modules``, and the global ones, are empty inside the
    block; the global ones are put back after it, the modules' by the caller, which restores their
    ``__dict__``. The block gets the ids of the modules that had hooks. Folds whose values cross a
    hooked module are refused by the planner instead."""
    from torch.nn.modules import module as module_globals

    held = [(g, getattr(module_globals, g)) for g in _GLOBAL_HOOKS if hasattr(module_globals, g)]
    for name, _ in held:
        setattr(module_globals, name, type(getattr(module_globals, name))())
    hooked: set[int] = set()
    for m in modules:
        state = m.__dict__
        for attr in _HOOKS:
            table = state.get(attr)
            if table:
                hooked.add(id(m))
                state[attr] = type(table)()
    try:
        yield hooked
    finally:
        for name, table in held:
            setattr(module_globals, name, table)
