"""Reading ``.pt`` files without running code from them.

A pickle names functions and classes that the unpickler imports and calls, so unpickling a file
with ``torch.load(path, weights_only=False)`` runs whatever code it names. The ``fxnorm`` command
reads files two safe ways:

- a ``MODEL`` file (:func:`load_model_file`): ``torch.load(..., weights_only=True)`` with
  :func:`safe_classes` allowed, a fixed list that fxnorm defines (never one read from the file):
  the ``nn.Module`` classes of ``torch.nn``, every class of ``torchvision.models`` and
  ``torchvision.ops`` (their feature extractors, which generate code, excepted), fxnorm's own
  modules, and ``functools.partial``. A file naming anything else is refused with
  :class:`~fxnorm.errors.UnsafeFileError`; ``trust=True`` (``--trust-file``) unpickles it fully.
- a ``--weights`` file (:func:`read_checkpoint`): ``weights_only=True`` first; a checkpoint naming
  other classes (the ``argparse.Namespace`` of torchvision's reference scripts, numpy scalars, a
  whole pickled model) is read by a restricted unpickler that puts a :class:`Stub` in place of every
  class and function outside a fixed table of torch's tensor-rebuilding functions: nothing is
  imported and no code of the file runs. :func:`state_dict_in` then finds the state dict.

Example:
    >>> import argparse, os, tempfile, torch, torch.nn as nn
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pth")
    >>> torch.save({"model": nn.Linear(2, 1).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    >>> checkpoint = read_checkpoint(path)
    >>> type(checkpoint["args"]).__name__, sorted(state_dict_in(checkpoint))
    ('Namespace', ['bias', 'weight'])
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import importlib
import pickle
import re
import sys
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ModelLoadError, UnsafeFileError
from .console import one_line

__all__ = [
    "SAFE_SOURCES",
    "safe_classes",
    "load_model_file",
    "read_checkpoint",
    "refused_global",
    "file_cause",
    "CHECKPOINT_KEYS",
    "Stub",
    "state_dict_in",
    "describe",
    "article",
]

#: Where the classes a MODEL file may name come from (with ``functools.partial``).
SAFE_SOURCES = ("torch.nn.modules", "torchvision.models", "torchvision.ops", "fxnorm")
#: Never allowed: torchvision's feature extractors are GraphModules (unpickling one runs generated code).
_NEVER = ("torchvision.models.feature_extraction",)

#: What the restricted unpickler of --weights files imports: torch's tensor-rebuilding functions and
#: plain containers. Everything else becomes a Stub; torch.<dtype>/<layout>/<qscheme> are allowed too.
_REAL: dict[str, tuple[str, ...]] = {
    "torch._utils": ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                     "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_cpu_tensor",
                     "_rebuild_wrapper_subclass", "_rebuild_nested_tensor"),
    "torch._tensor": ("_rebuild_from_type_v2",),
    "torch.serialization": ("_get_layout",),
    "torch": ("Size", "Tensor", "device"),
    "torch.nn.parameter": ("Parameter",),
    "collections": ("OrderedDict",),
    "builtins": ("set", "frozenset", "complex", "bytearray", "slice"),
    "_codecs": ("encode",),
}

#: Keys under which checkpoints keep the model's state dict, in the order they are tried.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@functools.lru_cache(maxsize=1)
def safe_classes() -> tuple[type, ...]:
    """The classes a ``MODEL`` file may name (see the module doc), sorted by qualified name.

    Example:
        >>> import torchvision
        >>> nn.Conv2d in safe_classes(), torchvision.models.ResNet in safe_classes()
        (True, True)
        >>> fx.GraphModule in safe_classes()
        False
    """
    import torchvision.models
    import torchvision.models.detection
    import torchvision.models.optical_flow
    import torchvision.models.segmentation
    import torchvision.models.video
    import torchvision.ops  # noqa: F401  (every module whose classes are allowed)

    found: set[type] = {functools.partial}
    for name, module in list(sys.modules.items()):
        if module is None or not _within(name, SAFE_SOURCES) or _within(name, _NEVER):
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, type) or obj.__module__ != name or issubclass(obj, fx.GraphModule):
                continue
            if name.startswith("torchvision.") or (issubclass(obj, nn.Module) and not obj.__name__.startswith("_")):
                found.add(obj)
    return tuple(sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}"))


def article(word: str) -> str:
    """``word`` with its indefinite article.

    Example:
        >>> article("OrderedDict"), article("dict")
        ('an OrderedDict', 'a dict')
    """
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


class Stub:
    """A stand-in for a class or function that a file names and fxnorm does not import: it keeps
    what the file gives it (``args``, ``state``, ``items``, ``values``) and runs nothing."""

    stub_of: ClassVar[str] = "?"
    args: tuple
    state: Any
    items: dict
    values: list

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = object.__new__(cls)
        self.__dict__.update(args=args, state=None, items={}, values=[])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["values"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["values"].extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.stub_of}>"


class _RestrictedUnpickler(pickle._Unpickler):
    """Imports only the :data:`_REAL` table (and torch dtypes); every other global becomes a Stub.
    Sets the state (BUILD) of stubs, tensors and plain containers only: never of a class or function.

    (The pure-Python unpickler, whose opcodes can be overridden: checkpoints keep their tensors
    outside the pickle, so the pickle itself is small.)"""

    stubs: dict[str, type] = {}
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        target = getattr(self, "stack")[-2]  # noqa: B009  (set by load(); typeshed does not declare it)
        if not isinstance(target, (Stub, torch.Tensor, dict, list, set)):
            raise pickle.UnpicklingError(f"refused to set the state of {type(target).__name__} {target!r:.60}")
        super().load_build()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 (torch.save's) writes Python 2 names (__builtin__.set): map them as pickle does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if name in _REAL.get(module, ()):
            found = getattr(importlib.import_module(module), name, None)
            if found is not None:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.qscheme)):
            return getattr(torch, name)
        full = f"{module}.{name}"
        if full not in self.stubs:
            self.stubs[full] = type(name, (Stub,), {"stub_of": full, "__module__": "fxnorm.cli.unpickling"})
        return self.stubs[full]


def _restricted_pickle() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler is :class:`_RestrictedUnpickler`."""
    module = types.ModuleType("fxnorm_restricted_pickle")
    module.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def _allowing(classes: tuple[type, ...]) -> contextlib.AbstractContextManager[Any]:
    manager = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if manager is not None:
        return manager(list(classes))
    torch.serialization.add_safe_globals(list(classes))  # torch 2.4: for the rest of the process
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # torch warns about pickle protocols and weights_only defaults
        warnings.simplefilter("ignore")
        yield


def refused_global(err: BaseException) -> str | None:
    """The global that ``torch.load(weights_only=True)`` refused, from its message (None: another error)."""
    text = str(err)
    if "WeightsUnpickler error" not in text and "weights_only" not in text.lower():
        return None
    match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"got <class '([\w.]+)'>", text) \
        or re.search(r"unrecognized function (\S+)", text)
    return match.group(1) if match else None


def file_cause(err: BaseException) -> str:
    """Why a file could not be read, in one line without torch's advice to unpickle it fully."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = one_line(text)
    damaged = ("Unsupported operand", "invalid load key", "zip archive", "Ran out of input", "unpickling stack",
               "magic number")
    if isinstance(err, EOFError) or any(d in line for d in damaged):
        sentence = line.split(". ")[0].rstrip(".")
        detail = "" if not sentence or sentence.startswith("Unsupported operand") else f" ({sentence})"
        return f"not a file written by torch.save, or a damaged one{detail}"
    return f"{type(err).__name__}: {line.split('. ')[0].rstrip('.')}" if line else type(err).__name__


def load_model_file(path: str, *, trust: bool = False) -> Any:
    """Unpickle a ``MODEL`` file: only :func:`safe_classes` unless ``trust`` (``--trust-file``).

    Raises:
        UnsafeFileError: the file names a class outside the allow-list (message: which, and what to do).
        ModelLoadError: the file cannot be read (not a torch file, damaged, a class that cannot be imported).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> torch.save(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), path)
        >>> type(load_model_file(path)).__name__
        'Sequential'
    """
    try:
        with _quiet():
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False)
            with _allowing(safe_classes()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        name = None if trust else refused_global(err)
        if name is not None:
            raise UnsafeFileError(
                f"refused to load {path}: unpickling it needs {name}, which is not on fxnorm's list of safe "
                "classes (torch.nn, torchvision.models, torchvision.ops, fxnorm), and that could run any code. "
                "Pass --trust-file if you trust this file; safer: give the architecture as MODEL and this "
                "file with --weights (its tensors are read without running its code)") from err
        raise ModelLoadError(f"cannot load {path}: {file_cause(err)}") from err


def read_checkpoint(path: str) -> Any:
    """Read a ``--weights`` file without running code from it (see the module doc).

    Raises:
        ModelLoadError: not a torch file, or a damaged one.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(nn.Linear(2, 2).state_dict(), path)
        >>> sorted(read_checkpoint(path))
        ['bias', 'weight']
    """
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if refused_global(err) is None:
            raise ModelLoadError(f"cannot read weights {path}: {file_cause(err)}") from err
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle())
    except Exception as err:
        raise ModelLoadError(f"cannot read weights {path}: {file_cause(err)}") from err


def _stub_module_state(stub: Stub, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The state dict of a pickled ``nn.Module`` read as stubs (its ``_parameters``, ``_buffers``, ``_modules``)."""
    state = stub.state
    if not isinstance(state, Mapping) or not isinstance(state.get("_parameters"), Mapping) \
            or not isinstance(state.get("_modules"), Mapping):
        return None
    found: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in [*state["_parameters"].items(), *(state.get("_buffers") or {}).items()]:
        if isinstance(value, torch.Tensor) and name not in skip:
            found[prefix + name] = value
    for name, child in state["_modules"].items():
        if isinstance(child, Stub):
            found.update(_stub_module_state(child, f"{prefix}{name}.") or {})
    return found


def state_dict_in(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The state dict a checkpoint holds: itself, a model's, or one under :data:`CHECKPOINT_KEYS`.

    Example:
        >>> state_dict_in({"epoch": 3, "model": {"w": torch.zeros(1)}})
        {'w': tensor([0.])}
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Stub):
        return _stub_module_state(obj) or None
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in CHECKPOINT_KEYS if depth < 2 else ():
            found = state_dict_in(obj.get(key), depth + 1) if key in obj else None
            if found:
                return found
    return None


def describe(obj: Any) -> str:
    """What a file holds, for error messages.

    Example:
        >>> describe({"epoch": 1, "optimizer": {}}), describe(torch.zeros(2))
        ('a dict with keys epoch, optimizer', 'a Tensor')
    """
    if isinstance(obj, Stub):
        return f"{article(obj.stub_of)} object"
    name = type(obj).__name__
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"{article(name)} of {len(obj)} tensors"
        return f"{article(name)} with keys {', '.join(keys)}{', ...' if len(obj) > 6 else ''}" if keys \
            else f"an empty {name}"
    return article(name)
