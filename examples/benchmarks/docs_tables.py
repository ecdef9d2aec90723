"""The sections of docs/benchmarks.md: one renderer per benchmark, from its stored JSON.

Used by ``make_docs.py``; every renderer takes the dict of :func:`make_docs.load_results` and returns
Markdown. A benchmark that was never run renders as the command that would measure it.

Example:
    >>> print(missing("python examples/domain_shift.py --json x.json"))
    *Not measured yet: run `python examples/domain_shift.py --json x.json`.*
    <BLANKLINE>
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

__all__ = ["SECTIONS", "table", "missing", "shift_section", "generic_section"]

METHOD_NAMES = {"source": "no adaptation", "update_bn": "torch `update_bn`",
                "update_bn_no_dropout": "`update_bn`, dropout p=0", "fxnorm": "`fxnorm.recalibrate`"}
ADAPTED = ("update_bn", "update_bn_no_dropout", "fxnorm")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str | Sequence[str] = ".2f",
          colalign: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table.

    Example:
        >>> print(table(["a", "b"], [["x", "2.0"]], colalign=["left", "right"]))
        | a   |   b |
        |-----|-----|
        | x   | 2.0 |
    """
    return tabulate(rows, headers=list(headers), tablefmt="github", floatfmt=floatfmt,
                    colalign=tuple(colalign) if colalign else None, disable_numparse=True)


def missing(command: str) -> str:
    """The text shown for a benchmark that was never run."""
    return f"*Not measured yet: run `{command}`.*\n"


def generic_section(data: Any) -> str:
    """Fallback for JSON this page does not know yet: every list of row dicts as a table."""
    parts = []
    for key, value in (data or {}).items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            headers = list(dict.fromkeys(k for row in value for k in row))
            parts += [f"`{key}`:", "", table(headers, [[row.get(h, "") for h in headers] for row in value]), ""]
    return "\n".join(parts) or "*(no table in the JSON)*\n"


# --------------------------------------------------------------------------------------- domain shift
def _shift_table(data: dict[str, Any]) -> str:
    rows = []
    for r in data["rows"]:
        adapted = [r[m] for m in ADAPTED if m in r]
        best = max(adapted)
        cells = [f"**{100 * r[m]:.1f}**" if m in ADAPTED and r[m] == best and min(adapted) != best
                 else f"{100 * r[m]:.1f}" for m in METHOD_NAMES if m in r]
        rows.append([r["corruption"].replace("_", " "), *cells, f"{100 * (r['fxnorm'] - r['source']):+.1f}",
                     f"{100 * (r['fxnorm'] - r['update_bn']):+.1f}"])
    headers = ["corruption", *(v for k, v in METHOD_NAMES.items() if k in data["rows"][0]),
               "fxnorm − source", "fxnorm − update_bn"]
    return table(headers, rows, colalign=["left"] + ["right"] * (len(headers) - 1))


def _ablation(rows: list[dict[str, Any]]) -> str:
    """What the ``update_bn_no_dropout`` column says, from the numbers."""
    if "update_bn_no_dropout" not in rows[0]:
        return ""
    to_fx = max(abs(r["fxnorm"] - r["update_bn_no_dropout"]) for r in rows)
    gap = max(abs(r["fxnorm"] - r["update_bn"]) for r in rows)
    text = (f"The ablation column runs `update_bn` with the dropout's `p` set to 0: it lands within "
            f"{100 * to_fx:.1f} points of fxnorm on every corruption (plain `update_bn`: up to {100 * gap:.1f}), ")
    if to_fx <= gap / 2:
        return text + ("so on this network most of the gap to `update_bn` comes from dropout running during its "
                       "pass, not from how the batch statistics are averaged. ")
    return text + "so dropout alone does not explain the gap. "


def shift_section(results: dict[str, Any]) -> str:
    """Accuracy under domain shift, shuffled and class-sorted unlabeled streams."""
    data, sorted_data = results.get("shift"), results.get("shift_sorted")
    if not data:
        return missing("python examples/domain_shift.py --json examples/benchmarks/results/domain_shift.json")
    cfg = data["config"]
    out = [
        f"A small Conv-BN-ReLU network (three blocks, a `Dropout` between the first two, width {cfg['width']}) is "
        f"trained for {cfg['epochs']} epochs on the clean train split of scikit-learn's handwritten digits "
        f"({cfg['train_images']} real 8x8 scans upscaled to {cfg['image_size']}x{cfg['image_size']}; "
        f"{cfg['test_images']} test images), seed {cfg['seed']}. Each corruption is applied to both splits. The "
        "batch-norm statistics are then re-estimated on the corrupted **train** split without its labels "
        f"(batches of {cfg['batch_size']}, the same batches for every method) and the model is evaluated on the "
        "corrupted **test** split. Top-1 accuracy, %:",
        "",
        _shift_table(data),
        "",
        "![accuracy under shift](domain_shift.png)",
        "",
    ]
    if sorted_data:
        moved = {m: max(abs(a[m] - b[m]) for a, b in zip(data["rows"], sorted_data["rows"]))
                 for m in ("update_bn", "fxnorm")}
        out += [
            "The same with the unlabeled stream ordered by class (as data from sequential sources often "
            "arrives; the batches then differ, and averaging per-batch variances as `update_bn` does loses the "
            f"spread between them). Compared with the shuffled stream, `update_bn`'s accuracies move by at most "
            f"{100 * moved['update_bn']:.1f} points and fxnorm's by at most {100 * moved['fxnorm']:.1f}:",
            "",
            _shift_table(sorted_data),
            "",
        ]
    gains = [r["fxnorm"] - r["source"] for r in data["rows"] if r["corruption"] != "clean"]
    vs = [r["fxnorm"] - r["update_bn"] for r in data["rows"]]
    out += [
        f"Reading: over the {len(gains)} corruptions, recalibration changes accuracy by "
        f"{100 * min(gains):+.1f} to {100 * max(gains):+.1f} points over the unadapted model; against "
        f"`update_bn` on the same batches the difference is {100 * min(vs):+.1f} to {100 * max(vs):+.1f} points. "
        "`update_bn` runs the whole model in train mode, so the `Dropout` is active while it gathers statistics, "
        "and it averages per-batch variances; fxnorm keeps the Dropout off and pools every element. "
        + _ablation(data["rows"]) +
        "Recalibration cannot undo every shift: a re-estimated mean and variance cannot flip the sign of "
        "features, so inverted images stay misclassified.",
        "",
        "Reproduce: `python examples/domain_shift.py --plot docs/domain_shift.png` "
        "(add `--sorted` for the class-ordered stream); needs the `examples` extra (scikit-learn).",
    ]
    return "\n".join(out) + "\n"


def _generic(key: str, command: str) -> Callable[[dict[str, Any]], str]:
    def render(results: dict[str, Any]) -> str:
        data = results.get(key)
        return generic_section(data) if data else missing(command)

    return render


#: (title, anchor, renderer) in page order.
SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("Folding: pass time and latency", "folding-pass-time-and-latency",
     _generic("fold", "python examples/benchmarks/bench_fold.py --json examples/benchmarks/results/fold.json")),
    ("Coverage over the torchvision zoo", "coverage-over-the-torchvision-zoo",
     _generic("coverage", "python examples/benchmarks/bench_fold.py --coverage "
                          "--json examples/benchmarks/results/coverage.json")),
    ("Recalibration: throughput, memory, statistics error", "recalibration-throughput-memory-statistics-error",
     _generic("recalibrate", "python examples/benchmarks/bench_recalibrate.py "
                             "--json examples/benchmarks/results/recalibrate.json")),
    ("Accuracy under domain shift", "accuracy-under-domain-shift", shift_section),
]
