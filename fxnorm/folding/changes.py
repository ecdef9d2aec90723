"""A fold plan turned into changes of the user's module tree, computed in full before the first one
is made, then committed all together or not at all.

- the layers that absorb norms get new ``weight`` and ``bias`` Parameters (a bias is added where
  there was none); nothing is written into a tensor that may be tied elsewhere;
- a folded norm module becomes ``nn.Identity()`` at every name it is registered under (or a
  :class:`~fxnorm.folding.modules.ChannelAffine` with ``standalone="affine"``); a norm subclass whose
  forward did more becomes a :class:`~fxnorm.folding.modules.NormRemainder`;
- a module whose own forward made a functional batch norm that folded gets its forward rewritten
  (:mod:`fxnorm.folding.forwards`), and the norm's constants it held are deleted.

:meth:`Changes.commit` undoes everything it did if anything fails (or is interrupted).

Example:
    >>> import torch.nn as nn, fxnorm
    >>> from fxnorm.folding.planner import plan_folds
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    >>> changes = compute_changes(plan_folds(model, fxnorm.trace(model)), "keep")
    >>> undo = changes.commit()  # calling undo() would put everything back
    >>> model
    Sequential(
      (0): Conv2d(3, 4, kernel_size=(1, 1), stride=(1, 1))
      (1): Identity()
    )
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FoldError
from ..graph.calls import bind_node, constant_value, node_norm_kind
from ..graph.kinds import is_plain, known_base, layer_kind
from .forwards import GraphProgram, install_forward
from .maths import bn_scale_shift, fold_bn_into_conv, fold_bn_into_linear, fold_bn_into_next_conv, fold_bn_into_next_linear
from .modules import ChannelAffine, NormRemainder
from .plan import Target, norm_problem
from .planner import Decision, Plan

__all__ = ["Changes", "compute_changes", "new_parameters"]

_MISSING = object()


@dataclass
class Changes:
    """Everything a fold will change; nothing is changed until :meth:`commit`."""

    params: list[tuple[nn.Module, str, nn.Parameter | None]] = field(default_factory=list)  #: (module, name, new)
    attrs: list[tuple[nn.Module, str, Any]] = field(default_factory=list)  #: plain attributes set (``affine``...)
    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  #: (parent, key, new child)
    forwards: list[tuple[nn.Module, str, GraphProgram]] = field(default_factory=list)  #: (module, name, program)
    deletions: list[tuple[nn.Module, str]] = field(default_factory=list)  #: tensors a rewritten forward dropped
    affine: list[Decision] = field(default_factory=list)  #: decisions turned into ChannelAffine modules

    def commit(self) -> Callable[[], None]:
        """Make every change; on any failure (or an interrupt) undo what was done and re-raise.
        Returns the function that undoes them all."""
        undo: list[Callable[[], None]] = []
        try:
            for module, name, param in self.params:
                _replace(undo, module._parameters, name, param)
            for module, name, value in self.attrs:
                _replace(undo, module.__dict__, name, value)
            for parent, key, child in self.swaps:
                _replace(undo, parent._modules, key, child)
            for module, _, program in self.forwards:
                saved = module.__dict__.get("forward", _MISSING)
                install_forward(module, program)
                undo.append(functools.partial(_put, module.__dict__, "forward", saved))
            for owner, attr in self.deletions:
                store = owner._parameters if attr in owner._parameters else owner._buffers
                _replace(undo, store, attr, _MISSING)
        except BaseException:
            _undo_all(undo)
            raise
        return functools.partial(_undo_all, undo)


def _undo_all(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        step()


def _put(store: dict[str, Any], key: str, value: Any) -> None:
    if value is _MISSING:
        store.pop(key, None)
    else:
        store[key] = value


def _replace(undo: list[Callable[[], None]], store: dict[str, Any], key: str, value: Any) -> None:
    """``store[key] = value`` (``_MISSING``: delete it), with the step that puts it back in ``undo``."""
    undo.append(functools.partial(_put, store, key, store.get(key, _MISSING)))
    _put(store, key, value)


def new_parameters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor, names: tuple[str, str] = ("weight", "bias")
                   ) -> list[tuple[nn.Module, str, nn.Parameter | None]]:
    """The :attr:`Changes.params` entries that give ``layer`` a new weight and bias (``requires_grad`` as
    its old weight's)."""
    old = layer._parameters.get(names[0])
    grad = old.requires_grad if old is not None else False
    return [(layer, names[0], nn.Parameter(weight, requires_grad=grad)),
            (layer, names[1], nn.Parameter(bias, requires_grad=grad))]


def _layer_weights(plan: Plan) -> dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """New (weight, bias) of every layer that takes folds: the folds of its first call site, in order
    (a concatenation's producers each take their slice of the norm; a Linear after a flatten takes
    each channel's scale on its block of features)."""
    firsts: dict[int, tuple[str, str]] = {}
    chains: dict[int, list[tuple[Decision, Target]]] = defaultdict(list)
    for d in sorted(plan.folded(), key=lambda d: d.step):
        for t in d.targets:
            site = firsts.setdefault(id(t.layer), t.site)
            if t.site == site:
                chains[id(t.layer)].append((d, t))
    out = {}
    for layer_id, chain in chains.items():
        layer = chain[0][1].layer
        kind = layer_kind(layer) or ""
        weight, bias, groups = getattr(layer, "weight"), getattr(layer, "bias"), int(getattr(layer, "groups", 1))
        w, b = weight.detach(), None if bias is None else bias.detach()
        for d, t in chain:
            c = d.consts
            assert c is not None  # set with the fold by the plan
            scale, shift = bn_scale_shift(c.running_mean, c.running_var, c.eps, c.weight, c.bias)
            if t.channels is not None:
                scale, shift = scale[t.channels[0]:t.channels[1]], shift[t.channels[0]:t.channels[1]]
            if t.repeat > 1:
                scale, shift = scale.repeat_interleave(t.repeat), shift.repeat_interleave(t.repeat)
            try:
                if d.mode == "into_producer" and kind == "Linear":
                    w, b = fold_bn_into_linear(w, b, scale, shift)
                elif d.mode == "into_producer":
                    w, b = fold_bn_into_conv(w, b, scale, shift, transposed=kind.startswith("ConvTranspose"),
                                             groups=groups)
                elif kind == "Linear":
                    w, b = fold_bn_into_next_linear(w, b, scale, shift)
                else:
                    w, b = fold_bn_into_next_conv(w, b, scale, shift, groups=groups)
            except FoldError as err:
                raise FoldError(f"folding {d.call.name} into {t.name} failed: {err}; the model was left "
                                "unchanged") from err
        assert b is not None  # a fold always returns a bias
        out[layer_id] = (layer, w, b)
    return out


def _swaps(plan: Plan, module: nn.Module, new: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``new`` in place of ``module`` at every name it is registered under."""
    out = []
    for name in plan.analysis.names.get(id(module), []):
        parent_path, _, key = name.rpartition(".")
        parent = plan.analysis.model
        for atom in parent_path.split(".") if parent_path else ():
            parent = parent._modules[atom]  # type: ignore[assignment]  # a registered name: never None
        out.append((parent, key, new))
    return out


def _rewritten(plan: Plan, owner: nn.Module, identities: set[int]) -> tuple[GraphProgram, list[tuple[nn.Module, str]]]:
    """The program of ``owner``'s forward without its batch-norm calls of ``identities``, and the
    constants of ``owner`` itself that only those calls read."""
    gm = plan.owners[id(owner)]
    graph = gm.graph
    dropped: list[tuple[nn.Module, str]] = []
    for node in list(graph.nodes):
        found = node_norm_kind(gm, node)
        args = bind_node(node) if found is not None and found[1] is None else None
        if args is None:
            continue
        try:
            stats = constant_value(gm, args["running_mean"])
        except LookupError:
            continue
        if id(stats) not in identities:
            continue
        node.replace_all_uses_with(args["input"])
        graph.erase_node(node)
        for value in args.values():
            if isinstance(value, fx.Node) and value.op == "get_attr" and not value.users:
                path, _, attr = str(value.target).rpartition(".")
                if not path:  # the owner's own constants go with the norm; another module's stay
                    dropped.append((owner, attr))
                graph.erase_node(value)
    graph.lint()
    return GraphProgram.from_graph(graph), dropped


def _remainder(plan: Plan, owner: nn.Module, program: GraphProgram) -> NormRemainder:
    """A :class:`NormRemainder` for a norm subclass, holding the children and tensors its program uses."""
    rest = NormRemainder(type(owner).__name__, program)
    for node in plan.owners[id(owner)].graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        head = str(node.target).split(".")[0]
        if head in owner._modules and head not in rest._modules:
            rest.add_module(head, owner._modules[head])
        elif head in owner._parameters and head not in rest._parameters:
            rest.register_parameter(head, owner._parameters[head])
        elif head in owner._buffers and head not in rest._buffers:
            rest.register_buffer(head, owner._buffers[head])
    return rest


def compute_changes(plan: Plan, standalone: str) -> Changes:
    """Every change the fold makes (see the module doc); raises :class:`FoldError` before any change
    when new weights cannot be computed."""
    changes = Changes(params=[p for layer, w, b in _layer_weights(plan).values() for p in new_parameters(layer, w, b)])
    done: set[int] = set()
    owners: dict[int, tuple[nn.Module, set[int]]] = {}
    for d in plan.folded():
        module, owner = d.call.module, d.call.owner
        if module is not None and id(module) not in done:
            done.add(id(module))
            changes.swaps += _swaps(plan, module, nn.Identity())
        elif module is None and owner is not None:
            owners.setdefault(id(owner), (owner, set()))[1].add(d.call.identity)
    for owner, identities in owners.values():
        program, dropped = _rewritten(plan, owner, identities)
        if known_base(owner) is not None and not is_plain(owner):
            changes.swaps += _swaps(plan, owner, _remainder(plan, owner, program))
        else:
            changes.forwards.append((owner, plan.analysis.name_of(owner), program))
            changes.deletions += dropped
    if standalone == "affine":
        for d in plan.decisions:
            module = d.call.module
            if (d.mode is None and module is not None and d.consts is not None and id(module) not in done
                    and norm_problem(plan.analysis, d.call) is None):
                done.add(id(module))
                c = d.consts
                scale, shift = bn_scale_shift(c.running_mean, c.running_var, c.eps, c.weight, c.bias)
                changes.swaps += _swaps(plan, module, ChannelAffine(scale, shift))
                changes.affine.append(d)
    return changes
