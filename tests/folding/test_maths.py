"""Tests of fxnorm.fold_math: every fold is checked against running the unfolded layers."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import rel_err
from fxnorm import FoldError
from fxnorm.folding.maths import (
    bn_scale_shift,
    fold_affine_into_next_linear,
    fold_bn_into_conv,
    fold_bn_into_linear,
    fold_bn_into_next_conv,
    fold_bn_into_next_linear,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUNC = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
FUNCT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MEMFMT = {2: torch.channels_last, 3: torch.channels_last_3d}


def make_bn(dim: int, channels: int, dtype: torch.dtype, gen: torch.Generator, affine: bool = True) -> nn.Module:
    bn = BN[dim](channels, affine=affine).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        bn.running_var.copy_(torch.rand(channels, generator=gen, dtype=dtype) * 1.5 + 0.5)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=gen, dtype=dtype))
            bn.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
    return bn


def scale_shift_of(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def check_conv_then_bn(
    dim: int,
    transposed: bool,
    cin: int,
    cout: int,
    groups: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cls = (CONVT if transposed else CONV)[dim]
    conv = cls(cin, cout, 3, stride=stride, dilation=dilation, groups=groups, bias=bias, padding=1).to(dtype)
    if channels_last:
        conv = conv.to(memory_format=MEMFMT[dim])
    bn = make_bn(dim, cout, dtype, gen)
    x = torch.randn(2, cin, *([6] * dim), generator=gen, dtype=dtype)
    w0 = conv.weight.detach().clone()
    ref = bn(conv(x)).detach()
    scale, shift = scale_shift_of(bn)
    w, b = fold_bn_into_conv(conv.weight, conv.bias, scale, shift, transposed=transposed, groups=groups)
    assert torch.equal(conv.weight, w0), "input weight was modified"
    assert w.shape == conv.weight.shape and w.dtype == dtype and b.dtype == dtype and b.shape == (cout,)
    assert w.stride() == conv.weight.stride()
    if channels_last:
        assert w.is_contiguous(memory_format=MEMFMT[dim])
    kw = dict(stride=stride, dilation=dilation, groups=groups, padding=1)
    out = (FUNCT if transposed else FUNC)[dim](x, w, b, **kw)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("cin,cout,groups", [(3, 4, 1), (4, 6, 2), (6, 6, 3), (6, 3, 3), (3, 6, 3), (4, 2, 2)])
def test_conv_then_bn(dim: int, transposed: bool, cin: int, cout: int, groups: int) -> None:
    check_conv_then_bn(dim, transposed, cin, cout, groups, stride=2 if dim != 3 else 1, dilation=2 if dim == 1 else 1)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_then_bn_bias_dtype(transposed: bool, bias: bool, dtype: torch.dtype) -> None:
    check_conv_then_bn(2, transposed, 4, 6, 2, bias=bias, dtype=dtype)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_then_bn_channels_last(dim: int, transposed: bool, groups: int) -> None:
    check_conv_then_bn(dim, transposed, 4, 6, groups, channels_last=True)


def test_grouped_transposed_where_naive_fold_broadcasts() -> None:
    # ConvTranspose2d(3, 3, groups=3): weight (3, 1, k, k). The naive fold scale.reshape(1, -1, 1, 1) broadcasts
    # silently to (3, 3, k, k); scaling axis 1 by scale[:Cout/groups] uses only scale[0]. Both are wrong.
    check_conv_then_bn(2, True, 3, 3, 3)
    check_conv_then_bn(2, True, 4, 4, 2)  # weight (4, 2, ...): scale[:2] on axis 1 would be shape-valid but wrong
    conv = nn.ConvTranspose2d(4, 4, 3, groups=2)
    scale, shift = torch.arange(1.0, 5.0), torch.zeros(4)
    w, _ = fold_bn_into_conv(conv.weight, None, scale, shift, transposed=True, groups=2)
    ratio = (w / conv.weight)[:, :, 0, 0]
    assert torch.allclose(ratio, torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]))


def test_conv_without_bias_gets_bias_of_weight_dtype() -> None:
    conv = nn.Conv2d(3, 4, 1, bias=False).double()
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)  # float32 scale/shift, float64 weight
    w, b = fold_bn_into_conv(conv.weight, None, scale, shift)
    assert b.dtype == torch.float64 and w.dtype == torch.float64 and b.device == conv.weight.device
    assert torch.allclose(b, shift.double())
    assert b.data_ptr() != shift.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_reduced_precision(dtype: torch.dtype, transposed: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(4, 6, 3, groups=2).to(dtype).to(memory_format=torch.channels_last)
    bn = make_bn(2, 6, dtype, gen)
    scale, shift = scale_shift_of(bn)
    assert scale.dtype == torch.float32 and shift.dtype == torch.float32
    w, b = fold_bn_into_conv(conv.weight, conv.bias, scale, shift, transposed=transposed, groups=2)
    assert w.dtype == dtype and b.dtype == dtype and w.is_contiguous(memory_format=torch.channels_last)
    # float32 reference from the same (reduced-precision) weights and BN parameters
    conv32, bn32 = conv.float(), bn.float()
    x = torch.randn(2, 4, 7, 7, generator=gen)
    ref = bn32(conv32(x)).detach()
    fn = F.conv_transpose2d if transposed else F.conv2d
    assert rel_err(fn(x, w.float(), b.float(), groups=2), ref) < 1e-2


class WeightSizedAllocations(TorchDispatchMode):
    """Counts the new tensors of at least ``numel`` elements that ATen ops return (outputs that share
    storage with an input, such as ``out=`` and in-place results, are not new)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        ptrs = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in ptrs:
                self.count += 1
        return out


@pytest.mark.parametrize("weight_dtype,scale_dtype,copies", [
    (torch.float32, torch.float32, 1),   # the folded weight only
    (torch.float64, torch.float64, 1),
    (torch.float32, torch.float64, 2),   # the folded weight and the float64 copy the maths needs
    (torch.bfloat16, torch.float32, 2),  # the folded weight and the float32 copy the maths needs
])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_folded_weight_is_computed_without_an_extra_copy(weight_dtype, scale_dtype, copies, fmt) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 8, 3, 3, generator=gen).to(weight_dtype).to(memory_format=fmt)
    scale, shift = (torch.rand(16, generator=gen) + 0.5).to(scale_dtype), torch.randn(16, generator=gen)
    before = weight.clone()
    with WeightSizedAllocations(weight.numel()) as mode:
        w, b = fold_bn_into_conv(weight, None, scale, shift)
    assert mode.count == copies
    compute = torch.promote_types(torch.promote_types(weight_dtype, torch.float32), scale_dtype)
    assert torch.equal(w, (weight.to(compute) * scale.to(compute)[:, None, None, None]).to(weight_dtype))
    assert w.dtype == weight_dtype and w.stride() == weight.stride()
    assert torch.equal(weight, before) and w.data_ptr() != weight.data_ptr()  # the input is never written


def test_linear_then_bn() -> None:
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        for has_bias in (False, True):
            lin = nn.Linear(5, 7, bias=has_bias).to(dtype)
            bn = make_bn(1, 7, dtype, gen)
            x = torch.randn(9, 5, generator=gen, dtype=dtype)
            w, b = fold_bn_into_linear(lin.weight, lin.bias, *scale_shift_of(bn))
            assert rel_err(F.linear(x, w, b), bn(lin(x)).detach()) < TOL[dtype]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_then_conv(dim: int, groups: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    conv = nn.Conv2d if dim == 2 else CONV[dim]
    conv = conv(4, 6, 3, stride=2, groups=groups, padding=0).to(dtype)
    if dim >= 2:
        conv = conv.to(memory_format=MEMFMT[dim])
    bn = make_bn(dim, 4, dtype, gen)
    x = torch.randn(2, 4, *([7] * dim), generator=gen, dtype=dtype)
    ref = conv(bn(x)).detach()
    w, b = fold_bn_into_next_conv(conv.weight, conv.bias, *scale_shift_of(bn), groups=groups)
    assert w.stride() == conv.weight.stride() and w.dtype == dtype and b.dtype == dtype
    assert rel_err(FUNC[dim](x, w, b, stride=2, groups=groups), ref) < TOL[dtype]


def test_bn_then_conv_without_bias_and_reflect_padding() -> None:
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False, groups=2).double()
    bn = make_bn(2, 4, torch.float64, gen)
    x = torch.randn(1, 4, 6, 6, generator=gen, dtype=torch.float64)
    w, b = fold_bn_into_next_conv(conv.weight, None, *scale_shift_of(bn), groups=2)
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b, groups=2)
    assert rel_err(out, conv(bn(x)).detach()) < 1e-10


def test_bn_then_linear_and_affine_then_linear() -> None:
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        lin = nn.Linear(6, 3).to(dtype)
        bn = make_bn(1, 6, dtype, gen)
        x = torch.randn(8, 6, generator=gen, dtype=dtype)
        w, b = fold_bn_into_next_linear(lin.weight, lin.bias, *scale_shift_of(bn))
        assert rel_err(F.linear(x, w, b), lin(bn(x)).detach()) < TOL[dtype]

        ln = nn.LayerNorm(6).to(dtype)
        with torch.no_grad():
            ln.weight.copy_(torch.randn(6, generator=gen, dtype=dtype))
            ln.bias.copy_(torch.randn(6, generator=gen, dtype=dtype))
        x3 = torch.randn(2, 4, 6, generator=gen, dtype=dtype)
        ref = lin(ln(x3)).detach()
        plain = F.layer_norm(x3, (6,), eps=ln.eps)
        for gamma, beta in ((ln.weight, ln.bias), (None, ln.bias), (ln.weight, None), (None, None)):
            w, b = fold_affine_into_next_linear(lin.weight, lin.bias, gamma, beta)
            g = torch.ones(6, dtype=dtype) if gamma is None else gamma
            be = torch.zeros(6, dtype=dtype) if beta is None else beta
            expected = lin(plain * g + be).detach()
            assert rel_err(F.linear(plain, w, b), expected) < TOL[dtype]
            assert w.data_ptr() != lin.weight.data_ptr() and b.data_ptr() != lin.bias.data_ptr()
        w, b = fold_affine_into_next_linear(lin.weight, None, ln.weight, ln.bias)
        assert rel_err(F.linear(plain, w, b) + lin.bias, ref) < TOL[dtype]


def test_bn_scale_shift_dtypes_and_defaults() -> None:
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    scale, shift = bn_scale_shift(mean.half(), var.bfloat16(), 1e-5)
    assert scale.dtype == shift.dtype == torch.float32
    scale, shift = bn_scale_shift(mean, var, 1e-5, weight=torch.ones(2, dtype=torch.float64))
    assert scale.dtype == torch.float64
    expected = 1 / torch.sqrt(var.double() + 1e-5)
    assert torch.allclose(scale, expected) and torch.allclose(shift, -mean.double() * expected)


T = dict(transposed=True, groups=2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fold_bn_into_conv(torch.ones(4, 2, 3, 3), None, torch.ones(3), torch.ones(3)), "length 4"),
        # transposed grouped: Cout = 2 * 2 = 4, not weight.shape[1] = 2 nor Cin = 6
        (lambda: fold_bn_into_conv(torch.ones(6, 2, 3), None, torch.ones(2), torch.ones(2), **T), "length 4"),
        (lambda: fold_bn_into_conv(torch.ones(6, 2, 3), None, torch.ones(6), torch.ones(6), **T), "length 4"),
        (lambda: fold_bn_into_conv(torch.ones(5, 2, 3), None, torch.ones(5), torch.ones(5), **T),
         "groups=2 does not divide"),
        (lambda: fold_bn_into_conv(torch.ones(4, 2, 3), None, torch.ones(4), torch.ones(4), groups=0), "positive int"),
        (lambda: fold_bn_into_conv(torch.ones(4, 2), None, torch.ones(4), torch.ones(4)), "dims"),
        (lambda: fold_bn_into_conv(torch.ones(4, 2, 3), torch.ones(3), torch.ones(4), torch.ones(4)), "bias"),
        (lambda: fold_bn_into_conv(torch.ones(4, 2, 3, dtype=torch.int64), None, torch.ones(4), torch.ones(4)),
         "floating"),
        (lambda: fold_bn_into_linear(torch.ones(3, 5), None, torch.ones(5), torch.ones(5)), "out_features"),
        (lambda: fold_bn_into_next_conv(torch.ones(4, 2, 3), None, torch.ones(2), torch.ones(2), groups=2), "length 4"),
        (lambda: fold_bn_into_next_conv(torch.ones(3, 2, 3), None, torch.ones(4), torch.ones(4), groups=2),
         "does not divide"),
        (lambda: fold_bn_into_next_linear(torch.ones(3, 5), None, torch.ones(3), torch.ones(3)), "in_features"),
        (lambda: fold_affine_into_next_linear(torch.ones(3, 5), None, torch.ones(5), torch.ones(4)), "beta"),
        (lambda: bn_scale_shift(torch.zeros(3), torch.ones(4), 1e-5), "running_mean"),
        (lambda: bn_scale_shift(None, None, 1e-5), "running statistics"),
        (lambda: bn_scale_shift(torch.zeros(2), torch.zeros(2), 0.0), "> 0"),
        (lambda: bn_scale_shift(torch.zeros(2), torch.ones(2), -1.0), "eps"),
    ],
)
def test_bad_input_raises_fold_error(call, match: str) -> None:
    with pytest.raises(FoldError, match=match):
        call()


@settings(max_examples=30, deadline=None)
@given(
    dim=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 3]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    stride=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    channels_last=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_conv_then_bn(
    dim: int, transposed: bool, groups: int, cin_g: int, cout_g: int, stride: int,
    dtype: torch.dtype, channels_last: bool, bias: bool, seed: int,
) -> None:
    check_conv_then_bn(
        dim, transposed, cin_g * groups, cout_g * groups, groups, stride=stride, bias=bias, dtype=dtype,
        channels_last=channels_last and dim >= 2, seed=seed,
    )
