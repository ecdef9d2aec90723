"""Fold eval-mode batch norms into neighbouring conv/linear layers: same outputs, fewer ops, and what
comes back is still the user's model.

:func:`fold` traces the model (whole, or part by part) only to *analyze* it, plans every fold with
:func:`fxnorm.folding.planner.plan_folds` (the same plan :func:`fxnorm.find_norms` reports), then
changes the module tree itself (:mod:`fxnorm.folding.changes`): the absorbing layers get new weights,
folded norm modules become ``nn.Identity``, a module whose own code called a folded functional
``batch_norm`` gets that call removed from its forward. Every other module keeps its class, name,
attributes, methods and hooks; the result has the input's class (it is the input with
``inplace=True``). Nothing changes before everything is computed, and a failure changes nothing.

Example:
    >>> import torch, torch.nn as nn, fxnorm
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold(model)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(folded(x), model(x), atol=1e-5), type(folded) is type(model), folded[1]
    (True, True, Identity())
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, get_args

import torch
import torch.nn as nn

from ..errors import FoldError
from ..graph.kinds import BN_KINDS, is_plain, norm_kind
from ..graph.shapes import record_shapes
from ..graph.tracing import LeafModules, trace, traced_report
from ..reports import record_report
from .branches import merge_branches as merge_sums
from .changes import compute_changes
from .copies import copy_sharing_layers, unshare
from .modules import ChannelAffine
from .observed import DISAGREED, outputs_agree
from .norm_affine import fold_norm_affine
from .planner import Plan, plan_folds
from .report import FoldedNorm, FoldReport, SkippedNorm

__all__ = ["Standalone", "fold", "ChannelAffine"]

#: What :func:`fold` does with a batch norm that cannot fold (see its ``standalone`` argument).
Standalone = Literal["keep", "affine"]


def _checked_inputs(model: object, standalone: object, example_inputs: object) -> tuple | None:
    if not isinstance(model, nn.Module):
        raise FoldError(f"fxnorm.fold expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise FoldError("fxnorm.fold cannot read TorchScript modules (torch.jit.script/trace): pass the Python "
                        "nn.Module they were made from")
    if standalone not in get_args(Standalone):
        raise FoldError(f"standalone must be one of {get_args(Standalone)}, got {standalone!r}")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise FoldError("example_inputs must be a tuple of positional arguments for model(*example_inputs), "
                        f"got {type(example_inputs).__name__}")
    return None if example_inputs is None else tuple(example_inputs)


def _report(plan: Plan, traced: nn.Module, affine: set[int]) -> tuple[FoldReport, list[SkippedNorm]]:
    """The fold report, and the batch norms ``strict=True`` refuses (skipped or unverified)."""
    trace_info = traced_report(traced)
    report = FoldReport(untraced=list(trace_info.untraced))
    refused: list[SkippedNorm] = []
    for d in plan.decisions:
        call = d.call
        if d.mode is not None and d.layer_name is not None:
            report.folded.append(FoldedNorm(call.name, call.kind, d.mode, d.layer_name, d.evidence or "proven"))
            if d.evidence == "unverified":
                refused.append(SkippedNorm(call.name, call.kind, "traced part by part without example_inputs: eager "
                                           "code might call its layers (pass example_inputs)"))
            elif d.evidence == "observed":
                refused.append(SkippedNorm(call.name, call.kind, "runs in untraced code: its fold into "
                                           f"{d.layer_name} was seen in the example run, not proven"))
        elif id(d) in affine:
            report.folded.append(FoldedNorm(call.name, call.kind, "affine", call.name))
        else:
            skipped = SkippedNorm(call.name, call.kind, d.reason or "cannot fold")
            report.skipped.append(skipped)
            if call.kind in BN_KINDS:
                refused.append(skipped)
    seen = {f.name for f in report.folded} | {s.name for s in report.skipped}
    for name, module in plan.analysis.model.named_modules():
        base = norm_kind(module)
        if base in BN_KINDS and not is_plain(module) and name not in seen:
            report.skipped.append(SkippedNorm(name, str(base), f"{type(module).__name__} overrides forward() and its traced "
                                              "code calls no batch_norm with constant statistics: fxnorm cannot tell "
                                              "what it computes"))
            refused.append(report.skipped[-1])
    return report, refused


def _observed_disagree(work: nn.Module, inputs: tuple | None, plan: Plan, undo: Callable[[], None]) -> bool:
    """Check the observed folds just made against the recorded run; if the outputs differ, undo every
    change, take the observed folds out of ``plan`` (with the reason) and return True."""
    observed = [d for d in plan.decisions if d.evidence == "observed"]
    if not observed or inputs is None or plan.run is None:
        return False
    try:
        agree = outputs_agree(work, inputs, plan.run)
    except BaseException:
        undo()
        raise
    if agree:
        return False
    undo()
    for d in observed:
        d.drop(DISAGREED)
    return True


def _strict_error(refused: list[SkippedNorm]) -> FoldError:
    lines = "\n".join(f"  - {s.name} ({s.kind}): {s.reason}" for s in refused)
    return FoldError(
        f"{len(refused)} batch norm(s) cannot fold exactly (strict=True, nothing was changed):\n{lines}\n"
        "Fix them (model.eval(), leaf_modules=..., example_inputs=...) or pass strict=False to skip them."
    )


def _work_copy(model: nn.Module, inplace: bool, shared: dict[int, torch.Tensor]) -> nn.Module:
    if inplace:
        return model
    try:
        return copy_sharing_layers(model, shared)
    except Exception as err:  # deepcopy of arbitrary user objects
        raise FoldError(f"could not copy {type(model).__name__} ({type(err).__name__}: {err}); pass inplace=True to "
                        "fold it in place") from err


def fold(
    model: nn.Module,
    *,
    inplace: bool = False,
    strict: bool = False,
    standalone: Standalone = "keep",
    norm_affine: bool = False,
    example_inputs: tuple | None = None,
    leaf_modules: LeafModules = (),
    allow_hooks: bool = False,
    merge_branches: bool = False,
) -> nn.Module:
    """Fold every eval-mode batch norm of ``model`` that folds exactly into a neighbouring conv/linear.

    The result is the user's model: same class (the input itself with ``inplace=True``), same children,
    attributes, methods and hooks. Only folded norms (``nn.Identity``, or what remains of a norm
    subclass's forward) and the layers that absorb them (new ``weight``/``bias``) change; the
    ``state_dict`` differs only by the folded norms' entries and the added biases. Calling ``fold``
    again changes nothing.

    Args:
        model: any ``nn.Module`` (BN in eval mode; a BN in training mode is never folded).
        inplace: change ``model`` itself (no copy), and return it. By default ``model`` is copied and
            left as it is.
        strict: raise :class:`FoldError` listing every batch norm that cannot fold (or whose fold is
            only ``"observed"`` or ``"unverified"``, see below), before changing anything. Otherwise such norms are skipped and
            reported with the reason.
        standalone: ``"keep"`` leaves unfoldable norms as they are; ``"affine"`` turns each norm module
            with constant statistics into a :class:`ChannelAffine` (``x * scale + shift``).
        norm_affine: also fold the affine part of LayerNorm/RMSNorm/GroupNorm into the Linear/1x1 conv
            layers that alone consume them (see :mod:`fxnorm.folding.norm_affine`).
        example_inputs: positional arguments of ``model(*example_inputs)``. Shapes from them decide
            folds that depend on ranks (Linear -> BatchNorm1d folds on 2-D input, not on 3-D); for a
            model traced part by part, one recorded run shows that eager code does not call or read
            the layers a fold changes (evidence ``"counted"``; without inputs: ``"unverified"``),
            and may show a norm in untraced code fed by one conv/linear alone (evidence
            ``"observed"``: folded, then checked on the example inputs, undone if the outputs differ).
        leaf_modules: modules the tracer keeps opaque (classes, qualified names or instances).
        allow_hooks: fold around modules with forward hooks or pre-hooks, which may then see different
            values (by default such folds are refused).
        merge_branches: after folding, merge parallel summed conv branches of one input
            (``bn_id(x) + conv3x3(x) + conv1x1(x)``, RepVGG-style) into one conv (see
            :mod:`fxnorm.folding.branches`). This is the one exception to the drop-in contract: the
            block's forward is rewritten, one branch conv gets the merged kernel and the other
            branches become ``nn.Identity``. Reported in ``FoldReport.merged``.

    Returns:
        The folded model. ``fxnorm.report_of(folded, FoldReport)`` tells what folded where (with its
        evidence), what was skipped and why, and which modules' forwards were rewritten.

    Raises:
        FoldError: bad arguments, ``strict=True`` with norms that cannot fold, example inputs that do not
            run, a model that cannot be copied. ``model`` is unchanged whenever an error is raised.

    Example:
        >>> import torchvision, fxnorm
        >>> model = torchvision.models.resnet18().eval()
        >>> folded = fold(model)
        >>> report = fxnorm.report_of(folded, FoldReport)
        >>> len(report.folded), report.skipped, type(folded).__name__, folded.bn1
        (20, [], 'ResNet', Identity())
    """
    inputs = _checked_inputs(model, standalone, example_inputs)
    shared: dict[int, torch.Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        work = _work_copy(model, inplace, shared)
        # Without inputs the traced parts are only read: no Python code needed. With inputs they run
        # (record_shapes), and a lazy part's first call goes through its hooks twice: not lazy then.
        traced = trace(work, leaf_modules=leaf_modules, lazy=inputs is None)
        if inputs is not None:
            try:
                record_shapes(traced, inputs)
            except Exception as err:
                raise FoldError(str(err)) from err
        plan = plan_folds(work, traced, example_inputs=inputs, allow_hooks=allow_hooks)
        changes = compute_changes(plan, standalone)
        report, refused = _report(plan, traced, {id(d) for d in changes.affine})
        if strict and refused:
            raise _strict_error(refused)
        undo = changes.commit()
        if _observed_disagree(work, inputs, plan, undo):
            changes = compute_changes(plan, standalone)
            report, _ = _report(plan, traced, {id(d) for d in changes.affine})
            changes.commit()
        report.forwards = [name for _, name, _ in changes.forwards]
        if norm_affine:
            fold_norm_affine(work, traced, report, allow_hooks=allow_hooks)
        if merge_branches:
            report.merged = merge_sums(work, leaf_modules=leaf_modules)
            gone = {f"{m.block}.{b}" if m.block != "<model>" else b for m in report.merged if m.into for b in m.branches}
            report.skipped = [s for s in report.skipped if s.name not in gone]  # an identity norm merged away
        unshare(work, shared)
    _warn_training(report)
    record_report(work, report)
    return work


def _warn_training(report: FoldReport) -> None:
    """Warn once when batch norms were skipped for being in training mode (a common slip: the fold then
    changes nothing, silently)."""
    names = [s.name for s in report.skipped if "training mode" in s.reason]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"fxnorm.fold: {len(names)} batch norm(s) in training mode were not folded ({shown}); call "
                      "model.eval() before folding", UserWarning, stacklevel=3)
