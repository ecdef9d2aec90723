"""The single decision of what folds where: :func:`plan_folds`, used by :func:`fxnorm.fold` (which
acts on it) and :func:`fxnorm.find_norms` (which reports it), so inspection predicts the fold.

The plan simulates the folds in the traced graphs (undone after) until nothing more folds (a fold can
enable another: conv -> bn -> bn), then checks what single call sites cannot see:

- a norm called at several sites leaves the model only if every site folds (else it stays a norm,
  and none of its sites fold);
- a layer that takes a fold must take the same folds at every one of its call sites (torch's ``fuse``
  folds a conv called at two sites twice);
- a functional norm leaves its module's forward only if that forward can be rewritten faithfully
  (:mod:`fxnorm.folding.forwards`);
- for a model traced part by part, eager code may call or read what a fold changes: with example
  inputs the real run is recorded and must agree with the graphs (evidence ``"counted"``), without
  them the fold is ``"unverified"`` (refused by ``strict=True``);
- norms that no graph holds (they run in untraced code) come last: with example inputs, the recorded
  run may show where they fold (:mod:`fxnorm.folding.observed`, evidence ``"observed"``).

Whatever fails becomes a ban with its reason, and the simulation runs again without it.

Example:
    >>> import torch.nn as nn, fxnorm
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    >>> plan = plan_folds(model, fxnorm.trace(model))
    >>> [(d.call.name, d.mode, d.layer_name) for d in plan.decisions]
    [('1', 'into_producer', '0'), ('2', 'into_producer', '0')]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch.fx as fx
import torch.nn as nn

from ..graph.calls import submodule_tables
from ..graph.eager import eager_norms, eager_reason
from ..graph.kinds import BN_KINDS, is_plain, known_base, layer_kind
from ..graph.readers import why_opaque
from ..graph.runtime import METADATA_FUNCTIONS, RunRecord, record_run
from ..graph.tracing import traced_report
from .analysis import FOLDABLE_KINDS, analyze, layer_sites, norm_calls
from .bypasses import Bypasses
from .constants import BNConstants, call_constants
from .forwards import trace_own_forward
from .observed import OBSERVED, observed_call, observed_fold
from .neighbours import consumer_plan, producer_plan
from .plan import Analysis, NormCall, Proposal, Target, norm_problem
from .report import Evidence

__all__ = ["Decision", "Plan", "plan_folds"]

@dataclass(eq=False)
class Decision:
    """What the plan says about one norm call: where it folds, or why it does not."""

    call: NormCall
    consts: BNConstants | None = None
    mode: Literal["into_producer", "into_consumer"] | None = None
    #: the layers it folds into, each at one call site (several: the producers a concatenation joins)
    targets: list[Target] = field(default_factory=list)
    reason: str | None = None
    evidence: Evidence | None = None
    #: when the simulation made this fold: a layer takes its folds in this order (bn -> bn -> conv must
    #: fold the norm next to the conv first)
    step: int = -1

    @property
    def layer(self) -> nn.Module | None:
        """The (first) layer it folds into."""
        return self.targets[0].layer if self.targets else None

    @property
    def layer_name(self) -> str | None:
        """The qualified names of the layers it folds into (comma-separated)."""
        return ", ".join(t.name for t in self.targets) if self.targets else None

    @property
    def site(self) -> tuple[str, str] | None:
        """The call site of the (first) layer it folds into: (part prefix, node name)."""
        return self.targets[0].site if self.targets else None

    def take(self, mode: Literal["into_producer", "into_consumer"], targets: list[Target], step: int) -> None:
        """Record a fold."""
        self.mode, self.targets, self.reason, self.step = mode, list(targets), None, step

    def drop(self, reason: str) -> None:
        """Take a fold back: the norm stays, for ``reason``."""
        self.mode, self.targets, self.consts, self.evidence, self.reason = None, [], None, None, reason


@dataclass(eq=False)
class Plan:
    """Every norm call of a model with its decision (graph order, then the norms no graph holds), and
    the analysis behind it."""

    analysis: Analysis
    decisions: list[Decision] = field(default_factory=list)
    owners: dict[int, fx.GraphModule] = field(default_factory=dict)  #: id(owner) -> its own forward's graph
    run: RunRecord | None = None  #: the recorded run (part-by-part models with example inputs)

    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.mode is not None]


def _simulate(an: Analysis, calls: list[NormCall], bans: dict[int, str],
              layer_bans: dict[tuple[int, int], str]) -> list[Decision]:
    """One pass: fold until nothing more folds, honouring the bans. Each fold bypasses its norm in the
    parts' graphs (the identity now), for the rules to see; the graphs are restored at the end."""
    decisions = {id(c): Decision(c) for c in calls}
    changed, step = True, 0
    with Bypasses() as bypasses:
        while changed:
            changed = False
            for call in calls:
                decision = decisions[id(call)]
                if decision.mode is not None:
                    continue
                proposal = _propose(an, call, decision, bans, layer_bans)
                if proposal is None:
                    continue
                decision.take(proposal.mode, proposal.targets, step)
                step += 1
                bypasses.bypass(call.node, call.input())
                changed = True
    return [decisions[id(c)] for c in calls]


def _propose(an: Analysis, call: NormCall, decision: Decision, bans: dict[int, str],
             layer_bans: dict[tuple[int, int], str]) -> Proposal | None:
    if call.kind not in FOLDABLE_KINDS and call.kind != "batch_norm":
        decision.reason = decision.reason or str(call_constants(call.gm, call.node, call.kind, call.module))
        return None
    consts = call_constants(call.gm, call.node, call.kind, call.module)
    if isinstance(consts, str):
        decision.reason = consts
        return None
    decision.consts = consts
    why = bans.get(call.identity) or norm_problem(an, call)
    if why is not None:
        decision.reason = why
        return None
    reasons = []
    for rule in (producer_plan, consumer_plan):
        found = rule(an, call, consts)
        if isinstance(found, Proposal):
            banned = next((layer_bans[key] for key in ((id(t.layer), call.identity) for t in found.targets)
                           if key in layer_bans), None)
            if banned is None:
                return found
            found = banned
        reasons.append(found)
    decision.reason = "; ".join(reasons)
    return None


def _identity_bans(decisions: list[Decision]) -> dict[int, str]:
    """A norm called at several sites leaves only if every site folds."""
    groups: dict[int, list[Decision]] = defaultdict(list)
    for d in decisions:
        groups[d.call.identity].append(d)
    bans = {}
    for identity, group in groups.items():
        stuck = [d for d in group if d.mode is None]
        if stuck and len(stuck) < len(group):
            where = stuck[0].call.node.name
            bans[identity] = (f"the same norm is also called at {where}, which cannot fold ({stuck[0].reason}): "
                              "a norm leaves the model only when all its calls fold")
    return bans


def _layer_bans(an: Analysis, decisions: list[Decision], sites: dict[int, list[tuple[str, str]]]
                ) -> dict[tuple[int, int], str]:
    """A layer must take the same folds, in the same order, at every one of its call sites (``sites``:
    :func:`~fxnorm.folding.analysis.layer_sites`)."""
    per_site: dict[int, dict[tuple[str, str], list[tuple]]] = defaultdict(lambda: defaultdict(list))
    layers: dict[int, nn.Module] = {}
    for d in decisions:
        for t in d.targets if d.mode is not None else ():
            per_site[id(t.layer)][t.site].append((d.mode, d.call.identity, t.how))
            layers[id(t.layer)] = t.layer
    bans = {}
    for layer_id, folds in per_site.items():
        all_sites = sites.get(layer_id, [])
        sequences = {tuple(folds.get(site, ())) for site in all_sites}
        if len(sequences) <= 1 and len(folds) == len(all_sites):
            continue
        name = an.name_of(layers[layer_id])
        why = (f"{name} is called at {len(all_sites)} sites that are not all followed (or preceded) by the same "
               "norm: folding into it would change its other calls")
        for fold_list in folds.values():
            for _, identity, _ in fold_list:
                bans[(layer_id, identity)] = why
    return bans


def _owner_bans(an: Analysis, plan: Plan, decisions: list[Decision]) -> dict[int, str]:
    """A functional norm folds only if its module's own forward can be rewritten faithfully."""
    bans: dict[int, str] = {}
    for d in decisions:
        owner = d.call.owner
        if d.mode is None or d.call.module is not None:
            continue
        if owner is None or owner is an.model:
            bans[d.call.identity] = ("the model's own forward calls batch_norm: fxnorm does not rewrite the root's "
                                     "forward (fx traces type(model).forward); wrap that code in a submodule")
            continue
        if id(owner) not in plan.owners:
            traced = trace_own_forward(owner)
            if isinstance(traced, str):
                bans[d.call.identity] = f"{an.name_of(owner)}: {traced}"
                continue
            plan.owners[id(owner)] = traced
        base = known_base(owner)
        if base is not None and not is_plain(owner):  # a norm subclass: replaced by what remains of it
            why = why_opaque(owner, allow_hooks=an.allow_hooks) if "forward" not in owner.__dict__ else None
            if why is None and id(owner) in an.hidden:
                why = f"it is also held outside the module tree ({', '.join(an.hidden[id(owner)][:3])})"
            if why is not None:
                bans[d.call.identity] = f"{an.name_of(owner)}: {why}"
    return bans


_LAYER_FUNCTIONS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                              "conv_transpose3d", "linear", "_conv_forward"})
_NORM_FUNCTIONS = frozenset({"batch_norm", "instance_norm"})


def _evidence_bans(an: Analysis, decisions: list[Decision], run: RunRecord | None,
                   sites: dict[int, list[tuple[str, str]]]) -> dict[int, str]:
    """Part-by-part traces: the real run must call and read what a fold changes only where the graphs
    say (no caller or reader in eager code)."""
    bans: dict[int, str] = {}
    if an.complete:
        for d in decisions:
            d.evidence = "proven" if d.mode is not None else None
        return bans
    for d in decisions:
        if d.mode is None:
            continue
        if run is None:
            d.evidence = "unverified"
            continue
        why = None
        for module in [*(t.layer for t in d.targets), *filter(None, [d.call.module])]:
            expected = sum(run.calls[id(an.roots[prefix])] for prefix, _ in sites.get(id(module), []))
            if run.calls[id(module)] != expected:
                why = (f"{an.name_of(module)} is called {run.calls[id(module)]} time(s) on the example inputs but "
                       f"{expected} time(s) by the traced parts: eager code calls it too")
                break
        why = why or _unexpected_reads(an, d, run)
        if why is None:
            d.evidence = "counted"
        else:
            bans[d.call.identity] = why
    return bans


def _unexpected_reads(an: Analysis, d: Decision, run: RunRecord) -> str | None:
    checks: list[tuple[nn.Module | None, tuple, frozenset[str]]] = []
    for t in d.targets:
        checks.append((t.layer, (getattr(t.layer, "weight"), getattr(t.layer, "bias")), _LAYER_FUNCTIONS))
    consts = d.consts
    if consts is not None:
        norm_owner = d.call.module if d.call.module is not None else d.call.owner
        checks.append((norm_owner, (consts.running_mean, consts.running_var, consts.weight, consts.bias),
                       _NORM_FUNCTIONS))
    for owner, tensors, functions in checks:
        for t in tensors:
            for function, scope in run.reads.get(id(t), []) if t is not None else []:
                if function not in METADATA_FUNCTIONS and (function not in functions or scope is not owner):
                    where = an.name_of(scope) if scope is not None else "the model's top level"
                    return f"a tensor of {an.name_of(owner) if owner is not None else 'the norm'} is also read by " \
                           f"{function}() in {where} on the example inputs"
    return None


def plan_folds(model: nn.Module, traced: nn.Module, *, example_inputs: tuple | None = None,
               allow_hooks: bool = False) -> Plan:
    """Decide for every norm call of ``model`` (traced as ``traced``) where it folds or why not: the
    analysis, the recorded run (a model traced part by part, with example inputs), the fixed point of
    simulations and bans, then the norms no graph holds."""
    an = analyze(model, traced, allow_hooks=allow_hooks)
    plan = Plan(an)
    run = None
    eager = [(name, module, kind) for name, module, kind in eager_norms(traced)]
    if not an.complete and example_inputs is not None:
        watched = [t for m in model.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        layers = [m for m in model.modules() if layer_kind(m) is not None and is_plain(m)]
        run = record_run(model, example_inputs, watched=watched, producers=layers, norms=[m for _, m, _ in eager])
    with submodule_tables():  # the module trees do not change while planning
        decisions = _fixed_point(an, plan, run)
        plan.decisions = decisions + _observed(an, traced, eager, decisions, run)
    plan.run = run
    for d in plan.decisions:
        if d.mode is None and d.reason is None:
            d.reason = "cannot fold"
    return plan


def _fixed_point(an: Analysis, plan: Plan, run: RunRecord | None) -> list[Decision]:
    """Simulate, derive bans from what single sites cannot see, simulate again until nothing changes
    (at most once per norm)."""
    bans: dict[int, str] = {}
    layer_bans: dict[tuple[int, int], str] = {}
    sites, calls = layer_sites(an), norm_calls(an)  # each simulation leaves the parts' graphs as they were
    while True:
        decisions = _simulate(an, calls, bans, layer_bans)
        new_bans = {**_identity_bans(decisions), **_owner_bans(an, plan, decisions)}
        new_layer_bans = _layer_bans(an, decisions, sites)
        if not new_bans and not new_layer_bans:
            new_bans = _evidence_bans(an, decisions, run, sites)
        new_bans = {k: v for k, v in new_bans.items() if k not in bans}
        new_layer_bans = {k: v for k, v in new_layer_bans.items() if k not in layer_bans}
        if not new_bans and not new_layer_bans:
            break
        bans.update(new_bans)
        layer_bans.update(new_layer_bans)
    return decisions


def _observed(an: Analysis, traced: nn.Module, eager: list[tuple[str, nn.Module, str]], decisions: list[Decision],
              run: RunRecord | None) -> list[Decision]:
    """Decisions for the norms no graph holds, from the recorded run (evidence "observed")."""
    out: list[Decision] = []
    taken = {id(t.layer) for d in decisions if d.mode is not None for t in d.targets}
    info = traced_report(traced)
    for name, module, kind in eager:
        call = observed_call(an, name, module, kind)
        why = eager_reason(name, info)
        decision = Decision(call, reason=why)
        if kind in BN_KINDS and run is None:
            decision.reason = f"{why} (with example_inputs a recorded run may show where it folds)"
        elif kind in BN_KINDS and run is not None:
            found = observed_fold(an, call, run, taken)
            if isinstance(found, str):
                decision.reason = f"{why}; {found}"
            else:
                layer, consts = found
                taken.add(id(layer))
                decision.take("into_producer", [Target(layer, an.name_of(layer), (OBSERVED, an.name_of(layer)))],
                              len(decisions) + len(out))
                decision.consts, decision.evidence = consts, "observed"
        out.append(decision)
    return out
