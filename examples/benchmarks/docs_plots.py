"""The plots of docs/benchmarks.md, drawn with matplotlib (Agg) from the stored benchmark JSON.

Every function takes the dict of ``make_docs.load_results()`` and a PNG path, draws when its data is
there and returns whether it wrote the file.

Example:
    >>> sorted(PLOTS)                                          # doctest: +SKIP
    ['coverage.png', 'domain_shift.png', ...]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["PLOTS", "plot_shift", "plot_coverage", "plot_fold_latency", "plot_recalibration"]

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.dirname(HERE)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # the 'bench' extra
        raise SystemExit("plots need matplotlib: pip install 'fxnorm[bench]' (or pass --no-plots)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version stamp: identical data, identical file
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_shift(results: dict[str, Any], path: str) -> bool:
    """Accuracy per corruption before/after adaptation: the example's own chart."""
    data = results.get("shift")
    if not data:
        return False
    _pyplot()
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import domain_shift

    domain_shift.plot(data, path)
    return True


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], colors: dict[str, str], fmt: str) -> None:
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=colors[label])
        ax.bar_label(bars, fmt=fmt, fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)


def plot_coverage(results: dict[str, Any], path: str) -> bool:
    """Batch norms in the model / left after torch fuse / left after fxnorm, per model family."""
    data = results.get("coverage")
    if not data:
        return False
    from docs_tables import coverage_by_family

    plt = _pyplot()
    fams = [f for f in coverage_by_family(data["rows"]) if f["bn_total"]]
    labels = [f"{f['family']}\n({f['with_bn']} of {f['models']} models have BN)" for f in fams]
    series = {
        "batch norms in the model": [f["bn_total"] for f in fams],
        "left after torch fuse": [f["bn_left_fuse"] for f in fams],
        "left after fxnorm.fold": [f["bn_left_fxnorm"] for f in fams],
    }
    colors = dict(zip(series, ("#9e9e9e", "#f28e2b", "#4e79a7")))
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    _bars(ax, labels, series, colors, "%d")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("batch norms (symlog scale)")
    ax.set_ylim(0, max(series["batch norms in the model"]) * 4)
    ax.set_title("torchvision zoo: batch norms left after folding (fewer is better; randomized statistics, "
                 "no weights)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_fold_latency(results: dict[str, Any], path: str) -> bool:
    """Latency of the torch-fused and fxnorm-folded models relative to the unfolded eval model."""
    data = results.get("fold")
    if not data or not any(k.startswith("fxnorm/eval_b") for k in data["rows"][0]):
        return False
    plt = _pyplot()
    rows = data["rows"]
    batches = sorted({int(k[len("eval_ms_b"):]) for r in rows for k in r if k.startswith("eval_ms_b")})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 3.8), dpi=110, squeeze=False)
    for ax, b in zip(axes[0], batches):
        series = {
            "torch fuse": [r[f"fuse_ms_b{b}"] / r[f"eval_ms_b{b}"] for r in rows],
            "fxnorm.fold": [r[f"fxnorm_ms_b{b}"] / r[f"eval_ms_b{b}"] for r in rows],
        }
        _bars(ax, [r["model"].replace("_", "_\n", 1) for r in rows], series,
              {"torch fuse": "#f28e2b", "fxnorm.fold": "#4e79a7"}, "%.2f")
        ax.axhline(1.0, color="#555555", lw=0.8, ls="--")
        ax.set_ylim(0, max(1.15, max(max(v) for v in series.values()) * 1.15))
        ax.set_title(f"batch {b}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("latency / unfolded eval latency")
    axes[0][0].legend(loc="lower left", fontsize=8)
    meta = data.get("meta", {})
    fig.suptitle(f"Folded model latency relative to the unfolded eval model (lower is better; "
                 f"{meta.get('device', 'cpu')}, torch threads: {meta.get('threads', '?')})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_recalibration(results: dict[str, Any], path: str) -> bool:
    """Throughput relative to an eval forward, and the statistics error, per model and method."""
    data = results.get("recalibrate")
    if not data:
        return False
    plt = _pyplot()
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    others = iter(["#f28e2b", "#59a14f", "#e15759", "#b07aa1"])  # update_bn orange, as in the other plots
    colors = {m: ("#4e79a7" if m.startswith("fxnorm") else "#9e9e9e" if m.startswith("eval") else next(others))
              for m in methods}
    cell = {(r["model"], r["method"]): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9), dpi=110)
    heaps = [("throughput_vs_eval", "")]
    if any("throughput_vs_eval_warm_heap" in r for r in rows):
        heaps = [("throughput_vs_eval", "\nfresh heap"), ("throughput_vs_eval_warm_heap", "\nwarm heap")]
    speed_groups = [f"{mo}{label}" for mo in models for _, label in heaps]
    _bars(left, speed_groups, {m: [cell[(mo, m)].get(key, 0.0) for mo in models for key, _ in heaps] for m in methods},
          colors, "%.2f")
    left.axhline(1.0, color="#555555", lw=0.8, ls="--")
    left.set_ylabel("throughput / eval forward's (higher is better)")
    left.set_ylim(0, 1.35)
    left.legend(loc="upper center", fontsize=7, ncol=2)
    left.set_title("speed (wall clock, same batches, same rounds)", fontsize=9)
    errs = [m for m in methods if any(cell[(mo, m)].get("var_rel_err") is not None for mo in models)]
    loaders = [("var_rel_err", "unshuffled")]
    if any(r.get("var_rel_err_shuffled") is not None for r in rows):
        loaders.append(("var_rel_err_shuffled", "shuffled"))
    groups = [f"{mo}\n{label}" for mo in models for _, label in loaders]
    series = {m: [max(cell[(mo, m)].get(key) or 0.0, 1e-12) for mo in models for key, _ in loaders] for m in errs}
    _bars(right, groups, series, colors, "%.0e")
    right.set_yscale("log")
    right.set_ylim(min(min(v) for v in series.values()) / 10, max(max(v) for v in series.values()) * 3000)
    right.set_ylabel("worst relative error of running_var")
    right.set_title("statistics error vs float64 (lower is better)", fontsize=9)
    right.legend(loc="upper left", fontsize=7, ncol=3)
    meta = data.get("meta", {})
    fig.suptitle(f"Recalibration, {meta.get('device', 'cpu')}, torch threads: {meta.get('threads', '?')}, "
                 f"{meta.get('batches', '?')} batches of {meta.get('batch_size', '?')}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


#: PNG file name in docs/ -> drawing function.
PLOTS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "coverage.png": plot_coverage,
    "fold_latency.png": plot_fold_latency,
    "recalibration.png": plot_recalibration,
    "domain_shift.png": plot_shift,
}
