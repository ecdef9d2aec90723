"""What every ``fxnorm`` subcommand checks before it loads the model (exit 2, nothing done), and
the loading itself.

Example:
    >>> import argparse
    >>> args = argparse.Namespace(model="torchvision:resnet18", weights=None, data=None)
    >>> input_files(args)
    {}
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..errors import UsageError
from .console import Console
from .loading import load_model, load_weights
from .outputs import check_outputs

__all__ = ["device_of", "input_files", "preflight", "load", "check_leaves", "shape_text"]


def shape_text(shape: tuple[int, ...]) -> str:
    """``1,3,224,224``: a shape as ``--input-shape`` takes it.

    Example:
        >>> shape_text((1, 3, 8, 8))
        '1,3,8,8'
    """
    return ",".join(str(s) for s in shape)


def device_of(name: str) -> torch.device:
    """The ``--device``; a :class:`~fxnorm.errors.UsageError` for a bad name or a missing GPU.

    Example:
        >>> device_of("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:0...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def input_files(args: argparse.Namespace) -> dict[str, str]:
    """The files (and folders) the command reads, by option: no output may be one of them."""
    found = {}
    if os.path.exists(args.model):
        found["MODEL"] = args.model
    for flag in ("weights", "data"):
        path = getattr(args, flag, None)
        if path and os.path.exists(path):
            found[f"--{flag}"] = path
    return found


def preflight(args: argparse.Namespace, outputs: Mapping[str, str]) -> torch.device:
    """Check what can be checked before loading anything: the device, ``--trust-file`` and
    ``--weights``, and every output (distinct, not an input, writable). Returns the device.

    Raises:
        UsageError: any of them is wrong (the CLI exits with status 2).
    """
    device = device_of(args.device)
    if args.trust_file and not os.path.isfile(args.model):
        raise UsageError(f"--trust-file is for a MODEL file saved with torch.save(model); {args.model} is not a file")
    if args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights}: no such file")
    check_outputs(outputs, input_files(args))
    return device


def check_leaves(model: nn.Module, leaves: list[str]) -> None:
    """Every ``--leaf`` names a submodule of ``model`` (a :class:`~fxnorm.errors.UsageError` otherwise).

    Example:
        >>> check_leaves(nn.ModuleDict({"conv": nn.Conv2d(1, 1, 1)}), ["cnv"])
        Traceback (most recent call last):
        ...
        fxnorm.errors.UsageError: --leaf cnv: the model has no submodule named 'cnv'. Did you mean conv?
    """
    names = [name for name, _ in model.named_modules() if name]
    for leaf in leaves:
        if leaf not in names:
            close = difflib.get_close_matches(leaf, names, n=3)
            hint = f". Did you mean {', '.join(close)}?" if close else " (qualified names: layer1.0.conv1...)"
            raise UsageError(f"--leaf {leaf}: the model has no submodule named {leaf!r}{hint}")


def load(args: argparse.Namespace, console: Console, device: torch.device) -> tuple[nn.Module, str]:
    """The model of ``MODEL`` (and ``--weights``), in eval mode on ``device``, and its name."""
    console.log(f"loading {args.model}")
    model, name = load_model(args.model, trust_file=args.trust_file)
    if args.weights:
        load_weights(model, args.weights)
        console.log(f"loaded weights from {args.weights}")
    check_leaves(model, list(args.leaf))
    return model.to(device).eval(), name
