"""Turn a ``MODEL`` specification into a module, load ``--weights`` into it, save results, and make
example inputs: everything the CLI does with models besides the passes themselves.

``MODEL`` forms (:func:`load_model`):

- ``torchvision:<name>``: a torchvision model built with ``weights=None`` (and
  ``weights_backbone=None`` where the builder takes it): nothing is ever downloaded.
- ``package.module:callable``: an importable factory called with no argument (a function, a module
  class, or an ``nn.Module`` instance used as is). The current directory is importable.
- a path to a file saved with ``torch.save(model)`` (loaded with ``weights_only=False``: only load
  files you trust).

Example:
    >>> model, name = load_model("torchvision:resnet18")
    >>> name, type(model).__name__
    ('resnet18', 'ResNet')
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelLoadError, UnknownModelError

__all__ = [
    "MODEL_FORMS",
    "load_model",
    "load_weights",
    "save_model",
    "model_family",
    "default_input_shape",
    "example_inputs",
]

#: What ``MODEL`` may be, for error messages and ``--help``.
MODEL_FORMS = (
    "MODEL is one of: torchvision:<name> (e.g. torchvision:resnet18, built without weights), "
    "package.module:callable (a factory returning an nn.Module), or a file saved with torch.save(model)"
)

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models())


def _build_torchvision(name: str) -> nn.Module:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError:
        close = difflib.get_close_matches(name, _torchvision_names(), n=3)
        hint = f" Did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise UnknownModelError(f"torchvision has no model named {name!r}.{hint} "
                                "torchvision.models.list_models() lists them all.") from None
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    try:
        return builder(**kwargs)
    except Exception as err:
        raise ModelLoadError(f"building torchvision:{name} failed: {type(err).__name__}: {err}") from err


def _call_factory(spec: str) -> nn.Module:
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path:  # `fxnorm` as a console script does not see the current directory
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownModelError(f"cannot import {module_name!r} for MODEL {spec!r}: {err}. {MODEL_FORMS}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UnknownModelError(f"{module_name!r} has no attribute {attr_path!r} (MODEL {spec!r}). {MODEL_FORMS}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UnknownModelError(f"{spec} is a {type(obj).__name__}, not a callable returning an nn.Module")
    try:
        model = obj()
    except Exception as err:
        raise ModelLoadError(f"calling {spec}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_file(path: str) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ModelLoadError(f"cannot load {path}: {type(err).__name__}: {err}") from err
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__} (a state_dict?), not a model: give the "
                             "architecture as MODEL and this file with --weights")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module saved with torch.save(model)")


def load_model(spec: str) -> tuple[nn.Module, str]:
    """Build or load the model ``spec`` names, and a short display name for it.

    Raises:
        UnknownModelError: ``spec`` is in none of the :data:`MODEL_FORMS` or names nothing.
        ModelLoadError: the model exists but building or loading it failed.

    Example:
        >>> model, name = load_model("torchvision:mobilenet_v3_small")
        >>> name
        'mobilenet_v3_small'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"no MODEL given. {MODEL_FORMS}")
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        return _build_torchvision(name), name
    if os.path.isfile(spec):
        return _load_file(spec), os.path.splitext(os.path.basename(spec))[0]
    if _FACTORY.match(spec):
        return _call_factory(spec), spec.rpartition(":")[2].split(".")[-1]
    if os.path.exists(spec):
        raise UnknownModelError(f"{spec} is a directory, not a file saved with torch.save(model)")
    hint = ""
    if spec in _torchvision_names():
        hint = f" Did you mean torchvision:{spec}?"
    elif spec.endswith((".pt", ".pth", ".pkl")):
        hint = f" There is no file {spec!r}."
    raise UnknownModelError(f"unknown MODEL {spec!r}.{hint} {MODEL_FORMS}")


def _unwrap_state_dict(obj: Any) -> Any:
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load the state_dict in ``path`` into ``model`` (strictly: every key must match).

    Checkpoints that wrap the state_dict (``{"state_dict": ...}``, ``{"model": ...}``) and keys
    prefixed with ``module.`` (``DataParallel``) are accepted. The file is read with
    ``weights_only=True``.

    Raises:
        ModelLoadError: unreadable file, not a state_dict, or keys/shapes that do not match; the
            model is unchanged.

    Example:
        >>> import torch, torch.nn as nn, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(nn.Linear(2, 2).state_dict(), path)
        >>> type(load_weights(nn.Linear(2, 2), path)).__name__
        'Linear'
    """
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read weights {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    state = _unwrap_state_dict(obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise ModelLoadError(f"weights {path} do not match the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def save_model(model: nn.Module, path: str) -> str:
    """``torch.save(model, path)``; load it back with ``torch.load(path, weights_only=False)``.

    Raises:
        ModelLoadError: the file cannot be written (no such directory, permissions, unpicklable model).

    Example:
        >>> import torch.nn as nn, tempfile, os
        >>> path = save_model(nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> os.path.isfile(path)
        True
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ModelLoadError(f"cannot write {path}: directory {folder} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(model, tmp)
        os.replace(tmp, path)
    except Exception as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ModelLoadError(f"cannot save the model to {path}: {type(err).__name__}: {err}") from err
    return path


def model_family(model: nn.Module) -> str:
    """``detection``, ``optical_flow``, ``video`` or ``image``: what inputs a model takes.

    Example:
        >>> import torchvision
        >>> model_family(torchvision.models.resnet18()), model_family(torchvision.models.video.r3d_18())
        ('image', 'video')
    """
    mod = type(model).__module__
    if mod.startswith("torchvision.models.detection"):
        return "detection"
    if mod.startswith("torchvision.models.optical_flow"):
        return "optical_flow"
    if mod.startswith("torchvision.models.video"):
        return "video"
    return "image"


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape used when ``--input-shape`` is not given (None: the model's inputs are unknown).

    Example:
        >>> import torchvision
        >>> default_input_shape(torchvision.models.resnet18())
        (1, 3, 224, 224)
    """
    family = model_family(model)
    if family == "video":
        return (1, 3, 16, 112, 112)
    if family == "detection":
        return (1, 3, 320, 320)
    if family == "optical_flow":
        return (1, 3, 128, 128)
    if type(model).__module__.startswith("torchvision.models"):
        return (1, 3, 224, 224)
    return None


def example_inputs(model: nn.Module, shape: Sequence[int], *, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple:
    """Random positional arguments of ``shape`` for ``model(*inputs)``, seeded.

    One tensor for most models; a list of ``N`` images ``(C, H, W)`` in [0, 1] for torchvision
    detection models (``shape`` is ``N, C, H, W``); two tensors for optical flow models.

    Example:
        >>> import torchvision
        >>> [tuple(t.shape) for t in example_inputs(torchvision.models.resnet18(), (2, 3, 32, 32))]
        [(2, 3, 32, 32)]
    """
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in shape)
    family = model_family(model)
    if family == "detection":
        if len(shape) != 4:
            raise ModelLoadError(f"a detection model takes N,C,H,W images, got --input-shape {','.join(map(str, shape))}")
        return ([torch.rand(shape[1:], generator=gen).to(device) for _ in range(shape[0])],)
    if family == "optical_flow":
        return (torch.rand(shape, generator=gen).to(device), torch.rand(shape, generator=gen).to(device))
    return (torch.randn(shape, generator=gen).to(device),)
