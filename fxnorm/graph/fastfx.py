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

try:  # torch >= 2.3
    from torch.fx._lazy_graph_module import _LazyGraphModule as LazyGraphModule
except ImportError:  # pragma: no cover
    LazyGraphModule = fx.GraphModule  # type: ignore[misc, assignment]
try:  # torch's wrapper (torch.fx._symbolic_trace), the one its tracer puts around math functions
    from torch.fx._symbolic_trace import _create_wrapped_func
except ImportError:  # pragma: no cover
    _create_wrapped_func = None  # type: ignore[assignment]

__all__ = ["LazyGraphModule", "UnpackingProxy", "autowrapped", "can_autowrap"]

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
