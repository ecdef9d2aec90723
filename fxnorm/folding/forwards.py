"""Forwards that a fold rewrites, kept as the user's modules: a module's own ``forward`` minus the norm
calls that folded away.

When a functional ``batch_norm`` in a module's own code folds, that module's forward must change.
:func:`trace_own_forward` traces the module alone, with its children as leaves (so their hooks keep
firing), and refuses forwards that tracing would specialize: optional arguments (``skip=None``),
``*args``/``**kwargs``, values computed eagerly from the module's tensors, a forward replaced on the
instance. The edited graph becomes a :class:`GraphProgram`: its Python source and the import paths of
what it refers to, so it pickles (``torch.save(model)``), deep-copies, exports and compiles. It is
installed as ``module.forward = functools.partial(run_program, program, module)``: the class is
kept, every attribute and child stays live (the program reads ``self.<name>`` at every call).

A norm subclass whose forward does more than normalize (batch norm + activation + dropout) becomes
a :class:`fxnorm.folding.modules.NormRemainder` running what remains of its forward.

Example:
    >>> import torch, torch.fx as fx
    >>> program = GraphProgram.from_graph(fx.symbolic_trace(lambda x: x.relu() * 2).graph)
    >>> program.function()(None, torch.tensor([-1.0, 3.0])).tolist()
    [0.0, 6.0]
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import linecache
import math
import types
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FoldError
from ..graph.eager import EAGER_READS, watch_eager_reads
from ..graph.tracing import NormTracer

__all__ = ["GraphProgram", "run_program", "install_forward", "trace_own_forward", "signature_problem", "tensor_of"]

_COUNTER = itertools.count()


_LITERALS = (float, int, bool, str, type(None))


def _import_path(name: str, value: Any) -> str | float | tuple:
    """How to find a global of generated code again after unpickling: ``module:qualname``, or a
    literal (floats such as ``inf``, strings of type annotations) kept as ``("literal", value)``."""
    if isinstance(value, _LITERALS):
        return ("literal", value)
    if isinstance(value, types.ModuleType):
        return f"{value.__name__}:"
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is value:
            return f"{module}:{qualname}"
    if value is type(None):
        return "builtins:type(None)"
    raise FoldError(f"the traced forward refers to {name} = {value!r}, which cannot be found again by import "
                    "(a lambda or a local function): fxnorm cannot keep a rewritten forward that saves and loads")


def _resolve(path: str | float | tuple) -> Any:
    if isinstance(path, tuple):
        return path[1]
    if isinstance(path, float):
        return path
    module, _, qualname = path.partition(":")
    if path == "builtins:type(None)":
        return type(None)
    found: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    return found


class GraphProgram:
    """A forward generated from an fx graph, run with a module as ``self``.

    Holds only the source and the import paths of its globals, so it pickles and deep-copies; the
    function is compiled when the program is made (or loaded), never while a model runs (torch.export
    and torch.compile trace straight into it).
    """

    def __init__(self, source: str, imports: dict[str, str | float | tuple]) -> None:
        self.source = source
        self.imports = dict(imports)
        self._function = self._compile()

    @classmethod
    def from_graph(cls, graph: fx.Graph) -> GraphProgram:
        """The program of ``graph``'s code (``self`` is the module it runs on)."""
        code = graph.python_code(root_module="self")
        imports = {name: _import_path(name, value) for name, value in code.globals.items()}
        return cls(code.src, imports)

    def _compile(self) -> Callable[..., Any]:
        namespace: dict[str, Any] = {name: _resolve(path) for name, path in self.imports.items()}
        namespace.setdefault("inf", math.inf)
        namespace.setdefault("nan", math.nan)
        filename = f"<fxnorm rewritten forward {next(_COUNTER)}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        exec(compile(self.source, filename, "exec"), namespace)
        return namespace["forward"]

    def function(self) -> Callable[..., Any]:
        """``forward(self, *args)``."""
        return self._function

    def __reduce__(self) -> tuple[Any, ...]:
        return GraphProgram, (self.source, self.imports)

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphProgram:
        return self  # immutable once made

    def __repr__(self) -> str:
        return f"GraphProgram({len(self.source.splitlines())} lines)"


def run_program(program: GraphProgram, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run ``program`` with ``module`` as ``self`` (what a rewritten ``module.forward`` calls)."""
    return program._function(module, *args, **kwargs)


def install_forward(module: nn.Module, program: GraphProgram) -> None:
    """Make ``program`` the forward of ``module`` itself (its class and everything else kept)."""
    module.__dict__["forward"] = functools.partial(run_program, program, module)


def signature_problem(module: nn.Module) -> str | None:
    """Why tracing ``module``'s own forward could specialize it (optional or variadic arguments),
    or None. The root of a model is refused too: fx traces ``type(root).forward``."""
    if "forward" in module.__dict__:
        return f"the forward of {type(module).__name__} is replaced on the instance"
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return f"the signature of {type(module).__name__}.forward cannot be read"
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"{type(module).__name__}.forward takes *{p.name}: a trace would fix its arguments"
        if p.default is not p.empty:
            return (f"{type(module).__name__}.forward has the optional argument {p.name}={p.default!r}: a trace "
                    "would fix it (fxnorm rewrites only forwards it can trace faithfully)")
    return None


def trace_own_forward(module: nn.Module) -> fx.GraphModule | str:
    """``module``'s own forward as a graph, its children kept as leaves; or why not (see the module doc)."""
    why = signature_problem(module)
    if why is not None:
        return why
    tracer = NormTracer(leaf_modules=tuple(module.children()))
    watched = {id(t) for t in (*module.parameters(), *module.buffers())}
    try:
        with watch_eager_reads(watched) as reads:
            graph = tracer.trace(module)
    except Exception as err:
        return f"{type(module).__name__}.forward does not trace alone ({type(err).__name__}: {str(err)[:120]})"
    if reads:
        return f"{type(module).__name__}.forward computes with its own tensors outside the graph"
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm.meta[EAGER_READS] = {}
    return gm


def tensor_of(module: nn.Module, target: str) -> torch.Tensor | None:
    """The tensor at ``target`` (a get_attr path) inside ``module``, or None."""
    owner_path, _, attr = target.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, torch.Tensor) else None
