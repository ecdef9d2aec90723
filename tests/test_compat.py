"""fxnorm 0.1 import paths and names keep working for one release, each with a DeprecationWarning,
and they never shadow the public functions (``fxnorm.fold`` stays the function)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxnorm
from fxnorm.compat import OLD_MODULES


@pytest.mark.parametrize("old", sorted(OLD_MODULES))
def test_every_old_module_path_imports_its_names_with_a_warning(old: str):
    alias = sys.modules[old]
    names = [n for n in dir(alias) if not n.startswith("_")]
    assert names, f"{old} lists no names"
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        value = getattr(alias, names[0])
    target = next(t for t in OLD_MODULES[old] if hasattr(importlib.import_module(t), names[0]))
    assert value is getattr(importlib.import_module(target), names[0])


def test_from_import_of_an_old_path_works_and_warns():
    with pytest.warns(DeprecationWarning, match=r"fxnorm\.plan is deprecated; import it from fxnorm\.folding\.neighbours"):
        from fxnorm.plan import producer_plan
    from fxnorm.folding.neighbours import producer_plan as current

    assert producer_plan is current


def test_the_old_single_node_planner_still_answers():
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    gm = fxnorm.trace(model)
    with pytest.warns(DeprecationWarning, match="plan_norm"):
        from fxnorm.plan import plan_norm
    nodes = {n.name: n for n in gm.graph.nodes}
    with pytest.warns(DeprecationWarning, match="fxnorm.find_norms"):
        first, second = plan_norm(gm, nodes["_1"]), plan_norm(gm, nodes["_3"])
    assert (first.mode, first.target.name, second.mode) == ("into_producer", "_0", None)
    assert "not a conv" in second.reason


def test_importing_an_old_path_does_not_rebind_the_public_function():
    code = ("import warnings; warnings.simplefilter('ignore'); import fxnorm, fxnorm.fold; "
            "from fxnorm.fold import fold; import inspect; print(inspect.isfunction(fxnorm.fold))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


@pytest.mark.parametrize("name", ["prepare", "convert", "fold_report", "trace_report"])
def test_old_top_level_names_warn(name: str):
    with pytest.warns(DeprecationWarning, match=f"fxnorm.{name}"):
        getattr(fxnorm, name)
    assert name not in fxnorm.__all__


def test_old_names_still_do_their_job():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.warns(DeprecationWarning):
        prepared = fxnorm.prepare(model)
    with torch.inference_mode():
        prepared(torch.randn(2, 3, 4, 4))
    with pytest.warns(DeprecationWarning):
        out, report = fxnorm.convert(prepared, report=True)
    assert out is model and report.num_batches == 1 and int(model[1].num_batches_tracked) == 1
    folded = fxnorm.fold(model.eval())
    with pytest.warns(DeprecationWarning):
        assert fxnorm.fold_report(folded) is fxnorm.report_of(folded, fxnorm.FoldReport)
    traced = fxnorm.trace(model)
    with pytest.warns(DeprecationWarning):
        assert fxnorm.trace_report(traced).complete


def test_names_moved_out_of_fxnorm_export_still_import():
    import fxnorm.export as export

    with pytest.warns(DeprecationWarning, match="fxnorm.inspection.programs.count_batch_norm_ops"):
        assert export.count_batch_norm_ops is fxnorm.count_batch_norm_ops
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        export.nothing_here  # noqa: B018


def test_fold_strict_is_renamed_strict_with_a_warning():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval()
    with pytest.warns(DeprecationWarning, match="fold_strict"), pytest.raises(fxnorm.FoldError, match="cannot fold"):
        fxnorm.export_folded(model, (torch.randn(1, 3, 4, 4),), fold_strict=True)


def test_unknown_attribute_of_an_old_path_is_an_attribute_error():
    with pytest.raises(AttributeError, match="deprecated alias"):
        sys.modules["fxnorm.stats"].no_such_name  # noqa: B018
