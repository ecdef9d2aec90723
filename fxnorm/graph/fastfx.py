"""Cheaper ``torch.fx`` machinery for tracing many parts of a model: :class:`LazyGraphModule`, and the
``math`` functions ``torch.fx`` records as graph calls wrapped once instead of at every trace.

``LazyGraphModule`` is torch's ``_LazyGraphModule`` (``GraphModule`` on torch versions without it): a
``GraphModule`` that generates its Python code the first time it is called or its ``code`` is read.

``fx.Tracer.trace`` replaces, for the duration of a trace, every public function of its
``autowrap_modules`` (``math`` by default) by a wrapper that records a call on proxies as a
``call_function`` node and otherwise calls the function. torch makes those wrappers anew at every
trace, which is most of the cost of tracing a small module (a model traced part by part tries many).
:func:`autowrapped` does the same replacement with wrappers made once (a wrapper depends on its
function only); :class:`fxnorm.graph.tracing.NormTracer` uses it in place of torch's.

``fx.Proxy.__iter__`` (``a, b = proxy``) disassembles the whole calling function to find out whether
it is unpacking a sequence, and does so again for every ``for x in proxy`` that fails a trace: a few
milliseconds per attempt on the long ``forward`` s of detection models. :class:`UnpackingProxy` reads
the one instruction being run instead (same graphs, same errors).

``fx.Tracer.trace`` sets ``nn.Module.__call__`` and ``nn.Module.__getattr__`` to its wrappers and back
(three times: patch, revert, revert) on every trace. Setting an attribute of ``nn.Module`` makes
CPython update every subclass (hundreds once torchvision is imported): about 0.1 ms each, most of
the cost of a failed attempt. :func:`module_patches_hoisted` sets them once, to dispatchers, for a
whole part-by-part trace; the tracer's patches then switch the dispatchers' targets.

Example:
    >>> import math, torch.fx as fx
    >>> sqrt = math.sqrt
    >>> with autowrapped([math], {id(sqrt)}):
    ...     math.sqrt is not sqrt, math.sqrt(4.0)
    (True, 2.0)
    >>> math.sqrt is sqrt
    True
"""

from __future__ import annotations

import contextlib
import dis
import sys
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
import torch.nn as nn

try:  # torch >= 2.3
    from torch.fx._lazy_graph_module import _LazyGraphModule as LazyGraphModule
except ImportError:  # pragma: no cover
    LazyGraphModule = fx.GraphModule  # type: ignore[misc, assignment]
try:  # the patcher torch's tracer sets nn.Module.__call__/__getattr__ with (torch.fx._symbolic_trace)
    from torch.fx._symbolic_trace import _Patcher
except ImportError:  # pragma: no cover
    _Patcher = None  # type: ignore[assignment, misc]
try:  # torch's wrapper (torch.fx._symbolic_trace), the one its tracer puts around math functions
    from torch.fx._symbolic_trace import _create_wrapped_func
except ImportError:  # pragma: no cover
    _create_wrapped_func = None  # type: ignore[assignment]

__all__ = ["LazyGraphModule", "UnpackingProxy", "autowrapped", "can_autowrap", "module_patches_hoisted"]

_WRAPPERS: dict[int, Any] = {}  #: id(function) -> its torch.fx wrapper, made once


def can_autowrap(tracer: Any) -> bool:
    """True when ``tracer`` keeps its autowrap modules and function ids as the torch versions fxnorm
    knows do (else leave the wrapping to torch)."""
    return _create_wrapped_func is not None and isinstance(getattr(tracer, "_autowrap_search", None), list) \
        and isinstance(getattr(tracer, "_autowrap_function_ids", None), set)


@contextlib.contextmanager
def autowrapped(modules: list, function_ids: set[int]) -> Iterator[None]:
    """What ``fx.Tracer.trace`` does to its ``autowrap_modules`` (``math``) on every trace: each of their
    public functions is replaced, during the trace, by a wrapper that records a call on proxies as a
    ``call_function`` node and otherwise calls the function. torch makes new wrappers every time
    (most of the cost of tracing a small module); they depend on the function only, so they are made
    once here."""
    patched: list[tuple[dict, str, Any]] = []
    try:
        for module in modules:
            table = module.__dict__
            for name, value in list(table.items()):
                if not name.startswith("_") and callable(value) and id(value) in function_ids:
                    wrapper = _WRAPPERS.get(id(value))
                    if wrapper is None or wrapper.__wrapped__ is not value:
                        wrapper = _WRAPPERS[id(value)] = _create_wrapped_func(value)
                    table[name] = wrapper
                    patched.append((table, name, value))
        yield
    finally:
        for table, name, value in reversed(patched):
            table[name] = value


_UNPACK_SEQUENCE = dis.opmap["UNPACK_SEQUENCE"]
_EXTENDED_ARG = dis.opmap["EXTENDED_ARG"]


class UnpackingProxy(fx.Proxy):
    """``fx.Proxy`` whose ``__iter__`` reads only the instruction its caller is running:
    ``a, b = proxy`` (``UNPACK_SEQUENCE 2``) records ``proxy[0]`` and ``proxy[1]``; any other iteration
    goes to ``tracer.iter``, which raises torch's ``TraceError`` ("Proxy object cannot be iterated").

    Example:
        >>> import torch
        >>> class Split(torch.nn.Module):
        ...     def forward(self, x):
        ...         a, b = x.unbind(0)
        ...         return a - b
        >>> class Tracer(fx.Tracer):
        ...     def proxy(self, node):
        ...         return UnpackingProxy(node, self)
        >>> [n.name for n in Tracer().trace(Split()).nodes]
        ['x', 'unbind', 'getitem', 'getitem_1', 'sub', 'output']
    """

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = sys._getframe(1)
        code, at = frame.f_code.co_code, frame.f_lasti  # the caller's (unspecialized) bytes; its instruction's offset
        if 0 <= at < len(code) - 1 and code[at] == _UNPACK_SEQUENCE:
            count, shift, before = code[at + 1], 8, at - 2
            while before >= 0 and code[before] == _EXTENDED_ARG:
                count |= code[before + 1] << shift
                shift, before = shift + 8, before - 2
            return (self[i] for i in range(count))  # type: ignore[index]
        return self.tracer.iter(self)


_HOISTED = ("__call__", "__getattr__")


class _SlotPatch:
    """What torch's ``_PatchedFnSetAttr`` does to an attribute of ``nn.Module``, done to the target of
    a dispatcher of :func:`module_patches_hoisted` (``patch`` and ``revert`` may each run twice)."""

    def __init__(self, slots: dict[str, Any], name: str, orig_fn: Any, new_fn: Any) -> None:
        self.slots, self.fn_name, self.orig_fn, self.new_fn = slots, name, orig_fn, new_fn

    def patch(self) -> None:
        self.slots[self.fn_name] = self.new_fn

    def revert(self) -> None:
        self.slots[self.fn_name] = self.orig_fn


def _can_hoist() -> bool:
    return (_Patcher is not None and callable(_Patcher.__dict__.get("patch_method"))
            and all(name in nn.Module.__dict__ for name in _HOISTED))


@contextlib.contextmanager
def module_patches_hoisted() -> Iterator[None]:
    """Inside the block, ``nn.Module.__call__`` and ``nn.Module.__getattr__`` are dispatchers that call
    what torch's tracer patched in, or the originals, and the tracer's patches of them change only
    the dispatchers' targets: tracing many parts sets attributes of ``nn.Module`` four times in all
    instead of six times per part. Everything is put back after the block. (On torch versions whose
    tracer patches differently, nothing changes.) Like torch's own patching this is process-wide:
    modules called by another thread during the block go through the dispatchers, which call the
    originals whenever no trace is running.

    Example:
        >>> import torch, torch.nn as nn
        >>> call = nn.Module.__call__
        >>> with module_patches_hoisted():
        ...     graph = fx.Tracer().trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        ...     hoisted = nn.Module.__call__ is not call
        >>> hoisted, nn.Module.__call__ is call, [n.op for n in graph.nodes]
        (True, True, ['placeholder', 'call_module', 'call_module', 'output'])
    """
    if not _can_hoist():  # pragma: no cover
        yield
        return
    saved = {name: nn.Module.__dict__[name] for name in _HOISTED}
    slots = dict(saved)
    torch_patch_method = _Patcher.__dict__["patch_method"]

    def dispatch_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return slots["__call__"](module, *args, **kwargs)

    def dispatch_getattr(module: nn.Module, name: str) -> Any:
        return slots["__getattr__"](module, name)

    def patch_method(patcher: Any, cls: type, name: str, new_fn: Any, deduplicate: bool = True) -> None:
        if cls is not nn.Module or name not in slots:
            return torch_patch_method(patcher, cls, name, new_fn, deduplicate)
        new_fn.__fx_already_patched = deduplicate  # as torch's patch_method, on the dispatcher's target
        if getattr(slots[name], "__fx_already_patched", False):
            return None
        patcher.patches_made.append(_SlotPatch(slots, name, slots[name], new_fn))
        patcher.patches_made[-1].patch()
        return None

    dispatch_call.__wrapped__ = saved["__call__"]  # type: ignore[attr-defined]
    dispatch_getattr.__wrapped__ = saved["__getattr__"]  # type: ignore[attr-defined]
    _Patcher.patch_method = patch_method  # type: ignore[method-assign, assignment]
    try:
        nn.Module.__call__ = dispatch_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = dispatch_getattr  # type: ignore[method-assign]
        yield
    finally:
        _Patcher.patch_method = torch_patch_method  # type: ignore[method-assign]
        for name, value in saved.items():
            setattr(nn.Module, name, value)
