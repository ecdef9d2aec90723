"""Old import paths of fxnorm 0.1, kept working for one release with a ``DeprecationWarning``.

fxnorm 0.2 moved its modules into subpackages (``fxnorm.fold`` became :mod:`fxnorm.folding.apply`,
``fxnorm.calibrate`` became :mod:`fxnorm.calibration.recalibration`...). The old module names are
registered in ``sys.modules`` as :class:`DeprecatedModule` aliases: ``from fxnorm.plan import
plan_norm`` still works and warns once per name. They are registered *without* being set as
attributes of ``fxnorm``: ``fxnorm.fold`` stays the function (a real submodule named ``fold`` would
rebind it the first time someone imported it).

Example:
    >>> import warnings, fxnorm
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from fxnorm.stats import ChannelMoments
    >>> ChannelMoments.__module__, caught[0].category.__name__
    ('fxnorm.calibration.moments', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

__all__ = ["DeprecatedModule", "OLD_MODULES", "RENAMED", "resolve_renamed", "install_aliases"]

#: Old module -> the modules its public names live in now (searched in order).
OLD_MODULES: dict[str, tuple[str, ...]] = {
    "fxnorm.kinds": ("fxnorm.graph.kinds",),
    "fxnorm.tracing": ("fxnorm.graph.tracing", "fxnorm.graph.eager", "fxnorm.graph.calls"),
    "fxnorm.fold_shapes": ("fxnorm.graph.shapes",),
    "fxnorm.plan": ("fxnorm.folding.plan", "fxnorm.folding.neighbours", "fxnorm.folding.constants", "fxnorm.graph.calls",
                    "fxnorm.graph.readers"),
    "fxnorm.sites": ("fxnorm.inspection.sites", "fxnorm.graph.calls", "fxnorm.graph.eager"),
    "fxnorm.render": ("fxnorm.inspection.render",),
    "fxnorm.fold": ("fxnorm.folding.apply", "fxnorm.folding.report", "fxnorm.folding.modules"),
    "fxnorm.fold_math": ("fxnorm.folding.maths",),
    "fxnorm.fold_copy": ("fxnorm.folding.copies",),
    "fxnorm.fold_report": ("fxnorm.folding.report",),
    "fxnorm.affine_fold": ("fxnorm.folding.norm_affine",),
    "fxnorm.calibrate": ("fxnorm.calibration.recalibration", "fxnorm.calibration.report",
                         "fxnorm.calibration.selection"),
    "fxnorm.stats": ("fxnorm.calibration.moments",),
    "fxnorm.observers": ("fxnorm.calibration.observers", "fxnorm.errors"),
    "fxnorm.plane_stats": ("fxnorm.calibration.fast_path",),
    "fxnorm.calib_graph": ("fxnorm.calibration.session", "fxnorm.calibration.fast_path"),
    "fxnorm.calib_data": ("fxnorm.calibration.batches",),
    "fxnorm.calib_report": ("fxnorm.calibration.report",),
    "fxnorm.select": ("fxnorm.calibration.selection",),
    "fxnorm.loading": ("fxnorm.cli.loading", "fxnorm.errors"),
    "fxnorm.data": ("fxnorm.cli.images",),
}

#: Names that changed: ``(old module or "fxnorm", old name) -> "new.module:new_name"``.
RENAMED: dict[tuple[str, str], str] = {
    ("fxnorm.calibrate", "prepare"): "fxnorm.deprecated:prepare",
    ("fxnorm.calibrate", "convert"): "fxnorm.deprecated:convert",
    ("fxnorm.fold", "fold_report"): "fxnorm.deprecated:fold_report",
    ("fxnorm.fold_report", "fold_report"): "fxnorm.deprecated:fold_report",
    ("fxnorm.tracing", "trace_report"): "fxnorm.deprecated:trace_report",
    ("fxnorm.plan", "functional_args"): "fxnorm.graph.calls:bind_node",
    ("fxnorm.plan", "plan_norm"): "fxnorm.deprecated:plan_norm",
    ("fxnorm.plan", "FoldPlan"): "fxnorm.deprecated:FoldPlan",
    ("fxnorm.export", "batch_norm_nodes"): "fxnorm.inspection.programs:batch_norm_nodes",
    ("fxnorm.export", "count_batch_norm_ops"): "fxnorm.inspection.programs:count_batch_norm_ops",
    ("fxnorm.export", "norms_with_affine"): "fxnorm.inspection.programs:norms_with_affine",
    ("fxnorm.export", "BATCH_NORM_OPS"): "fxnorm.inspection.programs:BATCH_NORM_OPS",
    ("fxnorm.export", "NORM_OPS"): "fxnorm.inspection.programs:NORM_OPS",
    ("fxnorm.export", "MissingExtraError"): "fxnorm.errors:MissingExtraError",
    ("fxnorm", "prepare"): "fxnorm.deprecated:prepare",
    ("fxnorm", "convert"): "fxnorm.deprecated:convert",
    ("fxnorm", "fold_report"): "fxnorm.deprecated:fold_report",
    ("fxnorm", "trace_report"): "fxnorm.deprecated:trace_report",
}


def resolve_renamed(module: str, name: str) -> Any:
    """The object an old ``module.name`` now is, with a ``DeprecationWarning`` naming the new path.

    Raises:
        AttributeError: ``name`` was never a name of ``module``.
    """
    found = RENAMED.get((module, name))
    if found is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, _, new_name = found.partition(":")
    shown = "fxnorm." + new_name if where == "fxnorm.deprecated" else f"{where}.{new_name}"
    warnings.warn(f"{module}.{name} is deprecated; use {shown}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(where), new_name)


class DeprecatedModule(types.ModuleType):
    """A stand-in for an fxnorm 0.1 module: attribute access warns and forwards to the new home."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)} (fxnorm 0.1 import path).")
        self.__dict__["_targets"] = targets

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if (self.__name__, name) in RENAMED:
            return resolve_renamed(self.__name__, name)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                warnings.warn(f"importing {name} from {self.__name__} is deprecated; import it from {target} "
                              "(or from fxnorm when it is public)", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (deprecated alias of {', '.join(self._targets)}) has no "
                             f"attribute {name!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self._targets:
            names.update(getattr(importlib.import_module(target), "__all__", ()))
        return sorted(names)


def install_aliases() -> None:
    """Register every :data:`OLD_MODULES` alias in ``sys.modules`` (idempotent; a module that is
    already imported under an old name is left alone)."""
    for old, targets in OLD_MODULES.items():
        if old not in sys.modules:
            sys.modules[old] = DeprecatedModule(old, targets)
