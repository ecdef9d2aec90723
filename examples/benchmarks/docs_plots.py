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

__all__ = ["PLOTS", "plot_shift"]

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


#: PNG file name in docs/ -> drawing function.
PLOTS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "domain_shift.png": plot_shift,
}
