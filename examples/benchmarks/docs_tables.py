"""The sections of docs/benchmarks.md: one renderer per benchmark, from its stored JSON.

Used by ``make_docs.py``; every renderer takes the dict of :func:`make_docs.load_results` and returns
Markdown. A benchmark that was never run renders as the command that would measure it.

Example:
    >>> print(missing("python examples/domain_shift.py --json x.json"))
    *Not measured yet: run `python examples/domain_shift.py --json x.json`.*
    <BLANKLINE>
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

#: docs/, where the plots are (a plot is shown only when it was drawn)
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")

__all__ = ["SECTIONS", "table", "missing", "shift_section", "fold_section", "coverage_section", "family_of",
           "coverage_by_family", "recalibrate_section"]

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


# ------------------------------------------------------------------------------------------- folding
def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def fold_section(results: dict[str, Any]) -> str:
    """Fold pass time vs torch ``fuse``, norms left, and latency of the three models."""
    data = results.get("fold")
    if not data:
        return missing("python examples/benchmarks/bench_fold.py --json examples/benchmarks/results/fold.json")
    meta, rows = data.get("meta", {}), data["rows"]
    batches = sorted({int(k[len("eval_ms_b"):]) for r in rows for k in r if k.startswith("eval_ms_b")})
    out = [
        "`fxnorm.fold` against `torch.fx.experimental.optimization.fuse` on torchvision models built without "
        "weights, batch-norm statistics and affine parameters randomized (so no fold is an identity). "
        f"Device {meta.get('device', 'cpu')}, torch {meta.get('torch', '?')}, torch threads: {meta.get('threads', '?')}; "
        "medians over repeats, the compared functions run in turn.",
        "",
        "**Pass time and batch norms left.** `fold / fuse` below 1 means fxnorm's pass is faster.",
        "",
        table(["model", "fxnorm.fold (s)", "torch fuse (s)", "fold / fuse", "BN total", "left after fuse",
               "left after fxnorm"],
              [[r["model"], _num(r["fold_s"], ".3f"), _num(r["fuse_s"], ".3f"), _num(r["fold/fuse"], ".2f"),
                r["bn_total"], r["bn_left_fuse"], r["bn_left_fxnorm"]] for r in rows],
              colalign=["left"] + ["right"] * 6),
        "",
    ]
    for b in batches:
        out += [
            f"**Latency at batch {b}** (input {b}x3x{meta.get('size', 224)}x{meta.get('size', 224)}; ms). "
            "`fxnorm / fuse` at or below 1 means the fxnorm-folded model is as fast as torch's fused one; "
            "`fxnorm / eval` below 1 means it is faster than the unfolded eval model. `rel err`: max |folded − "
            "original| / max |original| of the outputs.",
            "",
            table(["model", "eval (ms)", "torch fuse (ms)", "fxnorm (ms)", "fxnorm / fuse", "fxnorm / eval",
                   "rel err"],
                  [[r["model"], _num(r[f"eval_ms_b{b}"], ".1f"), _num(r[f"fuse_ms_b{b}"], ".1f"),
                    _num(r[f"fxnorm_ms_b{b}"], ".1f"), _num(r[f"fxnorm/fuse_b{b}"], ".3f"),
                    _num(r[f"fxnorm/eval_b{b}"], ".3f"), _num(r.get(f"err_b{b}", "-"), ".1e")] for r in rows],
                  colalign=["left"] + ["right"] * 6),
            "",
        ]
    if any(k.startswith("fxnorm/eval_b") for k in rows[0]):
        out += ["![latency relative to the unfolded eval model](fold_latency.png)", ""]
    out += [_fold_reading(rows, batches), ""]
    out += _detection_table(results.get("fold_detection"))
    out.append("Reproduce: `python examples/benchmarks/bench_fold.py` (`--device cuda` on a GPU; `--detection` for "
               "the part-by-part models). [folding.md](folding.md) explains what folds and why.")
    return "\n".join(out) + "\n"


def _detection_table(data: dict[str, Any] | None) -> list[str]:
    """Fold pass of part-by-part models against one eval forward (bench_fold.py --detection)."""
    if not data:
        return [missing("python examples/benchmarks/bench_fold.py --detection --threads 1 --json "
                        "examples/benchmarks/results/fold_detection.json"), ""]
    meta, rows = data.get("meta", {}), data["rows"]
    return [
        "**Models traced part by part** (torchvision detection models, one image at the test input size: "
        "64x64 with `min_size=max_size=64`, 320x320 for the SSD; "
        f"torch threads: {meta.get('threads', '?')}). The fold pass (a copy, part-by-part tracing, the plan, "
        "the changes) against one eval forward; with `example_inputs` the pass also records shapes and one run "
        "of the eager glue (two more forwards).",
        "",
        table(["model", "eval forward (s)", "fold (s)", "fold / eval", "fold with example_inputs (s)",
               "with inputs / eval"],
              [[r["model"], _num(r["eval_s"], ".3f"), _num(r["fold_s"], ".3f"), _num(r["fold/eval"], ".2f"),
                _num(r["fold_inputs_s"], ".3f"), _num(r["fold_inputs/eval"], ".2f")] for r in rows],
              colalign=["left"] + ["right"] * 5),
        "",
        _detection_reading(rows),
        "",
    ]


def _detection_reading(rows: list[dict[str, Any]]) -> str:
    """Which models are within twice an eval forward, and where the time of the pass goes."""
    within = [r["model"] for r in rows if r["fold/eval"] <= 2]
    over = [r["model"] for r in rows if r["fold/eval"] > 2]
    text = (f"Reading: the fold pass takes {_span([r['fold/eval'] for r in rows])}x one eval forward; "
            f"within 2x: {', '.join(within) or 'none'}" + (f"; over 2x: {', '.join(over)}" if over else ""))
    return text + (". At these tiny test inputs one forward is cheap and the pass's fixed costs weigh most; they "
                   "grow with the parameters rather than the image: the result shares no tensor with the input, "
                   "so every weight it keeps is written once (a folded weight or a copy: on this machine about "
                   "0.4 ms per MB of fresh memory, 40-60% of the pass on the two Faster R-CNNs), and every part "
                   "of the model is traced (the whole model first, then its children) and planned.")


def _span(values: list[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"


def _fold_reading(rows: list[dict[str, Any]], batches: list[int]) -> str:
    """The measured figures in one paragraph (ranges over the models)."""
    ratio = [r["fold/fuse"] for r in rows if isinstance(r.get("fold/fuse"), (int, float))]
    faster = [r["model"] for r in rows if isinstance(r.get("fold/fuse"), (int, float)) and r["fold/fuse"] < 1]
    vs_fuse = [r[f"fxnorm/fuse_b{b}"] for r in rows for b in batches]
    vs_eval = [r[f"fxnorm/eval_b{b}"] for r in rows for b in batches]
    errs = [r[f"err_b{b}"] for r in rows for b in batches if isinstance(r.get(f"err_b{b}"), (int, float))]
    text = (f"Reading: fxnorm's pass takes {_span(ratio)}x the time of torch's `fuse` "
            f"(below 1 on {', '.join(faster) if faster else 'none of them'}). The folded models run at "
            f"{_span(vs_fuse, '.3f')}x the latency of torch's fused ones and {_span(vs_eval, '.3f')}x that of the "
            "unfolded eval model")
    if errs:
        text += f", with outputs within {max(errs):.1e} (relative) of the original"
    text += "."
    if all(r["bn_left_fuse"] == 0 and r["bn_left_fxnorm"] == 0 for r in rows):
        text += (f" Both tools fold every batch norm of these {len(rows)} models; where they differ is coverage "
                 "(next section).")
    return text


# ------------------------------------------------------------------------------------------ coverage
FAMILY_ORDER = ("classification", "segmentation", "video", "detection", "optical_flow")


def family_of(name: str) -> str:
    """The torchvision family of a model name (``list_models`` by module).

    Example:
        >>> family_of("resnet18"), family_of("fcn_resnet50"), family_of("r3d_18")
        ('classification', 'segmentation', 'video')
    """
    from torchvision import models as tvm

    for family, module in (("segmentation", tvm.segmentation), ("video", tvm.video),
                           ("detection", tvm.detection), ("optical_flow", tvm.optical_flow)):
        if name in tvm.list_models(module=module):
            return family
    return "classification"


def _left(value: Any, total: int) -> int:
    """Norms left by a tool: a count, or the total when the tool failed (reported as text)."""
    return value if isinstance(value, int) else total


def coverage_by_family(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family: models, models with batch norms, BN total, left after fuse / fxnorm, fuse failures,
    worst relative error.

    Example:
        >>> coverage_by_family([{"model": "resnet18", "bn_total": 20, "bn_left_fuse": 0, "bn_left_fxnorm": 0,
        ...                      "rel_err": 1e-6}])[0]["bn_total"]
        20
    """
    families: dict[str, dict[str, Any]] = {}
    for r in rows:
        fam = families.setdefault(family_of(r["model"]), {"models": 0, "with_bn": 0, "bn_total": 0,
                                                           "bn_left_fuse": 0, "bn_left_fxnorm": 0,
                                                           "fuse_failed": 0, "worst_rel_err": 0.0})
        fam["models"] += 1
        fam["with_bn"] += r["bn_total"] > 0
        fam["bn_total"] += r["bn_total"]
        fam["bn_left_fuse"] += _left(r["bn_left_fuse"], r["bn_total"])
        fam["bn_left_fxnorm"] += r["bn_left_fxnorm"]
        fam["fuse_failed"] += not isinstance(r["bn_left_fuse"], int)
        fam["worst_rel_err"] = max(fam["worst_rel_err"], float(r.get("rel_err") or 0.0))
    order = [f for f in FAMILY_ORDER if f in families] + sorted(set(families) - set(FAMILY_ORDER))
    return [{"family": f, **families[f]} for f in order]


def coverage_section(results: dict[str, Any]) -> str:
    """Batch norms left after torch ``fuse`` and after fxnorm over the torchvision zoo."""
    data = results.get("coverage")
    if not data:
        return missing("python examples/benchmarks/bench_fold.py --coverage "
                       "--json examples/benchmarks/results/coverage.json")
    rows = data["rows"]
    fams = coverage_by_family(rows)
    total = {k: sum(f[k] for f in fams) for k in ("models", "with_bn", "bn_total", "bn_left_fuse",
                                                   "bn_left_fxnorm", "fuse_failed")}
    worst = max(rows, key=lambda r: float(r.get("rel_err") or 0.0))

    def line(name: str, f: dict[str, Any], err: str) -> list[Any]:
        return [name, f["models"], f["with_bn"], f["bn_total"], f["bn_left_fuse"], f["bn_left_fxnorm"],
                f["fuse_failed"], err]

    body = [line(f["family"], f, f"{f['worst_rel_err']:.1e}") for f in fams]
    body.append(line("**all**", total, f"{float(worst.get('rel_err') or 0):.1e} ({worst['model']})"))
    out = [
        f"Every torchvision {', '.join(f['family'] for f in fams)} model ({total['models']} models), built "
        "without weights with randomized batch-norm statistics: batch norms in the model, left after torch's "
        "`fuse`, and left after `fxnorm.fold`. When `fuse` fails (it needs the whole model to trace: every "
        "detection model) all its norms count as left. `worst rel err`: max |folded − original| / max |original| "
        "of fxnorm's output (detection models: per traced part, on the inputs it received).",
        "",
        table(["family", "models", "with BN", "BN total", "left after fuse", "left after fxnorm", "fuse failed",
               "worst rel err"], body, colalign=["left"] + ["right"] * 7),
        "",
        "![batch norms left per model family](coverage.png)",
        "",
    ]
    fuse_fail = sum(r["bn_total"] for r in rows if not isinstance(r["bn_left_fuse"], int))
    left_models = [r["model"] for r in rows if r["bn_left_fxnorm"]]
    out += [f"Reading: of {total['bn_total']} batch norms, torch's `fuse` leaves {total['bn_left_fuse']} "
            f"({fuse_fail} of them in the {total['fuse_failed']} models it cannot trace) and fxnorm leaves "
            f"{total['bn_left_fxnorm']}"
            + (f", all in {', '.join(left_models)}." if left_models else ".")
            + f" fxnorm's worst relative output error over the zoo is {float(worst.get('rel_err') or 0):.1e} "
            "(float32).", ""]
    left = [r for r in rows if r["bn_left_fxnorm"]]
    if left:
        out += ["Models where fxnorm leaves batch norms (each one is reported in the fold report with its reason; "
                "typically pre-activation norms that read a concatenation and feed a ReLU, as in DenseNet):", "",
                table(["model", "BN total", "left after fuse", "left after fxnorm"],
                      [[r["model"], r["bn_total"], r["bn_left_fuse"], r["bn_left_fxnorm"]] for r in left],
                      colalign=["left", "right", "right", "right"]), ""]
    per_model = [[r["model"], family_of(r["model"]), r["bn_total"], r["bn_left_fuse"], r["bn_left_fxnorm"],
                  _num(float(r.get("rel_err") or 0.0), ".1e")] for r in rows if r["bn_total"]]
    out += ["<details><summary>Every model with batch norms</summary>", "",
            table(["model", "family", "BN total", "left after fuse", "left after fxnorm", "rel err"], per_model,
                  colalign=["left", "left", "right", "right", "right", "right"]),
            "", "</details>", "",
            "Reproduce: `python examples/benchmarks/bench_fold.py --coverage` (`--models ...` for a subset)."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- recalibration
def _sci(x: Any) -> str:
    return "-" if x is None else f"{x:.1e}"


def recalibrate_section(results: dict[str, Any]) -> str:
    """Throughput, peak memory and statistics error of fxnorm.recalibrate vs update_bn vs an eval forward."""
    data = results.get("recalibrate")
    if not data:
        return missing("python examples/benchmarks/bench_recalibrate.py "
                       "--json examples/benchmarks/results/recalibrate.json")
    meta, rows = data.get("meta", {}), data["rows"]
    size, bs, n = meta.get("size", "?"), meta.get("batch_size", "?"), meta.get("batches", "?")
    out = [
        f"Re-estimating the batch-norm statistics of torchvision models (no weights, randomized statistics) from "
        f"{n} batches of {bs}x3x{size}x{size} images, the last one short. Speed is measured on an unshuffled loader "
        "whose batches drift (batch *i* is offset by 0.1·*i*) — the same batches for every method; the statistics "
        "error on that loader and on a shuffled one (the same images in a random order, the same batch sizes). "
        "Throughput is images per second over the whole call (fxnorm's hooks, interception and write-back "
        "included); `vs eval` is the method's throughput over a plain eval forward's on the same batches, "
        "measured in the same rounds (wall clock, and process CPU time which a busy machine disturbs less). Every "
        f"method keeps its own copy of the model across the rounds. Device {meta.get('device', 'cpu')}, "
        f"torch {meta.get('torch', '?')}, torch threads: {meta.get('threads', '?')}, medians over "
        f"{meta.get('rounds', '?')} rounds in rotating order.",
        "",
        *(["How the C allocator serves the large activations moves every method's time by up to 30% on a CPU, so "
           "each model is measured in a fresh process with glibc's default heap (`vs eval`, as in a script that loads "
           "a model and recalibrates it: large blocks are new pages at every allocation, and their page faults are "
           "a large part of the time), and again in a fresh process whose heap keeps freed memory (`warm heap`: "
           "`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, as in a long-running process that served tensors "
           "of these sizes before; no page faults, every method is faster).", ""]
          if "warm" in meta.get("heaps", []) else []),
        "Statistics error: the worst channel of any norm against float64 statistics computed directly from the "
        "inputs each norm receives (norms normalizing with batch statistics, every other module in eval mode): "
        "`mean err` is |error| / std, `var err` the relative error of the variance, on the unshuffled and the "
        "shuffled loader. `own inputs` compares fxnorm with the inputs its norms received in its own run (the "
        "estimator alone, without the float32 rounding two separate forwards of a deep network disagree by).",
        "",
    ]
    if not meta.get("fvcore"):
        out += ["fvcore is not installed here, so its PreciseBN (`update_bn_stats`) is not in the tables; the script "
                "adds it when it is.", ""]
    memory = any(r.get("peak_mb") for r in rows)  # the script reports 0 where it could not measure
    if not memory:
        out += ["Peak memory: the script could not measure it in this run (it reported 0 for every method), so it "
                "is not shown.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        body = []
        warm = all("throughput_vs_eval_warm_heap" in r for r in mine)
        for r in mine:
            body.append([r["method"], f"{r['img_s']:.1f}", f"{r['throughput_vs_eval']:.2f}",
                         f"{r['cpu_time_vs_eval']:.2f}",
                         *([f"{r['img_s_warm_heap']:.1f}", f"{r['throughput_vs_eval_warm_heap']:.2f}"] if warm else []),
                         *([f"{r['peak_mb']:.0f}"] if memory else []),
                         _sci(r.get("mean_err_over_std")), _sci(r.get("var_rel_err")),
                         _sci(r.get("mean_err_over_std_shuffled")), _sci(r.get("var_rel_err_shuffled")),
                         _sci(r.get("own_inputs_var_rel_err"))])
        headers = ["method", "images/s", "vs eval (wall)", "vs eval (CPU)",
                   *(["images/s, warm heap", "vs eval, warm heap"] if warm else []), *(["peak MB"] if memory else []),
                   "mean err", "var err", "mean err, shuffled", "var err, shuffled", "var err, own inputs"]
        out += [f"**{model}**", "", table(headers, body, colalign=["left"] + ["right"] * (len(headers) - 1)), ""]
    fx = {r["model"]: r for r in rows if r["method"].startswith("fxnorm")}
    ub = {r["model"]: r for r in rows if "update_bn" in r["method"] and not r["method"].startswith("fvcore")}
    if fx and ub:
        out += ["Side by side: " + "; ".join(
            f"{m}: fxnorm runs at {fx[m]['throughput_vs_eval']:.2f}x an eval forward's throughput"
            + (f" ({fx[m]['throughput_vs_eval_warm_heap']:.2f}x with a warm heap)"
               if "throughput_vs_eval_warm_heap" in fx[m] else "") +
            f" and {ub[m]['img_s'] and fx[m]['img_s'] / ub[m]['img_s']:.2f}x `update_bn`'s"
            + (f" ({ub[m]['fxnorm_speedup_warm_heap']:.2f}x)"
               if "fxnorm_speedup_warm_heap" in ub[m] else "") +
            ", with a variance error of "
            f"{_sci(fx[m].get('var_rel_err'))} (shuffled: {_sci(fx[m].get('var_rel_err_shuffled'))}) against "
            f"`update_bn`'s {_sci(ub[m].get('var_rel_err'))} ({_sci(ub[m].get('var_rel_err_shuffled'))})"
            for m in fx if m in ub) + ".", ""]
    if os.path.exists(os.path.join(DOCS, "recalibration.png")):  # drawn by make_docs.py when matplotlib is there
        out += ["![recalibration throughput and statistics error](recalibration.png)", ""]
    out += ["Reproduce: `python examples/benchmarks/bench_recalibrate.py --threads 1` (`--device cuda` on a GPU). "
            "[recalibration.md](recalibration.md) explains the statistics."]
    return "\n".join(out) + "\n"


def scale_section(results: dict[str, Any]) -> str:
    """Recalibration on 1 vs 2 processes, and the sequential order's cost beside the joint one."""
    data = results.get("scale")
    if not data:
        return missing("python examples/benchmarks/bench_scale.py --threads 1 --json examples/benchmarks/results/scale.json")
    c = data["config"]
    out = [
        f"{c['model']} (no weights), {c['batches']} batches of {c['batch_size']}x3x{c['size']}x{c['size']}, "
        f"{c['threads']} torch thread(s) per process, on a machine with {c['cpus']} CPU(s) (load average "
        f"{c['load']} when the run started: two processes are only faster with two idle cores).",
        "",
        "**Processes**: the same batches recalibrated by one process and by two (`torch.distributed`, gloo on the "
        "CPU, every process its every 2nd batch, as `torchrun ... -m fxnorm recalibrate` does). Seconds from a "
        "barrier after the models were built to the end of `recalibrate` on every process (the vote and the "
        "all-reduce included, start-up excluded); `var diff` is the largest relative difference of any running "
        "variance from one process's result.",
        "",
        table(["processes", "seconds", "images/s", "speed-up", "var diff"],
              [[r["processes"], f"{r['seconds']:.2f}", f"{r['img_s']:.1f}", f"{r['speedup']:.2f}",
                _sci(r["max_var_rel_diff"])] for r in data["processes"]], colalign=["right"] * 5),
        "",
        "**Order**: `order=\"sequential\"` (one pass per depth level, each forward ending once the level's norms ran; "
        "exact at any batch size) beside the default one pass, on the same batches; medians over "
        f"{c['rounds']} rounds in alternation. Images/s counts every image once.",
        "",
        table(["order", "passes", "seconds", "images/s", "time vs joint"],
              [[r["order"], r["passes"], f"{r['seconds']:.2f}", f"{r['img_s']:.1f}", f"{r['vs_joint']:.1f}"]
               for r in data["orders"]], colalign=["left"] + ["right"] * 4),
        "",
        "Reproduce: `python examples/benchmarks/bench_scale.py --threads 1`.",
    ]
    return "\n".join(out) + "\n"


#: (title, anchor, renderer) in page order.
SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("Folding: pass time and latency", "folding-pass-time-and-latency", fold_section),
    ("Coverage over the torchvision zoo", "coverage-over-the-torchvision-zoo", coverage_section),
    ("Recalibration: throughput, memory, statistics error", "recalibration-throughput-memory-statistics-error",
     recalibrate_section),
    ("Recalibration at scale: processes and order", "recalibration-at-scale-processes-and-order", scale_section),
    ("Accuracy under domain shift", "accuracy-under-domain-shift", shift_section),
]
