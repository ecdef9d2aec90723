"""Regenerate docs/benchmarks.md and its plots from the JSON the benchmark scripts write.

One command re-runs every benchmark (minutes on a CPU) and rewrites the page::

    python examples/benchmarks/make_docs.py --run            # run all, then write docs/benchmarks.md + docs/*.png
    python examples/benchmarks/make_docs.py --run shift      # re-run one benchmark (fold, coverage, designs, recalibrate, scale, shift)
    python examples/benchmarks/make_docs.py                  # only re-render from the stored JSON
    python examples/benchmarks/make_docs.py --check          # exit 1 if docs/benchmarks.md is stale (used by the tests)
    python examples/benchmarks/make_docs.py --api            # also regenerate docs/api.md
    python examples/benchmarks/make_docs.py --add coverage /tmp/coverage.json   # store a JSON a script wrote

The JSON lives in ``examples/benchmarks/results/`` (committed, so the page can be re-rendered and
checked without re-running anything). Plots need matplotlib (the ``bench`` extra).

Example:
    >>> from make_docs import BENCHMARKS
    >>> sorted(BENCHMARKS)
    ['coverage', 'designs', 'fold', 'fold_detection', 'recalibrate', 'scale', 'shift', 'shift_sorted']
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DOCS = os.path.join(ROOT, "docs")
RESULTS = os.path.join(HERE, "results")
PAGE = os.path.join(DOCS, "benchmarks.md")
PY = sys.executable
if HERE not in sys.path:  # the table and plot helpers next to this script
    sys.path.insert(0, HERE)

from docs_designs import DESIGNS_SECTION  # noqa: E402  (after the path set-up on purpose)
from docs_tables import SECTIONS as TABLE_SECTIONS  # noqa: E402

#: the page's sections in order: the designs come after the zoo coverage
SECTIONS = [*TABLE_SECTIONS[:2], DESIGNS_SECTION, *TABLE_SECTIONS[2:]]

__all__ = ["BENCHMARKS", "load_results", "render_page", "write_plots", "run_benchmarks", "add_result", "main"]

#: name -> (JSON file in results/, command that writes it; ``{json}`` is replaced by the path).
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "fold": ("fold.json", [PY, "examples/benchmarks/bench_fold.py", "--threads", "1", "--repeats", "20", "--json",
                           "{json}"]),
    "coverage": ("coverage.json", [PY, "examples/benchmarks/bench_fold.py", "--coverage", "--json", "{json}"]),
    "designs": ("designs.json", [PY, "examples/benchmarks/bench_designs.py", "--threads", "1", "--json", "{json}"]),
    "fold_detection": ("fold_detection.json", [PY, "examples/benchmarks/bench_fold.py", "--detection", "--threads",
                                               "1", "--repeats", "11", "--json", "{json}"]),
    "recalibrate": ("recalibrate.json",
                    [PY, "examples/benchmarks/bench_recalibrate.py", "--threads", "1", "--json", "{json}"]),
    "scale": ("scale.json", [PY, "examples/benchmarks/bench_scale.py", "--threads", "1", "--json", "{json}"]),
    "shift": ("domain_shift.json", [PY, "examples/domain_shift.py", "--threads", "1", "--json", "{json}"]),
    "shift_sorted": ("domain_shift_sorted.json",
                     [PY, "examples/domain_shift.py", "--threads", "1", "--sorted", "--json", "{json}"]),
}
#: ``--run`` groups: "shift" runs both domain-shift variants.
GROUPS = {"fold": ["fold", "fold_detection"], "coverage": ["coverage"], "designs": ["designs"],
          "recalibrate": ["recalibrate"], "scale": ["scale"], "shift": ["shift", "shift_sorted"]}
META = "machine.json"


# ------------------------------------------------------------------------------------------ running
def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(terse=True)}
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return info


def run_benchmarks(names: Sequence[str], extra: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Run the benchmark scripts ``names`` (keys of :data:`BENCHMARKS`), each writing its JSON into
    ``results/``; returns the seconds each took. A failing script stops everything (exit status 1).

    Example:
        >>> run_benchmarks(["shift"])        # doctest: +SKIP
        {'shift': 14.2}
    """
    os.makedirs(RESULTS, exist_ok=True)
    took: dict[str, float] = {}
    for name in names:
        filename, command = BENCHMARKS[name]
        path = os.path.join(RESULTS, filename)
        argv = [part.replace("{json}", path) for part in command] + list((extra or {}).get(name, []))
        print(f"$ {' '.join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv)}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        done = subprocess.run(argv, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {argv[1]} exited with status {done.returncode}")
        took[name] = time.perf_counter() - start
    _record_machine(took)
    return took


def _record_machine(took: dict[str, float | None]) -> None:
    """Note this machine, today's date and how long each benchmark took in ``results/machine.json``."""
    meta_path = os.path.join(RESULTS, META)
    meta = _read(meta_path) or {}
    meta.update(machine=_machine(), date=datetime.date.today().isoformat())
    meta.setdefault("seconds", {}).update({k: (round(v, 1) if v is not None else None) for k, v in took.items()})
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def add_result(name: str, path: str) -> str:
    """Store the JSON a benchmark script wrote (run by hand, e.g. with other options) as the result of
    ``name``; returns where it went.

    Example:
        >>> add_result("coverage", "/tmp/coverage.json")     # doctest: +SKIP
        '.../examples/benchmarks/results/coverage.json'
    """
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    data = _read(path)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a JSON object written by a benchmark script")
    os.makedirs(RESULTS, exist_ok=True)
    target = os.path.join(RESULTS, BENCHMARKS[name][0])
    with open(target, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    _record_machine({name: None})
    return target


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def load_results(results: str = RESULTS) -> dict[str, Any]:
    """The stored JSON of every benchmark (``None`` where it was never run), and ``machine``.

    Example:
        >>> sorted(load_results())          # doctest: +ELLIPSIS
        ['coverage', 'designs', 'fold', 'fold_detection', 'machine', 'recalibrate', 'scale', 'shift', 'shift_sorted']
    """
    found: dict[str, Any] = {name: _read(os.path.join(results, filename)) for name, (filename, _) in BENCHMARKS.items()}
    found["machine"] = _read(os.path.join(results, META))
    return found


# ------------------------------------------------------------------------------------------- page
def render_page(results: dict[str, Any]) -> str:
    """docs/benchmarks.md as a string, from :func:`load_results`' dict.

    Example:
        >>> page = render_page(load_results())
        >>> page.startswith("# Benchmarks")
        True
    """
    machine = (results.get("machine") or {}).get("machine") or {}
    date = (results.get("machine") or {}).get("date", "not recorded")
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python examples/benchmarks/make_docs.py` from examples/benchmarks/results/*.json: "
        "edit the scripts or make_docs.py, not this file. -->",
        "",
        "Every figure below was measured by a script in [examples/benchmarks/](../examples/benchmarks/) "
        "(or [examples/domain_shift.py](../examples/domain_shift.py)) that anyone can re-run. Speed figures are "
        "**ratios measured side by side in the same run** (medians over repeats), so they compare methods on "
        "the same machine under the same load; absolute times are given for context only.",
        "",
        "Regenerate everything (JSON, this page, the plots) with:",
        "",
        "```bash",
        "python examples/benchmarks/make_docs.py --run",
        "```",
        "",
        f"Last run: {date}; " + (", ".join(f"{k} {v}" for k, v in machine.items() if v is not None and k != "threads")
                                 if machine else "machine not recorded") + ".",
        "",
        *([f"Conditions: {note.rstrip('.')}.", ""] if (note := (results.get("machine") or {}).get("note")) else []),
        "Contents: " + ", ".join(f"[{title}](#{anchor})" for title, anchor, _ in SECTIONS) + ".",
        "",
    ]
    for title, _, render in SECTIONS:
        lines += [f"## {title}", "", render(results).rstrip(), ""]
    lines += [
        "## See also",
        "",
        "- [folding.md](folding.md): what folds, what cannot and why.",
        "- [recalibration.md](recalibration.md): what the statistics are and why they are exact.",
        "- [guide.md](guide.md): the guided tour; [design.md](design.md): how the passes work.",
        "",
    ]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], docs: str = DOCS) -> list[str]:
    """Draw every plot whose data is there into ``docs``; returns the paths written.

    Example:
        >>> write_plots(load_results(), "/tmp/plots")   # doctest: +SKIP
        ['/tmp/plots/coverage.png', '/tmp/plots/domain_shift.png', ...]
    """
    from docs_plots import PLOTS

    written = []
    for filename, draw in PLOTS.items():
        path = os.path.join(docs, filename)
        if draw(results, path):
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Regenerate docs/benchmarks.md and its plots.")
    parser.add_argument("--run", nargs="*", metavar="NAME", choices=sorted(GROUPS),
                        help="re-run these benchmarks first (all when no name is given)")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not up to date")
    parser.add_argument("--api", action="store_true", help="also regenerate docs/api.md")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--note", help="record how the machine was loaded etc. (shown under 'Last run')")
    parser.add_argument("--add", nargs=2, metavar=("NAME", "JSON"), action="append", default=[],
                        help=f"store a JSON written by a benchmark script as NAME ({', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    for name, path in args.add:
        print(f"stored {os.path.relpath(add_result(name, path), ROOT)}")
    if args.note is not None:
        meta = _read(os.path.join(RESULTS, META)) or {}
        meta["note"] = args.note
        with open(os.path.join(RESULTS, META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
    if args.run is not None:
        names = [n for group in (args.run or list(GROUPS)) for n in GROUPS[group]]
        run_benchmarks(names)
    results = load_results()
    if not args.check and not args.no_plots:  # before the page, which shows the plots that were drawn
        for path in write_plots(results):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    page = render_page(results)
    if args.check:
        current = open(PAGE).read() if os.path.exists(PAGE) else ""
        if current != page:
            print(f"{PAGE} is out of date: run python examples/benchmarks/make_docs.py", file=sys.stderr)
            return 1
        print(f"{PAGE} is up to date")
        return 0
    with open(PAGE, "w") as f:
        f.write(page)
    print(f"wrote {os.path.relpath(PAGE, ROOT)}")
    if args.api:
        sys.path.insert(0, DOCS)
        import gen_api

        return gen_api.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
