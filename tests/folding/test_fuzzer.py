"""The differential fuzzer: small float64 models drawn from trap motifs (tests/folding/fuzz_motifs.py),
each folded and compared with the original. For every case, fold either refuses or matches to 1e-9;
it raises nothing but an FxNormError; the input model is unchanged (values, structure, hooks); and
find_norms predicted exactly what fold did.

Every motif gets the same number of cases: 40 in the default run (seeded), 500 with ``pytest -m slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from fuzz_motifs import MOTIFS
from helpers import randomize_norms, rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fxnorm import FoldReport, FxNormError, find_norms, fold, report_of

pytestmark = pytest.mark.usefixtures("one_thread")
_COMMON = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None}


def _snapshot(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    structure = [(n, type(m), len(m._forward_hooks), m.training) for n, m in model.named_modules(remove_duplicate=False)]
    return state, structure


def _clone(inputs: tuple) -> tuple:
    return tuple(t.clone() for t in inputs)  # a model may write into its input (x += 1)


def check_case(model: nn.Module, inputs: tuple, kwargs: dict, seed: int = 7) -> None:
    model = randomize_norms(model, seed=seed).double().eval()
    for m in model.modules():
        if getattr(m, "fuzz_train", False):
            m.train()
    before = _snapshot(model)
    try:
        with torch.no_grad():  # on a copy: a norm in training mode updates its statistics when it runs
            ref = copy.deepcopy(model)(*_clone(inputs))
    except Exception:
        assume(False)  # the generator drew a model that does not run on its inputs: not a case
    try:
        predicted = find_norms(model, **{k: v for k, v in kwargs.items() if k not in ("merge_branches", "standalone")})
        folded = fold(model, **kwargs)
    except FxNormError:
        return  # a clear refusal is a correct answer
    after = _snapshot(model)
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0]), "the input model changed"
    with torch.no_grad():
        err = rel_err(folded(*_clone(inputs)), ref)
    report = report_of(folded, FoldReport)
    assert err < 1e-9, f"relative error {err}; folded {[(f.name, f.mode, f.into) for f in report.folded]}"
    assert sorted((s.name, s.fold, s.fold_into) for s in predicted if s.fold) == sorted(
        (f.name, f.mode, f.into) for f in report.folded if f.mode != "affine")


def _run(motif: str, data: st.DataObject) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="weights seed"))
    model, inputs, kwargs = MOTIFS[motif](data.draw)
    check_case(model, inputs, kwargs, seed=data.draw(st.integers(0, 2**16), label="statistics seed"))


@pytest.mark.parametrize("motif", sorted(MOTIFS))
@settings(max_examples=40, derandomize=True, **_COMMON)
@given(data=st.data())
def test_fold_is_exact_or_refused(motif: str, data: st.DataObject) -> None:
    _run(motif, data)


@pytest.mark.slow
@pytest.mark.parametrize("motif", sorted(MOTIFS))
@settings(max_examples=500, **_COMMON)
@given(data=st.data())
def test_fold_is_exact_or_refused_long_run(motif: str, data: st.DataObject) -> None:
    _run(motif, data)
