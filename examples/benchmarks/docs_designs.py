"""The "Designs beyond conv -> BN" section of docs/benchmarks.md, from the JSON that
``bench_designs.py`` writes (kept apart from docs_tables.py, which holds the other sections).

Example:
    >>> print(designs_section({})[:24])
    *Not measured yet: run `
"""

from __future__ import annotations

from typing import Any

from docs_tables import missing, table

__all__ = ["designs_section", "DESIGNS_SECTION"]


def _cell(value: Any) -> str:
    return str(value).split(" (")[0] + (" (fuse fails)" if "fuse fails" in str(value) else "")


def designs_section(results: dict[str, Any]) -> str:
    """Batch norms left per design by torch ``fuse``, fxnorm, fxnorm with merge_branches; merged block latency."""
    data = results.get("designs")
    if not data:
        return missing("python examples/benchmarks/bench_designs.py --threads 1 "
                       "--json examples/benchmarks/results/designs.json")
    rows, timing, meta = data["rows"], data["latency"], data.get("meta", {})
    body = [[r["model"], r["bn_total"], _cell(r["bn_left_fuse"]), r["bn_left_fxnorm"], r["bn_left_fxnorm_merged"],
             r["sums_merged"], f"{r['rel_err']:.1e}"] for r in rows]
    out = [
        "Models written in [bench_designs.py](../examples/benchmarks/bench_designs.py), one per design of "
        "[folding.md](folding.md#beyond-conv---bn) (float32, randomized statistics), then a few torchvision models: "
        "batch norms in the model, left after torch's `fuse`, left after `fxnorm.fold`, and left after "
        "`fxnorm.fold(merge_branches=True)` (`sums merged`: RepVGG-style sums that became one conv). `rel err`: "
        "max |folded − original| / max |original| of the merged model's output.",
        "",
        table(["model", "BN total", "left after fuse", "left after fxnorm", "left, merge_branches", "sums merged",
               "rel err"], body, colalign=["left"] + ["right"] * 6),
        "",
        f"Latency of {timing['blocks']} RepVGG-style blocks ({timing['channels']} channels, input "
        f"{'x'.join(str(s) for s in timing['input'])}, CPU, torch threads: {meta.get('threads', '?')}, medians of "
        f"{timing['repeats']} runs taken in turns in the same run): the model as trained, folded "
        f"({timing['convs_folded']} convs), and folded with `merge_branches=True` ({timing['convs_merged']} convs).",
        "",
        table(["as trained (ms)", "folded (ms)", "merged (ms)", "merged / folded", "merged / as trained", "rel err"],
              [[f"{timing['eval_ms']:.2f}", f"{timing['folded_ms']:.2f}", f"{timing['merged_ms']:.2f}",
                f"{timing['merged/folded']:.2f}", f"{timing['merged/eval']:.2f}", f"{timing['rel_err']:.1e}"]],
              colalign=["right"] * 6),
        "",
        "Reproduce: `python examples/benchmarks/bench_designs.py --threads 1` (`--models ...`, `--size`, "
        "`--channels`, `--blocks` to change the configuration).",
    ]
    return "\n".join(out) + "\n"


#: (title, anchor, renderer), as docs_tables.SECTIONS holds them.
DESIGNS_SECTION = ("Designs beyond conv -> BN", "designs-beyond-conv---bn", designs_section)
