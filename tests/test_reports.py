"""report_of: one way to get the report of every pass, kept beside the result, never on it."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn

import fxnorm
from fxnorm.reports import record_report


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())


def test_every_pass_records_its_report_on_what_it_returned():
    model = _model()
    data = [torch.randn(2, 3, 4, 4)]
    before = dict(vars(model))
    assert fxnorm.recalibrate(model, data) is model
    assert fxnorm.report_of(model, fxnorm.CalibrationReport).num_batches == 1
    assert fxnorm.reset(model, select="1") is model
    assert fxnorm.report_of(model, fxnorm.ResetReport).names == ["1"]
    assert fxnorm.report_of(model, fxnorm.CalibrationReport).num_batches == 1  # both kinds are kept
    assert isinstance(fxnorm.report_of(model), fxnorm.ResetReport)  # the latest of any kind
    assert vars(model).keys() == before.keys()  # nothing was added to the model
    folded = fxnorm.fold(model.eval())
    assert [f.name for f in fxnorm.report_of(folded, fxnorm.FoldReport).folded] == ["1"]
    program = fxnorm.export_folded(model, (torch.randn(1, 3, 4, 4),))
    assert len(fxnorm.report_of(program, fxnorm.FoldReport).folded) == 1
    traced = fxnorm.trace(model)
    assert fxnorm.report_of(traced, fxnorm.TraceReport).complete


@pytest.mark.parametrize("kind, error", [(fxnorm.FoldReport, fxnorm.FoldError), (fxnorm.TraceReport, fxnorm.TraceError),
                                         (fxnorm.CalibrationReport, fxnorm.CalibrationError),
                                         (fxnorm.ResetReport, fxnorm.CalibrationError)])
def test_a_missing_report_raises_the_pass_error_naming_the_pass(kind, error):
    with pytest.raises(error, match=f"no {kind.__name__} was recorded for this Sequential: pass what fxnorm"):
        fxnorm.report_of(_model(), kind)
    with pytest.raises(fxnorm.FxNormError, match="no fxnorm pass returned this Sequential"):
        fxnorm.report_of(_model())


def test_a_report_goes_with_its_object_and_is_not_given_to_a_new_one_at_the_same_address():
    model = _model()
    record_report(model, fxnorm.ResetReport(["x"]))
    from fxnorm import reports

    key = id(model)
    assert key in reports._ENTRIES
    del model
    gc.collect()
    assert key not in reports._ENTRIES


def test_objects_without_weak_references_get_a_clear_error():
    with pytest.raises(fxnorm.FxNormError, match="no weak references"):
        record_report([1, 2], fxnorm.ResetReport([]))
