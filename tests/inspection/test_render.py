"""fxnorm.render: summary counts, tabulate tables, the JSON-ready report."""

from __future__ import annotations

import json

import torch.nn as nn

from fxnorm import (
    format_summary,
    format_table,
    format_untraced,
    report_dict,
    summarize,
    NormSite,
    find_norms,
    UntracedPart,
)
from zoo import randomize_norms


def _site(name: str, kind: str = "BatchNorm2d", fold: str | None = "into_producer", **kw: object) -> NormSite:
    base = dict(
        name=name, node=name.replace(".", "_"), graph="", kind=kind, op="call_module", module_type=kind,
        num_features=8, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, training=False,
        num_batches_tracked=3, producer="conv", producer_op="call_module", producer_type="Conv2d",
        consumers=["relu"], fold=fold, fold_into="conv" if fold else None,
        reason=None if fold else "producer relu (ReLU) is not a conv/linear",
    )
    base.update(kw)
    return NormSite(**base)  # type: ignore[arg-type]


SITES = [
    _site("a.bn"),
    _site("b.bn", fold=None),
    _site("c.ln", kind="LayerNorm", fold=None),
    _site("d.bn", kind="BatchNorm2d", fold="into_consumer"),
]
UNTRACED = [UntracedPart("", "Net", "TraceError: control flow"), UntracedPart("head", "Head", "TraceError: x")]


def test_summarize_counts() -> None:
    s = summarize(SITES, UNTRACED)
    assert s == {
        "total": 4,
        "by_kind": {"BatchNorm2d": 3, "LayerNorm": 1},
        "foldable": 2,
        "not_foldable": 2,
        "untraced_parts": 2,
    }
    assert list(s["by_kind"]) == ["BatchNorm2d", "LayerNorm"]  # sorted


def test_format_summary_line() -> None:
    assert format_summary(SITES, UNTRACED) == (
        "4 norms (BatchNorm2d: 3, LayerNorm: 1); 2 foldable, 2 not foldable; 2 untraced parts")
    assert format_summary([]) == "0 norms (none); 0 foldable, 0 not foldable; 0 untraced parts"


def test_format_table_rows_and_formats() -> None:
    sites = SITES + [_site("e.bn", fold=None, reason="x" * 200, health=["NaN/Inf in weight", "statistics never updated"])]
    text = format_table(sites)
    lines = text.splitlines()
    assert lines[0].split() == ["norm", "kind", "features", "producer", "fold", "health"]
    assert len(lines) == 2 + len(sites)  # header, rule, one row per site
    assert "into_producer conv" in lines[2] and lines[2].rstrip().endswith("ok")
    assert "no: producer relu (ReLU) is not a conv/linear" in lines[3]
    assert "into_consumer conv" in lines[5]
    # long reasons are cut to max_reason characters with an ellipsis
    last = lines[-1]
    assert "no: " + "x" * 85 + "…" in last and "x" * 87 not in last
    assert last.rstrip().endswith("NaN/Inf in weight; statistics never updated")
    assert "x" * 120 in format_table(sites, max_reason=200)
    github = format_table(sites, tablefmt="github")
    assert github.splitlines()[0].startswith("| norm") and github.count("\n") == len(sites) + 1


def test_format_table_producer_dash_for_eager() -> None:
    eager = _site("x", fold=None, producer=None, producer_type=None, op="eager")
    row = format_table([eager], tablefmt="plain").splitlines()[1]
    assert row.split()[:4] == ["x", "BatchNorm2d", "8", "-"]


def test_format_untraced() -> None:
    lines = format_untraced(UNTRACED, tablefmt="plain").splitlines()
    assert lines[0].split() == ["part", "type", "reason"]
    assert lines[1].split()[:2] == ["<model>", "Net"] and lines[1].endswith("TraceError: control flow")
    assert lines[2].split()[:2] == ["head", "Head"]


def test_report_dict_is_json_and_matches_sites() -> None:
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval())
    sites = find_norms(model)
    report = report_dict("toy", sites, UNTRACED[:1])
    text = json.dumps(report)  # every value is JSON-serializable
    back = json.loads(text)
    assert back["model"] == "toy"
    assert back["norms"] == [s.to_dict() for s in sites]
    assert back["untraced"] == [{"name": "", "type": "Net", "reason": "TraceError: control flow"}]
    assert back["summary"]["total"] == 2 and back["summary"]["foldable"] == 1
    assert back["norms"][0]["fold"] == "into_producer" and back["norms"][1]["reason"].startswith("producer _2 (ReLU)")
