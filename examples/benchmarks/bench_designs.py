"""Batch norms left by torch's ``fuse`` and by fxnorm on designs beyond conv -> BN (issue 16), and the
latency of a re-parameterizable block merged vs not.

* Coverage: small float32 models written here, one per design (producers joined by ``torch.cat``,
  a norm before a pooled or flattened classifier head, a Linear -> reshape -> BatchNorm1d token
  model, a TF-"same" padding conv subclass, RepVGG-style blocks), plus a few torchvision models:
  batch norms in the model, left after ``torch.fx.experimental.optimization.fuse``, left after
  ``fxnorm.fold``, left after ``fxnorm.fold(merge_branches=True)``, and fxnorm's relative output
  error (``max|folded - original| / max|original|``, with the merge).
* Latency: a stack of RepVGG-style blocks folded without merging (three convs per block) and with
  ``merge_branches=True`` (one conv per block), timed in turns in the same run (medians); the ratio
  is what the page reports.

Nothing here is a test; tests/test_benchmarks.py checks the script on a tiny configuration.

Example:
    python examples/benchmarks/bench_designs.py --json examples/benchmarks/results/designs.json
    python examples/benchmarks/bench_designs.py --models resnet18 --repeats 5 --size 56
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torch.fx.experimental.optimization import fuse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import zoo  # noqa: E402  (tests/zoo.py: torchvision models with randomized norms, small inputs)
from bench_fold import bn_left, interleaved  # noqa: E402

from fxnorm import FoldReport, fold, report_of  # noqa: E402

TORCHVISION = ["resnet18", "googlenet", "densenet121", "mobilenet_v3_small"]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class InceptionCat(nn.Module):
    """Branches concatenated, one batch norm after the concatenation (Inception-style "BN after cat")."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c // 2, 5, padding=2)
        self.bn = nn.BatchNorm2d(c * 2 + c // 2)
        self.out = nn.Conv2d(c * 2 + c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(torch.cat([self.a(x), self.b(x), self.c(x)], 1))))


class PooledHead(nn.Module):
    """conv -> relu -> BN -> adaptive average pooling -> flatten -> Linear, and a BN -> flatten -> Linear head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Linear(c, 10)
        self.conv2, self.bn2, self.fc2 = nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.bn(F.relu(self.conv(x))), 1), 1))
        return pooled + self.fc2(torch.flatten(self.bn2(F.relu(self.conv2(x))), 1))


class TokenBN(nn.Module):
    """Linear on (N, L, C) tokens, BatchNorm1d over C through a reshape to (N*L, C) and back (LeViT-style)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 16, c)
        self.fc, self.bn = nn.Linear(c, c, bias=False), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(F.unfold(x, 4, stride=4).transpose(1, 2))  # (N, L, 48) patches
        n, length, _ = tokens.shape
        return self.bn(self.fc(tokens).flatten(0, 1)).reshape(n, length, -1)


class SameConv(nn.Conv2d):
    """TF "same" padding for a known input size (EfficientNet's Conv2dStaticSamePadding)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, size: int) -> None:
        super().__init__(cin, cout, k, stride, bias=False)
        pad = max((-(-size // stride) - 1) * stride + k - size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class RepBlock(nn.Module):
    """RepVGG training-time block: relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dense, self.one = conv_bn(cin, cout, 3, stride), conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        return F.relu(y + self.identity(x) if self.identity is not None else y)


def rep_stack(c: int = 32, blocks: int = 4) -> nn.Module:
    return nn.Sequential(RepBlock(3, c, 2), *[RepBlock(c, c) for _ in range(blocks - 1)])


#: name -> (factory, input shape)
DESIGNS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "concat (Inception-style BN after cat)": (InceptionCat, (2, 16, 16, 16)),
    "BN -> pool/flatten -> Linear head": (PooledHead, (2, 3, 32, 32)),
    "Linear -> reshape -> BatchNorm1d": (TokenBN, (2, 3, 32, 32)),
    "TF-same conv subclass -> BN": (lambda: nn.Sequential(SameConv(3, 16, 3, 2, 32), nn.BatchNorm2d(16), nn.ReLU()),
                                    (2, 3, 32, 32)),
    "RepVGG-style blocks": (rep_stack, (2, 3, 32, 32)),
}


def _row(name: str, model: nn.Module, inputs: tuple) -> dict[str, Any]:
    model = zoo.randomize_dormant(model).eval()
    total = bn_left(model)
    try:
        left_fuse: Any = bn_left(fuse(model))
    except Exception as err:  # torch's fuse needs the whole model to trace
        left_fuse = f"{total} (fuse fails: {type(err).__name__})"
    with torch.no_grad():
        ref = model(*inputs)
        plain = fold(model, example_inputs=inputs)
        merged = fold(model, example_inputs=inputs, merge_branches=True)
        err = zoo.rel_err(merged(*inputs), ref)
    report = report_of(merged, FoldReport)
    return {"model": name, "bn_total": total, "bn_left_fuse": left_fuse, "bn_left_fxnorm": bn_left(plain),
            "bn_left_fxnorm_merged": bn_left(merged), "sums_merged": sum(1 for m in report.merged if m.into),
            "rel_err": err}


def coverage_rows(models: list[str]) -> list[dict[str, Any]]:
    rows = [_row(name, factory(), (torch.randn(*shape),)) for name, (factory, shape) in DESIGNS.items()]
    for name in models:
        rows.append(_row(name, zoo.build(name), zoo.example_inputs(name)))
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def latency(size: int, batch: int, repeats: int, channels: int, blocks: int) -> dict[str, Any]:
    """Median latency of the RepVGG-style stack folded, folded and merged, and as trained (same run)."""
    model = zoo.randomize_dormant(rep_stack(channels, blocks)).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        folded = fold(model, example_inputs=(x,))
        merged = fold(model, example_inputs=(x,), merge_branches=True)
        times = interleaved({"eval": lambda: model(x), "folded": lambda: folded(x), "merged": lambda: merged(x)},
                            repeats, "cpu")
        err = zoo.rel_err(merged(x), model(x))
    convs = {k: sum(isinstance(m, nn.Conv2d) for m in v.modules()) for k, v in (("folded", folded), ("merged", merged))}
    return {"blocks": blocks, "channels": channels, "input": [batch, 3, size, size], "repeats": repeats,
            "eval_ms": 1e3 * times["eval"], "folded_ms": 1e3 * times["folded"], "merged_ms": 1e3 * times["merged"],
            "merged/folded": times["merged"] / times["folded"], "merged/eval": times["merged"] / times["eval"],
            "convs_folded": convs["folded"], "convs_merged": convs["merged"], "rel_err": err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=TORCHVISION, help=f"torchvision models (default {TORCHVISION})")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each model (median reported)")
    parser.add_argument("--size", type=int, default=112, help="image size of the latency runs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = coverage_rows(args.models)
    print(tabulate(rows, headers="keys", floatfmt=".2g"))
    timing = latency(args.size, args.batch, args.repeats, args.channels, args.blocks)
    print()
    print(tabulate([timing], headers="keys", floatfmt=".3g"))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}
    print(f"\n{meta}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "latency": timing}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
