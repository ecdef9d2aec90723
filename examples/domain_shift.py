"""Domain shift on real images: recover accuracy by recalibrating batch-norm statistics.

A small Conv-BN-ReLU network is trained on scikit-learn's handwritten digits (1797 real 8x8 scans,
shipped inside scikit-learn, upscaled here to 16x16). The test images are then corrupted (noise,
contrast, blur, brightness, inversion), and the model's accuracy is measured four ways on each
corrupted test split:

* ``source``: the trained model as is;
* ``update_bn``: after ``torch.optim.swa_utils.update_bn`` on the corrupted *train* split (unlabeled);
* ``update_bn_no_dropout``: the same with every ``Dropout`` set to ``p=0`` while it runs (an ablation
  that shows how much of the difference comes from ``update_bn`` running dropout);
* ``fxnorm``: after ``fxnorm.recalibrate`` on the very same batches.

No label of the shifted data is used: only batch-norm running statistics change. ``update_bn`` puts
the whole model in train mode, so the ``Dropout`` in front of the second block runs while it gathers
statistics; ``fxnorm.recalibrate`` keeps every non-norm module in eval mode and pools the statistics
exactly (see docs/recalibration.md). With ``--sorted`` the unlabeled stream arrives ordered by class
(as data from sequential sources often does), a harder case for per-batch averaging.

Run (needs the ``examples`` extra: scikit-learn, matplotlib for ``--plot``)::

    python examples/domain_shift.py                      # table, ~15 s on two CPU cores
    python examples/domain_shift.py --json shift.json --plot docs/domain_shift.png
    python examples/domain_shift.py --epochs 2 --quick   # what the test runs

Example (in Python):
    >>> import domain_shift                                  # doctest: +SKIP
    >>> result = domain_shift.run(epochs=2, quick=True)      # doctest: +SKIP
    >>> sorted(result["rows"][0])                            # doctest: +SKIP
    ['corruption', 'fxnorm', 'source', 'update_bn', 'update_bn_no_dropout']
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # run from a checkout without installing: make ``import fxnorm`` work
    import fxnorm
except ImportError:  # pragma: no cover - depends on how the example is launched
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fxnorm

__all__ = ["CORRUPTIONS", "METHODS", "SmallNet", "load_data", "corrupt", "train", "accuracy", "adapt", "run", "format_rows",
           "plot", "main"]

#: Adaptation methods compared, in table order.
METHODS = ("source", "update_bn", "update_bn_no_dropout", "fxnorm")


class SmallNet(nn.Module):
    """Three Conv-BN-ReLU blocks, a Dropout between the first two, global pooling and a classifier.

    Example:
        >>> SmallNet()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 32, dropout: float = 0.3, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width, 1),
            nn.Dropout(dropout),
            *block(width, 2 * width, 2),
            *block(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


# ---------------------------------------------------------------------------------------------- data
def load_data(size: int = 16, seed: int = 0, test_fraction: float = 0.3) -> dict[str, torch.Tensor]:
    """scikit-learn's digits in [0, 1], upscaled to ``size`` x ``size``, split stratified by class.

    Returns ``x_train, y_train, x_test, y_test`` (images ``(N, 1, size, size)`` float32).

    Example:
        >>> d = load_data()                                      # doctest: +SKIP
        >>> d["x_train"].shape, d["x_test"].shape                # doctest: +SKIP
        (torch.Size([1257, 1, 16, 16]), torch.Size([540, 1, 16, 16]))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # the example's optional extra
        raise SystemExit("this example needs scikit-learn: pip install 'fxnorm[examples]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=seed, stratify=digits.target)
    return {
        "x_train": images[idx_train], "y_train": labels[idx_train],
        "x_test": images[idx_test], "y_test": labels[idx_test],
    }


def _blur(x: torch.Tensor, sigma: float = 1.2) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (x + 0.35 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def _contrast(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + 0.25 * (x - mean)


def _brightness(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (x + 0.4).clamp(0, 1)


#: Corruptions of images in [0, 1]: name -> function(images, generator) -> images.
CORRUPTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "clean": lambda x, gen: x,
    "gaussian_noise": _noise,
    "low_contrast": _contrast,
    "blur": lambda x, gen: _blur(x),
    "brightness": _brightness,
    "inversion": lambda x, gen: 1.0 - x,
}


def corrupt(images: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` (a key of :data:`CORRUPTIONS`) with a fixed seed.

    Example:
        >>> corrupt(torch.zeros(1, 1, 4, 4), "inversion").min().item()
        1.0
    """
    if name not in CORRUPTIONS:
        raise SystemExit(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    gen = torch.Generator().manual_seed(seed)
    return CORRUPTIONS[name](images, gen)


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))


# ------------------------------------------------------------------------------- training and eval
def train(data: dict[str, torch.Tensor], *, epochs: int = 6, batch_size: int = 32, seed: int = 0,
          width: int = 32, lr: float = 3e-3) -> SmallNet:
    """Train :class:`SmallNet` on the clean train split with Adam (fixed seed); returns it in eval mode.

    Example:
        >>> model = train(load_data(), epochs=1)                 # doctest: +SKIP
    """
    torch.manual_seed(seed)
    model = SmallNet(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data["x_train"], data["y_train"]
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(batch_size):
            if len(idx) < 2:  # a train-mode BN needs two values per channel
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode (the model's mode is restored).

    Example:
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> 0.0 <= accuracy(m, torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)) <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    try:
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    finally:
        model.train(was_training)
    return correct / len(y)


def adapt(model: nn.Module, method: str, batches: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose batch-norm statistics were re-estimated on unlabeled ``batches``.

    ``method``: ``"source"`` (no change), ``"update_bn"`` (torch's SWA helper),
    ``"update_bn_no_dropout"`` (the same with every dropout's ``p`` set to 0 while it runs) or
    ``"fxnorm"`` (:func:`fxnorm.recalibrate`). The input model is never changed.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
        >>> float(adapt(m, "fxnorm", [torch.full((4, 1, 2, 2), 3.0) + torch.arange(4.0).view(4, 1, 1, 1)])[1]
        ...       .running_var.sum()) != 2.0
        True
    """
    work = copy.deepcopy(model)
    if method == "source":
        return work
    if method == "update_bn":
        torch.optim.swa_utils.update_bn(batches, work)
        return work.eval()
    if method == "update_bn_no_dropout":
        dropouts = [(m, m.p) for m in work.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        for m, _ in dropouts:
            m.p = 0.0
        torch.optim.swa_utils.update_bn(batches, work)
        for m, p in dropouts:
            m.p = p
        return work.eval()
    if method == "fxnorm":
        return fxnorm.recalibrate(work, batches).eval()
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------- driver
def run(*, epochs: int = 6, size: int = 16, batch_size: int = 64, seed: int = 0, quick: bool = False,
        sorted_stream: bool = False, corruptions: Sequence[str] | None = None, width: int = 32) -> dict[str, Any]:
    """Train, corrupt, adapt and evaluate; returns a JSON-ready dict (``rows``: one per corruption,
    accuracy of each method in [0, 1]; ``config``; ``timing`` in seconds).

    ``quick`` trains a narrower network (width 16); the corruptions and the evaluation are the same.

    Example:
        >>> r = run(epochs=2, quick=True, corruptions=["clean"])   # doctest: +SKIP
        >>> r["rows"][0]["corruption"]                             # doctest: +SKIP
        'clean'
    """
    started = time.perf_counter()
    if quick:
        width = min(width, 16)
    names = list(corruptions or CORRUPTIONS)
    data = load_data(size=size, seed=seed)
    t0 = time.perf_counter()
    model = train(data, epochs=epochs, seed=seed, width=width)
    train_s = time.perf_counter() - t0
    x_adapt, y_adapt = data["x_train"], data["y_train"]
    if sorted_stream:  # the unlabeled stream arrives grouped by class (labels are used only to order it)
        order = torch.sort(y_adapt, stable=True).indices
        x_adapt = x_adapt[order]
    rows: list[dict[str, Any]] = []
    adapt_s = {m: 0.0 for m in METHODS}
    for i, name in enumerate(names):
        batches = _batches(corrupt(x_adapt, name, seed=seed + 1 + i), batch_size)
        x_test = corrupt(data["x_test"], name, seed=seed + 101 + i)
        row: dict[str, Any] = {"corruption": name}
        for method in METHODS:
            t0 = time.perf_counter()
            adapted = adapt(model, method, batches)
            adapt_s[method] += time.perf_counter() - t0
            row[method] = accuracy(adapted, x_test, data["y_test"])
        rows.append(row)
    return {
        "benchmark": "domain_shift",
        "config": {
            "dataset": "sklearn load_digits", "image_size": size, "epochs": epochs, "train_batch_size": 32,
            "batch_size": batch_size,
            "seed": seed, "width": width, "quick": quick, "sorted_stream": sorted_stream,
            "train_images": len(data["y_train"]), "test_images": len(data["y_test"]),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "rows": rows,
        "timing": {"train_s": train_s, **{f"{m}_s": s for m, s in adapt_s.items()},
                   "total_s": time.perf_counter() - started},
    }


def format_rows(result: dict[str, Any], tablefmt: str = "simple") -> str:
    """The result as a table of accuracies (percent) with the change fxnorm brings over ``source``.

    Example:
        >>> print(format_rows({"rows": [{"corruption": "clean", "source": 0.9, "update_bn": 0.8,
        ...                              "update_bn_no_dropout": 0.85, "fxnorm": 0.95}]}, tablefmt="plain"))
        corruption      source    update_bn    update_bn_no_dropout    fxnorm    fxnorm - source
        clean             90.0         80.0                    85.0      95.0                5.0
    """
    from tabulate import tabulate

    table = [[r["corruption"], *(100 * r[m] for m in METHODS), 100 * (r["fxnorm"] - r["source"])]
             for r in result["rows"]]
    return tabulate(table, headers=["corruption", *METHODS, "fxnorm - source"], tablefmt=tablefmt, floatfmt=".1f")


def plot(result: dict[str, Any], path: str) -> None:
    """A grouped bar chart of test accuracy per corruption and method, saved to ``path`` (PNG).

    Example:
        >>> plot(run(epochs=2, quick=True), "docs/domain_shift.png")   # doctest: +SKIP
    """
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'fxnorm[examples]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = {"source": "no adaptation", "update_bn": "torch update_bn",
              "update_bn_no_dropout": "update_bn, dropout p=0 (ablation)", "fxnorm": "fxnorm.recalibrate"}
    colors = {"source": "#9e9e9e", "update_bn": "#f28e2b", "update_bn_no_dropout": "#f7c99b", "fxnorm": "#4e79a7"}
    width = 0.2
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    for j, method in enumerate(METHODS):
        xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(rows))]
        values = [100 * r[method] for r in rows]
        bars = ax.bar(xs, values, width, label=labels[method], color=colors[method])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), [r["corruption"].replace("_", "\n") for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    cfg = result["config"]
    stream = "class-sorted" if cfg.get("sorted_stream") else "shuffled"
    ax.set_title(f"Digits {cfg['image_size']}x{cfg['image_size']}: accuracy under shift, BN statistics "
                 f"re-estimated on the unlabeled shifted train split ({stream}, batch {cfg['batch_size']})",
                 fontsize=9)
    ax.legend(loc="upper center", ncol=len(METHODS), fontsize=8, framealpha=0.95)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the result dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--size", type=int, default=16, help="image side after upscaling (default 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="adaptation batch size (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a narrower network (for tests)")
    parser.add_argument("--sorted", action="store_true", help="unlabeled stream ordered by class")
    parser.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    parser.add_argument("--plot", metavar="PATH", help="save a bar chart (PNG, needs matplotlib)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(epochs=args.epochs, size=args.size, batch_size=args.batch_size, seed=args.seed, quick=args.quick,
                 sorted_stream=args.sorted, corruptions=args.corruptions)
    print(format_rows(result))
    t = result["timing"]
    print(f"\ntrain {t['train_s']:.1f} s; adaptation over all corruptions: update_bn {t['update_bn_s']:.2f} s, "
          f"fxnorm {t['fxnorm_s']:.2f} s; total {t['total_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
