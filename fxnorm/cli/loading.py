"""Turn a ``MODEL`` specification into a module, load ``--weights`` into it, save results, and make
example inputs: everything the CLI does with models besides the passes themselves.

``MODEL`` forms (:func:`load_model`):

- ``torchvision:<name>``: a torchvision model built with ``weights=None`` (and
  ``weights_backbone=None`` where the builder takes it): nothing is ever downloaded.
- ``package.module:callable``: an importable factory called with no argument (a function, a module
  class, or an ``nn.Module`` instance used as is). The current directory is importable.
- a path to a file saved with ``torch.save(model)``, read without running code from it: it may name
  only the classes of :func:`fxnorm.cli.unpickling.safe_classes` (torch.nn, torchvision, fxnorm)
  unless ``trust_file=True`` (``--trust-file``) unpickles it fully.

Example:
    >>> model, name = load_model("torchvision:resnet18")
    >>> name, type(model).__name__
    ('resnet18', 'ResNet')
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelLoadError, UnknownModelError
from .console import cause_of
from .outputs import write_outputs
from .unpickling import article, describe, load_model_file, read_checkpoint, state_dict_in

__all__ = [
    "MODEL_FORMS",
    "load_model",
    "model_name",
    "load_weights",
    "save_model",
    "model_family",
    "default_input_shape",
    "example_inputs",
]

#: What ``MODEL`` may be, for error messages and ``--help``.
MODEL_FORMS = (
    "MODEL is one of: torchvision:<name> (e.g. torchvision:resnet18, built without weights), "
    "package.module:callable (a factory returning an nn.Module), or a file saved with torch.save(model) "
    "(only torch.nn/torchvision/fxnorm classes unless --trust-file)"
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
        raise ModelLoadError(f"building torchvision:{name} failed: {cause_of(err)}") from err


def _call_factory(spec: str) -> nn.Module:
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path:  # `fxnorm` as a console script does not see the current directory
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        if err.name and not (module_name + ".").startswith(err.name + ".") and importlib.util.find_spec(module_name.split(".")[0]):
            raise ModelLoadError(f"importing {module_name} for MODEL {spec!r} failed: {cause_of(err)}") from err
        raise UnknownModelError(f"cannot import {module_name!r} for MODEL {spec!r}: {err}. {MODEL_FORMS}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UnknownModelError(f"{module_name!r} has no attribute {attr_path!r} (MODEL {spec!r}). {MODEL_FORMS}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UnknownModelError(f"{spec} is {article(type(obj).__name__)}, not a callable returning an nn.Module")
    try:
        model = obj()
    except Exception as err:
        raise ModelLoadError(f"calling {spec}() failed: {cause_of(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned {article(type(model).__name__)}, not an nn.Module")
    return model


def _load_file(path: str, trust_file: bool) -> nn.Module:
    obj = load_model_file(path, trust=trust_file)
    if isinstance(obj, nn.Module):
        return obj
    if state_dict_in(obj):
        raise ModelLoadError(f"{path} holds {describe(obj)} (a state_dict), not a model: give the architecture "
                             f"as MODEL and this file with --weights (e.g. torchvision:resnet18 --weights {path})")
    raise ModelLoadError(f"{path} holds {describe(obj)}, not an nn.Module saved with torch.save(model)")


def model_name(spec: str) -> str:
    """The short name of ``spec`` (for ``<name>-folded.pt``), known before anything is loaded.

    Example:
        >>> model_name("torchvision:resnet18"), model_name("pkg.models:build_net"), model_name("ckpt/m.pt")
        ('resnet18', 'build_net', 'm')
    """
    if spec.startswith("torchvision:"):
        return spec.split(":", 1)[1]
    if not os.path.isfile(spec) and _FACTORY.match(spec):
        return spec.rpartition(":")[2].split(".")[-1]
    return os.path.splitext(os.path.basename(spec))[0]


def load_model(spec: str, *, trust_file: bool = False) -> tuple[nn.Module, str]:
    """Build or load the model ``spec`` names, and a short display name for it.

    A file is read without running code from it unless ``trust_file`` (see the module doc).

    Raises:
        UnknownModelError: ``spec`` is in none of the :data:`MODEL_FORMS` or names nothing.
        UnsafeFileError: a file that names classes outside the allow-list, without ``trust_file``.
        ModelLoadError: the model exists but building or loading it failed.

    Example:
        >>> model, name = load_model("torchvision:mobilenet_v3_small")
        >>> name
        'mobilenet_v3_small'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"no MODEL given. {MODEL_FORMS}")
    if spec.startswith("torchvision:"):
        return _build_torchvision(spec.split(":", 1)[1]), model_name(spec)
    if os.path.isfile(spec):
        return _load_file(spec, trust_file), model_name(spec)
    if _FACTORY.match(spec):
        return _call_factory(spec), model_name(spec)
    if os.path.exists(spec):
        raise UnknownModelError(f"{spec} is a directory, not a file saved with torch.save(model)")
    hint = ""
    if spec in _torchvision_names():
        hint = f" Did you mean torchvision:{spec}?"
    elif spec.endswith((".pt", ".pth", ".pkl")):
        hint = f" There is no file {spec!r}."
    raise UnknownModelError(f"unknown MODEL {spec!r}.{hint} {MODEL_FORMS}")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` of DataParallel and the ``_orig_mod.`` of torch.compile from every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load the state_dict in ``path`` into ``model`` (strictly: every key must match).

    ``path`` is read without running code from it (:func:`fxnorm.cli.unpickling.read_checkpoint`):
    a state_dict, a checkpoint holding one under ``state_dict``, ``model``... (torchvision's reference
    scripts save ``{"model": ..., "args": argparse.Namespace, ...}``) or a whole pickled model. Keys
    prefixed with ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) are accepted.

    Raises:
        ModelLoadError: unreadable file, no state_dict in it, or keys/shapes that do not match; the
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
    checkpoint = read_checkpoint(path)
    found = state_dict_in(checkpoint)
    if not found:
        raise ModelLoadError(f"{path} holds {describe(checkpoint)} and no state_dict (a mapping of names to "
                             "tensors, itself or under 'state_dict', 'model'...): save one with "
                             f"torch.save(model.state_dict(), {path!r})")
    state = _strip_prefix(found)
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
    """``torch.save(model, path)`` through a temporary file renamed into place (nothing is left
    behind when it fails or is interrupted); ``fxnorm`` reads it back as ``MODEL`` when it holds only
    torch/torchvision/fxnorm classes, Python with ``torch.load(path, weights_only=False)``.

    Raises:
        OutputError: the file cannot be written (no such directory, permissions, unpicklable model).

    Example:
        >>> import torch.nn as nn, tempfile, os
        >>> path = save_model(nn.Linear(2, 2), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> os.listdir(os.path.dirname(path))
        ['m.pt']
    """
    write_outputs([(path, lambda tmp: torch.save(model, tmp))])
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
