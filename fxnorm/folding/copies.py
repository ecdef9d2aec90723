"""Copy a model for folding without copying what folding replaces anyway.

:func:`fxnorm.fold` works on a copy of the user's model. A plain ``copy.deepcopy`` copies every conv
and linear weight, and folding then replaces most of them by new tensors: :func:`copy_sharing_layers`
leaves those tensors shared, and :func:`unshare` deep-copies the ones the folded model still uses,
so the result shares nothing with the user's model (ties inside the copy are kept). Nothing here
writes into a shared tensor.

The copy is ``copy.deepcopy``'s, made faster for what a module tree holds (modules copied the default
way, their tables, plain tensors and Parameters): same objects, same sharing, same memo; anything
else goes through ``copy.deepcopy`` itself.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    >>> shared = {}
    >>> copied = copy_sharing_layers(model, shared)
    >>> copied[0].weight is model[0].weight, len(shared)
    (True, 2)
    >>> unshare(copied, shared)
    >>> copied[0].weight is model[0].weight, bool((copied[0].weight == model[0].weight).all())
    (False, True)
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy
from torch.overrides import has_torch_function_unary

from ..graph.kinds import layer_kind
from ..graph.readers import MODULE_OWN_ATTRIBUTES

__all__ = ["copy_sharing_layers", "unshare"]


def copy_sharing_layers(model: nn.Module, shared: dict[int, torch.Tensor]) -> nn.Module:
    """``copy.deepcopy(model)`` that does not copy the weights and biases of conv/linear layers: most
    of them are replaced by folded ones anyway. Those are left shared and recorded in ``shared``;
    :func:`unshare` copies the ones still in use once folding is done."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if layer_kind(module) is None:
            continue
        for t in module._parameters.values():
            if isinstance(t, torch.Tensor) and not is_lazy(t):
                memo[id(t)] = t
                shared[id(t)] = t
    return _DeepCopy(memo).copy(model)


def unshare(result: nn.Module, shared: dict[int, torch.Tensor]) -> None:
    """Replace every tensor of ``result`` still shared with the user's model by a deep copy, in the
    parameter and buffer tables and wherever the copy holds it besides (``self.held = [layer.weight]``:
    plain attributes, lists, dicts and tuples in them). Ties inside ``result`` are kept: one copy
    per tensor."""
    if not shared:
        return
    copies: dict[int, torch.Tensor] = {}

    def copy_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = _DeepCopy({}).copy(t)
        return copies[id(t)]

    seen: set[int] = set()
    for module in _modules(result):
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if id(t) in shared and shared[id(t)] is t:
                    store[key] = copy_of(t)  # type: ignore[assignment]  # a Parameter's deepcopy is one
        state = module.__dict__
        for key in state.keys() - MODULE_OWN_ATTRIBUTES:
            value = state[key]
            if type(value) in _ATOMIC:
                continue  # most of a module's attributes hold no tensor
            if type(value) in (tuple, list) and all(type(v) in _ATOMIC for v in value):
                continue  # kernel_size, padding...
            held = _held_copies(value, shared, copy_of, seen)
            if held is not value:
                state[key] = held



def _held_copies(value: Any, shared: dict[int, torch.Tensor], copy_of: Any, seen: set[int]) -> Any:
    """``value`` with every tensor of ``shared`` in it replaced by ``copy_of(tensor)``: the lists and
    dicts in it (copies made by the work copy) changed in place, tuples made anew."""
    if isinstance(value, torch.Tensor):
        return copy_of(value) if shared.get(id(value)) is value else value
    if type(value) not in (list, dict, OrderedDict, tuple) or id(value) in seen:
        return value
    seen.add(id(value))
    if type(value) is tuple:
        items = tuple(_held_copies(v, shared, copy_of, seen) for v in value)
        return items if any(a is not b for a, b in zip(items, value)) else value
    keys = range(len(value)) if type(value) is list else list(value)
    for key in keys:
        value[key] = _held_copies(value[key], shared, copy_of, seen)
    return value


def _modules(root: nn.Module) -> list[nn.Module]:
    """``list(root.modules())`` (each module once), without the names ``named_modules`` builds."""
    seen, found, todo = {id(root)}, [root], [root]
    while todo:
        for child in todo.pop()._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                todo.append(child)
    return found


_ATOMIC = frozenset({bool, int, float, str, type(None)})
_EMPTY = frozenset({dict, OrderedDict, set})  # copy.deepcopy makes a new empty one of these
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")


def _default_class(cls: type[nn.Module]) -> bool:
    """True when ``copy.deepcopy`` copies instances of module class ``cls`` the default way (unless
    the instance itself holds a copy hook): ``cls.__new__(cls)``, then ``__setstate__`` (the class's
    own, convs have one) of a deep copy of ``nn.Module.__getstate__()``."""
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__ and cls.__new__ is object.__new__
            and getattr(cls, "__getnewargs_ex__", None) is None and getattr(cls, "__getnewargs__", None) is None)


def _plain_tensor(t: torch.Tensor) -> bool:
    """True when ``Tensor.__deepcopy__`` copies ``t`` (of type ``torch.Tensor``) by cloning its
    storage and nothing else: a dense CPU/CUDA leaf, no grad, no attributes, no torch function."""
    return (not t.__dict__ and t.is_leaf and t.grad is None and t.layout is torch.strided
            and (t.is_cpu or t.is_cuda) and not (t.is_quantized or t.is_conj() or t.is_neg())
            and not has_torch_function_unary(t))


class _DeepCopy:
    """``copy.deepcopy(x, memo)``, faster for modules copied the default way (their empty hook tables,
    a dozen ``OrderedDict`` s per module, made directly instead of through ``__reduce_ex__``), plain
    dicts, tensors and Parameters. Every object it copies goes in ``memo`` and is kept alive with it,
    as ``copy.deepcopy`` does; anything else is copied by ``copy.deepcopy(x, memo)``."""

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo
        self.alive: list[Any] = memo.setdefault(id(memo), [])  # copy.deepcopy's own keep-alive list
        self.default_classes: dict[type[nn.Module], bool] = {}  # module class -> _default_class(class)

    def copy(self, x: Any) -> Any:
        """A deep copy of ``x``: the memo's copy if ``x`` was copied already."""
        found = self.memo.get(id(x), self.memo)
        if found is not self.memo:
            return found
        cls = type(x)
        if cls in _ATOMIC:
            return x
        if cls is dict:
            return self._dict(x)
        if cls is torch.Tensor and _plain_tensor(x):
            return self._tensor(x)
        if cls is nn.Parameter and "__deepcopy__" not in x.__dict__:
            return self._parameter(x)
        if isinstance(x, nn.Module) and self._default_copy(x):
            return self._module(x)
        return copy.deepcopy(x, self.memo)

    def _done(self, x: Any, y: Any) -> Any:
        """Record ``y`` as the copy of ``x``, keeping ``x`` alive as long as the memo; returns ``y``."""
        self.memo[id(x)] = y
        self.alive.append(x)
        return y

    def _default_copy(self, module: nn.Module) -> bool:
        """True when ``copy.deepcopy`` copies ``module`` the default way (see :func:`_default_class`)."""
        cls = type(module)
        default = self.default_classes.get(cls)
        if default is None:
            default = self.default_classes[cls] = _default_class(cls)
        return default and module.__dict__.keys().isdisjoint(_COPY_HOOKS)

    def _dict(self, x: dict) -> dict:
        """What ``copy._deepcopy_dict`` does: the new dict in the memo first, then keys and values."""
        y: dict = {}
        self._done(x, y)
        for key, value in x.items():
            y[key if type(key) is str else self.copy(key)] = self.copy(value)
        return y

    def _parameter(self, p: nn.Parameter) -> nn.Parameter:
        """What ``Parameter.__deepcopy__`` does (a clone; neither its grad nor its attributes)."""
        return self._done(p, nn.Parameter(p.data.clone(memory_format=torch.preserve_format), p.requires_grad))

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        """What ``Tensor.__deepcopy__`` does for a :func:`_plain_tensor`: a copy of its whole storage,
        one per storage (views of one storage stay views of one copy), viewed the same way. A tensor
        that is its whole storage, densely, is cloned: the same bytes in a storage of the same size,
        viewed the same way, in one call instead of four."""
        memo = self.memo
        storage = t.untyped_storage()
        y = None
        new_storage = memo.get(id(storage), memo)
        if new_storage is memo:
            by_storage = memo.setdefault("torch", {})  # UntypedStorage.__deepcopy__'s table
            new_storage = by_storage.get(storage._cdata)
            if new_storage is None and t.is_contiguous() and not t.storage_offset() and (
                    storage.nbytes() == t.numel() * t.element_size()):
                y = (t.detach() if t.requires_grad else t).clone()
                new_storage = by_storage[storage._cdata] = y.untyped_storage()
            elif new_storage is None:
                new_storage = by_storage[storage._cdata] = storage.clone()
            self._done(storage, new_storage)
        if y is None:
            y = t.new_empty([])
            y.set_(new_storage, t.storage_offset(), t.size(), t.stride())
        if t.requires_grad:
            y.requires_grad_()
        self._done(t.__dict__, y.__dict__)  # deepcopy's copy of the (empty) attributes
        return self._done(t, y)

    def _module(self, x: nn.Module) -> nn.Module:
        """``cls.__new__(cls)`` and ``__setstate__`` of a deep copy of ``x.__getstate__()``, made here
        for what every module holds: scalars, empty hook tables and sets."""
        memo, alive = self.memo, self.alive
        y = type(x).__new__(type(x))
        memo[id(x)] = y
        alive.append(x)
        state = {}
        for key, value in x.__getstate__().items():
            cls = type(value)
            if cls in _ATOMIC or (cls is tuple and _ATOMIC.issuperset(map(type, value))):
                state[key] = value  # deepcopy returns these themselves, and does not memo them
            elif id(value) in memo:
                state[key] = memo[id(value)]
            elif cls in _EMPTY and not value and (cls is not OrderedDict or not value.__dict__):
                state[key] = memo[id(value)] = cls()  # an empty hook table, buffer set, child table
                alive.append(value)
            else:
                state[key] = self.copy(value)
        y.__setstate__(state)
        return y
