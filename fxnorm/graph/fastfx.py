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

__all__ = ["LazyGraphModule", "autowrapped", "can_autowrap"]

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
