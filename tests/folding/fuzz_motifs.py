"""Trap motifs for the differential fuzzer (tests/folding/test_fuzzer.py): small models, drawn by
hypothesis, built from the places where folding tools go wrong.

Every builder takes hypothesis's ``draw`` and returns ``(model, inputs, fold_kwargs)``: a float64
model in eval mode (statistics randomized by the caller), inputs that run, and the arguments to pass
to both ``find_norms`` and ``fold`` (``merge_branches`` and ``standalone`` to ``fold`` only).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["MOTIFS"]

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
Draw = Callable[[st.SearchStrategy], Any]


class FunctionalNorm(nn.Module):
    """A batch norm written with F.batch_norm or torch.batch_norm, positional or keyword."""

    def __init__(self, c: int, form: str, affine: bool) -> None:
        super().__init__()
        self.form = form
        self.register_buffer("rm", torch.randn(c, dtype=torch.float64))
        self.register_buffer("rv", torch.rand(c, dtype=torch.float64) + 0.5)
        self.w = nn.Parameter(torch.rand(c, dtype=torch.float64) + 0.5) if affine else None
        self.b = nn.Parameter(torch.randn(c, dtype=torch.float64)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "F":
            return F.batch_norm(x, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-3)
        if self.form == "F-kw":
            return F.batch_norm(x, self.rm, self.rv, weight=self.w, bias=self.b, eps=1e-3)
        return torch.batch_norm(x, self.w, self.b, self.rm, self.rv, False, 0.1, 1e-3, False)


class BNAct(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def _norm(draw: Draw, dim: int, c: int) -> nn.Module:
    form = draw(st.sampled_from(["module", "F", "F-kw", "torch", "subclass", "frozen", "train", "untracked",
                                 "no-affine", "momentum-none"]))
    if form in ("F", "F-kw", "torch"):
        return FunctionalNorm(c, form, draw(st.booleans()))
    if form == "subclass" and dim == 2:
        return BNAct(c)
    if form == "frozen" and dim == 2:
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(c)
    kwargs = {"untracked": {"track_running_stats": False}, "no-affine": {"affine": False},
              "momentum-none": {"momentum": None}}.get(form, {})
    norm = BN[dim](c, **kwargs)
    norm.fuzz_train = form == "train"  # the fuzzer puts it back in training mode after model.eval()
    return norm


class Chain(nn.Module):
    """layer -> norm (-> activation), the layer maybe called again, its output maybe returned too."""

    def __init__(self, layer: nn.Module, norm: nn.Module, act: str, extra: str) -> None:
        super().__init__()
        self.layer, self.norm, self.act, self.extra = layer, norm, act, extra

    def forward(self, x: torch.Tensor) -> Any:
        y = self.layer(x)
        if self.extra == "relu_":
            y.relu_()
        elif self.extra == "iadd":
            y += 1.0
        z = self.norm(y)
        if self.act == "relu":
            z = torch.relu(z)
        elif self.act == "relu_":
            z = z.relu_()
        if self.extra == "returned":
            return z, y
        if self.extra == "twice":
            return z + self.norm(self.layer(x * 0.5))
        if self.extra == "weight-read":
            return z * getattr(self.layer, "weight").mean()
        if self.extra == "stats-read":
            return z + self.norm.running_mean.mean() if hasattr(self.norm, "running_mean") else z
        return z


def conv_norm(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    dim = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    if transposed:
        layer: nn.Module = CONVT[dim](cin, cout, 3, stride=draw(st.integers(1, 2)), padding=padding, groups=groups,
                                      bias=draw(st.booleans()))
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if padding else "zeros"
        layer = CONV[dim](cin, cout, 3, padding=padding, padding_mode=mode, groups=groups, bias=draw(st.booleans()),
                          dilation=draw(st.integers(1, 2)))
    model = Chain(layer, _norm(draw, dim, cout), draw(st.sampled_from(["none", "relu", "relu_"])),
                  draw(st.sampled_from(["none", "none", "returned", "twice", "weight-read", "stats-read", "relu_",
                                        "iadd"])))
    batched = draw(st.booleans()) or dim == 3
    x = torch.randn(*((2,) if batched else ()), cin, *([6] * dim), dtype=torch.float64)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class PreNorm(nn.Module):
    """norm -> conv/linear, the norm's input maybe written in place afterwards or also used."""

    def __init__(self, norm: nn.Module, layer: nn.Module, extra: str) -> None:
        super().__init__()
        self.norm, self.layer, self.extra = norm, layer, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        if self.extra == "iadd":
            x += 1.0
        elif self.extra == "add_":
            x.add_(1.0)
        out = self.layer(z)
        if self.extra == "residual":
            out = out + x.mean()
        return out


def norm_layer(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    dim = draw(st.sampled_from([0, 1, 2]))  # 0: Linear
    c, out = 4, 3
    if dim == 0:
        layer: nn.Module = nn.Linear(c, out, bias=draw(st.booleans()))
        shape = draw(st.sampled_from([(5, c), (2, c, 6)]))  # (N, C) folds; (N, C, L) is not Linear's features
        norm = BN[1](c) if len(shape) == 3 or draw(st.booleans()) else FunctionalNorm(c, "F", True)
    else:
        padding = draw(st.sampled_from([0, 1, "same"]))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate"]))
        layer = CONV[dim](c, out, 3, padding=padding, padding_mode=mode, groups=1, bias=draw(st.booleans()))
        shape = (2, c, *([7] * dim))
        norm = _norm(draw, dim, c)
    model = PreNorm(norm, layer, draw(st.sampled_from(["none", "none", "iadd", "add_", "residual"])))
    x = torch.randn(*shape, dtype=torch.float64)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class Reshaped(nn.Module):
    """Linear (or conv) -> a reshaping op -> BatchNorm1d (-> back)."""

    def __init__(self, op: str, c: int) -> None:
        super().__init__()
        self.op = op
        self.fc = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)  # x: (N, L, C)
        if self.op == "flatten":
            return self.bn(y.flatten(0, 1))
        if self.op == "flatten-end":
            return self.bn(y.flatten(start_dim=1, end_dim=2))
        if self.op == "view":
            return self.bn(y.view(-1, y.shape[-1]))
        if self.op == "transpose":
            return self.bn(y.transpose(1, 2)).transpose(1, 2)
        if self.op == "permute":
            return self.bn(y.permute(0, 2, 1))
        if self.op == "chunk":
            return self.bn(y.chunk(2, dim=1)[0].reshape(-1, y.shape[-1]))
        return self.bn(y[:, 0])  # slice


def reshaped(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    c = draw(st.sampled_from([3, 4]))
    op = draw(st.sampled_from(["flatten", "flatten-end", "view", "transpose", "permute", "chunk", "slice"]))
    length = c if op in ("flatten-end",) else 4
    shape = (2, length, c) if op != "flatten-end" else (2, 2, 2, c)
    model = Reshaped(op, c)
    if op == "flatten-end":
        model.bn = nn.BatchNorm1d(4)
    x = torch.randn(*shape, dtype=torch.float64)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class Shared(nn.Module):
    """Layers and norms shared between sites, registered twice, held outside the module tree."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv_a, self.conv_b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        if case == "tied":
            self.conv_b.weight = self.conv_a.weight
        if case == "alias":
            self.again = self.bn_a
        if case == "listed":
            self.norms = [self.bn_b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.case == "conv-twice":
            return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_a(x + 1))
        if self.case == "bn-twice":
            return self.bn_a(self.conv_a(x)) + self.bn_a(self.conv_b(x))
        if self.case == "bn-twice-one-bad":
            return self.bn_a(self.conv_a(x)) + self.bn_a(torch.relu(x))
        if self.case == "functional-shared":
            return self.bn_a(self.conv_a(x)) + F.conv2d(x, self.conv_a.weight)
        if self.case == "listed":
            return self.norms[0](self.conv_b(x))
        return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))


def shared(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    case = draw(st.sampled_from(["conv-twice", "bn-twice", "bn-twice-one-bad", "functional-shared", "tied", "alias",
                                 "listed"]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    return Shared(case), (x,), {}


class Hooked(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1))
        self.bn, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        target = {"conv": self.inner[0], "bn": self.bn, "boundary": self.inner, "consumer": self.conv2}[where]
        target.register_forward_hook(lambda module, args, out: out * 1.5)  # a hook that changes the value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.inner(x))))


def hooked(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    return Hooked(draw(st.sampled_from(["conv", "bn", "boundary", "consumer"]))), (x,), {}


class Glue(nn.Module):
    """A traced body inside untraced glue that may also call the body's layers itself."""

    def __init__(self, eager_call: str) -> None:
        super().__init__()
        self.eager_call = eager_call
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.tail = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if float(y.sum()) > -1e30:  # data-dependent: the glue stays eager
            y = self.tail(y)
        if self.eager_call == "conv":
            y = y + self.body[0](x)[:, :2]
        elif self.eager_call == "bn":
            y = y + self.tail[0](torch.ones(2, 4, 4, 4, dtype=x.dtype))[:, :2]
        return y


def glue(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    return Glue(draw(st.sampled_from(["none", "conv", "bn"]))), (x,), {"example_inputs": (x,)}


class Residual(nn.Module):
    def __init__(self, body: nn.Module, inplace: bool) -> None:
        super().__init__()
        self.body, self.inplace = body, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.inplace:
            y += x
            return y
        return x + y


class Concat(nn.Module):
    """Two convs concatenated, then a norm over all channels (each producer takes its slice)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c - c // 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


def _block(draw: Draw, c: int) -> nn.Module:
    kind = draw(st.sampled_from(["conv-bn", "bn-conv", "conv", "relu", "relu-inplace", "residual", "concat",
                                 "pool", "bn", "bnact", "dropout"]))
    if kind == "conv-bn":
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=draw(st.integers(0, 1)) * 1 or "same",
                                       groups=draw(st.sampled_from([1, c])), bias=draw(st.booleans())), _norm(draw, 2, c))
    if kind == "bn-conv":
        return nn.Sequential(_norm(draw, 2, c), nn.Conv2d(c, c, draw(st.sampled_from([1, 3])),
                                                          padding=draw(st.sampled_from([0, "same"])),
                                                          padding_mode=draw(st.sampled_from(["zeros", "reflect"]))))
    if kind == "residual":
        return Residual(_block(draw, c), draw(st.booleans()))
    if kind == "concat":
        return Concat(c)
    if kind == "bnact":
        return BNAct(c)
    return {"conv": nn.Conv2d(c, c, 1), "relu": nn.ReLU(), "relu-inplace": nn.ReLU(inplace=True),
            "pool": nn.AvgPool2d(3, 1, 1), "bn": _norm(draw, 2, c), "dropout": nn.Dropout(0.5)}[kind]


def stack(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    c = draw(st.sampled_from([2, 4]))
    blocks = [_block(draw, c) for _ in range(draw(st.integers(2, 5)))]
    x = torch.randn(2, c, 5, 5, dtype=torch.float64)
    return nn.Sequential(*blocks), (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class Concatenated(nn.Module):
    """Producers joined by torch.cat, then a norm: along the channel dim or not, a producer read
    again, one producer called twice, a producer that is not a layer."""

    def __init__(self, parts: list[nn.Module], channels: int, dim: int, trap: str, dims: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bn = BN[max(dims, 1)](channels) if dims else nn.BatchNorm1d(channels)
        self.dim, self.trap = dim, trap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [part(x) for part in self.parts]
        if self.trap == "twice":
            outs.append(self.parts[0](x * 2))
        y = self.bn(torch.cat(outs, dim=self.dim))
        return y + outs[0].sum() if self.trap == "reread" else y


def concat(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    dims = draw(st.sampled_from([0, 1, 2]))  # 0: Linear producers
    cin = 2
    widths = draw(st.lists(st.integers(1, 3), min_size=2, max_size=3))
    parts: list[nn.Module] = []
    for w in widths:
        kind = draw(st.sampled_from(["layer", "layer", "transposed", "same", "relu"])) if dims else "layer"
        if kind == "relu":
            parts.append(nn.Sequential(CONV[dims](cin, w, 1), nn.ReLU()))
        elif kind == "transposed":
            parts.append(CONVT[dims](cin, w, 2, stride=2, padding=0, bias=draw(st.booleans())))
        elif kind == "same" and dims == 2:
            parts.append(SameConv(cin, w, 3, stride=2, bias=draw(st.booleans())))
        else:
            layer = nn.Linear(cin, w) if not dims else CONV[dims](cin, w, 3, padding=1, stride=2)
            parts.append(layer)
    trap = draw(st.sampled_from(["none", "none", "reread", "twice"]))
    channels = sum(widths) + (widths[0] if trap == "twice" else 0)
    dim = draw(st.sampled_from([1, 1, -1, 0]))
    shape = (2, cin, *([6] * dims)) if dims else draw(st.sampled_from([(5, cin), (5, 3, cin)]))
    model = Concatenated(parts, channels, dim, trap, dims)
    x = torch.randn(*shape, dtype=torch.float64)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class SameConv(nn.Conv2d):
    """TF "same" padding for a known input size, then an unpadded functional conv of its own weight."""

    def __init__(self, *args: Any, size: int = 6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        (k, _), (s, _) = self.kernel_size, self.stride
        pad = max((-(-size // s) - 1) * s + k - size, 0)
        self.pad = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class OwnForward(nn.Conv2d):
    """A conv subclass whose forward computes its weight, reads it again, or calls the conv twice."""

    def __init__(self, c: int, trap: str) -> None:
        super().__init__(c, c, 3, padding=1, bias=trap != "no-bias")
        self.trap = trap
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.5).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trap == "masked":
            return F.conv2d(x, self.weight * self.mask, self.bias, padding=1)
        if self.trap == "binary":
            return F.conv2d(x, torch.sign(self.weight), self.bias, padding=1)
        if self.trap == "reads":
            return F.conv2d(x, self.weight, self.bias, padding=1) * self.weight.mean()
        if self.trap == "twice":
            return F.conv2d(F.conv2d(x, self.weight, None, padding=1), self.weight, self.bias, padding=1)
        if self.trap == "bias-none":
            return F.conv2d(x, self.weight, None, padding=1)
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, padding=1)


def own_layer(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    c = 3
    if draw(st.booleans()):
        layer: nn.Module = SameConv(c, c, 3, stride=draw(st.integers(1, 2)), bias=draw(st.booleans()))
    else:
        layer = OwnForward(c, draw(st.sampled_from(["pad", "no-bias", "masked", "binary", "reads", "twice",
                                                    "bias-none"])))
    model = Chain(layer, _norm(draw, 2, c), draw(st.sampled_from(["none", "relu"])),
                  draw(st.sampled_from(["none", "none", "returned", "twice", "weight-read"])))
    x = torch.randn(2, c, 6, 6, dtype=torch.float64)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class Head(nn.Module):
    """norm -> pooling -> flatten -> Linear: a pooling that averages, counts padding, divides by an
    override or takes maxima; a flatten that keeps or reorders the channels."""

    def __init__(self, norm: nn.Module, pool: nn.Module, flatten: str, features: int) -> None:
        super().__init__()
        self.norm, self.pool, self.flatten = norm, pool, flatten
        self.fc = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.norm(x))
        if self.flatten == "view":
            y = y.view(y.size(0), -1)
        elif self.flatten == "permute":
            y = y.permute(0, 2, 3, 1).flatten(1)
        elif self.flatten == "mean":
            y = y.mean((2, 3))
        else:
            y = y.flatten(1)
        return self.fc(y)


def head(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    c = 3
    pool = draw(st.sampled_from(["none", "adaptive", "adaptive2", "avg", "avg-pad", "avg-pad-nocount",
                                 "avg-divisor", "max", "adaptive-max"]))
    module = {"none": nn.Identity(), "adaptive": nn.AdaptiveAvgPool2d(1), "adaptive2": nn.AdaptiveAvgPool2d(2),
              "avg": nn.AvgPool2d(2), "avg-pad": nn.AvgPool2d(3, 2, 1),
              "avg-pad-nocount": nn.AvgPool2d(3, 2, 1, count_include_pad=False),
              "avg-divisor": nn.AvgPool2d(2, divisor_override=3), "max": nn.MaxPool2d(2),
              "adaptive-max": nn.AdaptiveMaxPool2d(1)}[pool]
    x = torch.randn(2, c, 6, 6, dtype=torch.float64)
    flatten = draw(st.sampled_from(["flatten", "view", "permute", "mean"]))
    with torch.no_grad():
        features = int(module(x).flatten(1).shape[1]) if flatten != "mean" else c
    if draw(st.booleans()):
        norm: nn.Module = _norm(draw, 2, c)
    else:  # signed scales: max pooling must refuse
        norm = FunctionalNorm(c, "F", True)
        with torch.no_grad():
            norm.w.copy_(torch.randn(c, dtype=torch.float64))  # type: ignore[union-attr]
    model = Head(norm, module, flatten, features)
    return model, (x,), {"example_inputs": (x,)} if draw(st.booleans()) else {}


class Branches(nn.Module):
    """Parallel conv(-norm) branches of one input summed (RepVGG-style), for merge_branches=True: kernel
    sizes, paddings, dilations, strides and groups drawn; an identity branch or not; traps between the
    input and the sum."""

    def __init__(self, convs: list[nn.Module], identity: nn.Module | None, trap: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.identity, self.trap = identity, trap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x * 2 if self.trap == "inputs" and i == 1 else x) for i, conv in enumerate(self.convs)]
        if self.trap == "relu":
            outs[-1] = torch.relu(outs[-1])
        y = outs[0]
        for out in outs[1:]:
            y = y + out
        if self.identity is not None:
            y = y + self.identity(x)
        elif self.trap == "input":
            y = y + x
        if self.trap == "iadd":
            x += y
            return x
        return y * 2 + outs[0].mean() if self.trap == "reread" else torch.relu(y)


def branches(draw: Draw) -> tuple[nn.Module, tuple, dict]:
    c = 4
    out = draw(st.sampled_from([4, 4, 8]))
    stride, groups = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 2]))
    convs: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3, 3, 5]))
        dilation = draw(st.sampled_from([1] * 5 + [2]))
        mode = draw(st.sampled_from(["zeros"] * 5 + ["reflect"])) if k > 1 else "zeros"
        conv = nn.Conv2d(c, out, k, stride, k // 2 * dilation, dilation=dilation, groups=groups,
                         bias=draw(st.booleans()), padding_mode=mode)
        norm = nn.BatchNorm2d(out) if draw(st.sampled_from([True, True, False])) else _norm(draw, 2, out)
        convs.append(nn.Sequential(conv, norm) if draw(st.sampled_from([True, True, False])) else conv)
    if draw(st.sampled_from([False] * 5 + [True])) and len(convs) > 1:
        convs[1] = convs[0]  # one branch module registered and called twice
    identity = draw(st.sampled_from(["none", "bn", "bn", "module", "input", "other"]))
    if out != c or stride != 1:
        identity = draw(st.sampled_from(["none"] * 9 + ["bn"]))  # an identity branch would not run: rarely drawn
    trap = draw(st.sampled_from(["none"] * 6 + ["relu", "reread", "inputs", "iadd", "input", "hook"]))
    module = {"bn": nn.BatchNorm2d(c), "other": _norm(draw, 2, c), "module": nn.Identity()}.get(identity)
    if trap == "hook":
        convs[-1].register_forward_hook(lambda m, i, o: None)
    model = Branches(convs, module, trap if identity != "input" else "input")
    x = torch.randn(2, c, 7, 7, dtype=torch.float64)
    kwargs: dict = {"merge_branches": True, "standalone": draw(st.sampled_from(["keep", "affine"]))}
    if draw(st.booleans()):
        kwargs["example_inputs"] = (x,)
    return model, (x,), kwargs


#: Every motif, by name.
MOTIFS: dict[str, Callable[[Draw], tuple[nn.Module, tuple, dict]]] = {
    "conv_norm": conv_norm, "norm_layer": norm_layer, "reshaped": reshaped, "shared": shared, "hooked": hooked,
    "glue": glue, "stack": stack, "concat": concat, "own_layer": own_layer, "head": head,
    "branches": branches,
}
