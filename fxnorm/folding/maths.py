"""Pure tensor maths for folding batch-norm (or a per-channel affine) into a neighbouring layer.

Nothing here knows about modules or graphs: every function takes tensors and
returns *new* tensors (inputs are never modified in place, results never alias
inputs). Maths is done in float32, or float64 when any tensor involved is
float64, and folded weights are cast back to the weight's dtype, device and
memory format (``channels_last`` / ``channels_last_3d`` included).

Unlike ``torch.nn.utils.fusion`` this handles grouped transposed convolutions,
reduced-precision weights, non-contiguous weights and BN *before* a layer.

Example:
    >>> bn = torch.nn.BatchNorm2d(4).eval()
    >>> conv = torch.nn.Conv2d(3, 4, 3)
    >>> scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    >>> w, b = fold_bn_into_conv(conv.weight, conv.bias, scale, shift)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-4)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FoldError

__all__ = [
    "bn_scale_shift",
    "fold_bn_into_conv",
    "fold_bn_into_linear",
    "fold_bn_into_next_conv",
    "fold_bn_into_next_linear",
    "fold_affine_into_next_linear",
]


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise FoldError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise FoldError(f"{name} must have a floating-point dtype, got {t.dtype}")


def _check_vector(name: str, t: Tensor, length: int, what: str) -> None:
    _check_float(name, t)
    if t.ndim != 1 or t.shape[0] != length:
        raise FoldError(f"{name} must be a 1-D tensor of length {length} ({what}), got shape {tuple(t.shape)}")


def _check_weight(weight: Tensor, ndims: tuple[int, ...], what: str) -> None:
    _check_float("weight", weight)
    if weight.ndim not in ndims:
        wanted = " or ".join(map(str, ndims))
        raise FoldError(f"weight of a {what} must have {wanted} dims, got shape {tuple(weight.shape)}")


def _check_groups(groups: object, channels: int, which: str) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise FoldError(f"groups must be a positive int, got {groups!r}")
    if channels % groups:
        raise FoldError(f"groups={groups} does not divide the {channels} {which} channels of the weight")


def _as(t: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh copy of ``t`` in ``dtype`` on ``like``'s device (never aliases ``t``)."""
    return t.to(device=like.device, dtype=dtype, copy=True)


def _read_as(t: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` on ``like``'s device, to be read only: ``t`` itself when it already is."""
    return t.to(device=like.device, dtype=dtype)


def _new_bias(bias: Tensor | None, scale: Tensor, shift: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``bias * scale + shift`` (``shift`` without a bias) computed in ``dtype``, a new tensor of
    ``like``'s dtype (never aliases an input)."""
    if bias is None:
        b = _as(shift, like, dtype)
    else:
        b = _read_as(bias, like, dtype).mul(scale).add_(_read_as(shift, like, dtype))
    return b.to(like.dtype).contiguous()


def _new_weight(weight: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight * factor`` (factor broadcasts) computed in ``dtype``, returned with weight's dtype and strides.

    One new weight-sized tensor when ``weight`` is already in ``dtype`` (the product is written straight
    into it), plus the one upcast copy the maths needs otherwise (scaled in place, then cast into the
    result). ``weight`` itself is never written: during :func:`fxnorm.fold` it is the user's tensor.
    """
    out = torch.empty_like(weight)  # preserve_format: same strides for dense weights
    if weight.dtype == dtype:
        return torch.mul(weight, factor.to(dtype), out=out)
    return out.copy_(weight.to(dtype, copy=True).mul_(factor))


def _per_channel(factor: Tensor, ndim: int) -> Tensor:
    """Append singleton kernel dims to a (rows,) or (rows, cols) factor so it broadcasts over a weight."""
    return factor.reshape(tuple(factor.shape) + (1,) * (ndim - factor.ndim))


@torch.no_grad()
def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` of an eval-mode BN.

    ``weight`` None means ones, ``bias`` None means zeros (``affine=False``). Computed and returned in
    float64 if any input is float64, else float32, on ``running_var``'s device.

    Example:
        >>> bn_scale_shift(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0]), 0.0, bias=torch.ones(2))
        (tensor([0.5000, 1.0000]), tensor([ 0.5000, -1.0000]))
    """
    if running_mean is None or running_var is None:
        raise FoldError("batch-norm has no running statistics (track_running_stats=False); it cannot be folded")
    _check_float("running_var", running_var)
    if running_var.ndim != 1:
        raise FoldError(f"running_var must be 1-D, got shape {tuple(running_var.shape)}")
    n = running_var.shape[0]
    _check_vector("running_mean", running_mean, n, "number of channels")
    if weight is not None:
        _check_vector("weight", weight, n, "number of channels")
    if bias is not None:
        _check_vector("bias", bias, n, "number of channels")
    eps = float(eps)
    if not eps >= 0.0:
        raise FoldError(f"eps must be >= 0, got {eps}")
    dtype = _compute_dtype(running_mean, running_var, weight, bias)
    var = _read_as(running_var, running_var, dtype) + eps  # a new tensor: every step below writes into it
    if not var.is_meta and bool((var <= 0).any()):  # meta tensors hold no values to check
        raise FoldError("running_var + eps must be > 0 for every channel (got a zero or negative value)")
    scale = var.rsqrt_()
    if weight is not None:
        scale.mul_(_read_as(weight, running_var, dtype))
    shift = _read_as(running_mean, running_var, dtype).neg().mul_(scale)
    if bias is not None:
        shift.add_(_read_as(bias, running_var, dtype))
    return scale, shift


@torch.no_grad()
def fold_bn_into_conv(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y * scale + shift`` applied AFTER a conv into the conv's weight and bias.

    ``weight`` is ``(Cout, Cin/groups, *k)`` for Conv1d/2d/3d and ``(Cin, Cout/groups, *k)`` for
    ConvTranspose1d/2d/3d (``transposed=True``); ``scale``/``shift`` have length ``Cout``. For a grouped
    transposed conv, output channel ``g*(Cout/groups) + j`` lives in ``weight[g*(Cin/groups):(g+1)*(Cin/groups), j]``.
    Returns ``(weight', bias')`` with the weight's dtype, device and memory format; ``bias`` None gives a new bias.

    Example:
        >>> w, b = fold_bn_into_conv(torch.ones(2, 1, 3), None, torch.tensor([2.0, 3.0]), torch.ones(2))
        >>> w[:, 0, 0], b
        (tensor([2., 3.]), tensor([1., 1.]))
    """
    _check_weight(weight, (3, 4, 5), "Conv1d/2d/3d or ConvTranspose1d/2d/3d")
    if transposed:
        _check_groups(groups, weight.shape[0], "input")
        cin_g, cout_g = weight.shape[0] // groups, weight.shape[1]
        cout = cout_g * groups
    else:
        cout = weight.shape[0]
        _check_groups(groups, cout, "output")
    what = f"output channels of the {'transposed ' if transposed else ''}conv, groups={groups}"
    _check_vector("scale", scale, cout, what)
    _check_vector("shift", shift, cout, what)
    if bias is not None:
        _check_vector("bias", bias, cout, what)
    dtype = _compute_dtype(weight, bias, scale, shift)
    s = _read_as(scale, weight, dtype)
    if transposed:
        rows = torch.arange(weight.shape[0], device=weight.device) // cin_g
        idx = rows[:, None] * cout_g + torch.arange(cout_g, device=weight.device)[None, :]
        factor = s[idx]  # (Cin, Cout/groups): the scale of the output channel at weight[r, j]
    else:
        factor = s
    return _new_weight(weight, _per_channel(factor, weight.ndim), dtype), _new_bias(bias, s, shift, weight, dtype)


@torch.no_grad()
def fold_bn_into_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``y * scale + shift`` (e.g. BatchNorm1d) applied AFTER a Linear of weight ``(out, in)``.

    ``scale``/``shift`` must have length ``out``. Returns ``(weight', bias')`` in the weight's dtype.

    Example:
        >>> w, b = fold_bn_into_linear(torch.ones(2, 3), torch.ones(2), torch.tensor([2.0, 3.0]), torch.zeros(2))
        >>> w[:, 0], b
        (tensor([2., 3.]), tensor([2., 3.]))
    """
    _check_weight(weight, (2,), "Linear")
    out = weight.shape[0]
    _check_vector("scale", scale, out, "out_features of the Linear")
    _check_vector("shift", shift, out, "out_features of the Linear")
    if bias is not None:
        _check_vector("bias", bias, out, "out_features of the Linear")
    dtype = _compute_dtype(weight, bias, scale, shift)
    s = _read_as(scale, weight, dtype)
    return _new_weight(weight, s[:, None], dtype), _new_bias(bias, s, shift, weight, dtype)


@torch.no_grad()
def fold_bn_into_next_conv(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold ``x * scale + shift`` applied BEFORE a (non-transposed) Conv1d/2d/3d into that conv.

    ``weight`` is ``(Cout, Cin/groups, *k)``; ``scale``/``shift`` have length ``Cin``. Input channel of
    ``weight[o, i]`` is ``(o // (Cout/groups)) * (Cin/groups) + i``; ``w'[o, i] = w[o, i] * scale[c]`` and
    ``b'[o] = b[o] + sum_{i,k} w[o, i, k] * shift[c]``.

    Exact only if the conv does no *zero* padding (``padding=0``, or a ``reflect``/``replicate``/``circular``
    padding mode): zeros padded after the affine are not ``shift``. The caller must check that.
    Stride and dilation do not matter.

    Example:
        >>> w, b = fold_bn_into_next_conv(torch.ones(1, 2, 3), None, torch.tensor([2.0, 3.0]), torch.ones(2))
        >>> w[0, :, 0], b
        (tensor([2., 3.]), tensor([6.]))
    """
    _check_weight(weight, (3, 4, 5), "Conv1d/2d/3d")
    cout, cin_g = weight.shape[0], weight.shape[1]
    _check_groups(groups, cout, "output")
    cin = cin_g * groups
    what = f"input channels of the conv, groups={groups}"
    _check_vector("scale", scale, cin, what)
    _check_vector("shift", shift, cin, what)
    if bias is not None:
        _check_vector("bias", bias, cout, f"output channels of the conv, groups={groups}")
    dtype = _compute_dtype(weight, bias, scale, shift)
    grp = torch.arange(cout, device=weight.device) // (cout // groups)
    idx = grp[:, None] * cin_g + torch.arange(cin_g, device=weight.device)[None, :]  # (Cout, Cin/groups)
    new_w = _new_weight(weight, _per_channel(_read_as(scale, weight, dtype)[idx], weight.ndim), dtype)
    w = weight.to(dtype)
    b = (w * _per_channel(_read_as(shift, weight, dtype)[idx], weight.ndim)).sum(dim=tuple(range(1, weight.ndim)))
    if bias is not None:
        b.add_(_read_as(bias, weight, dtype))
    return new_w, b.to(weight.dtype).contiguous()


@torch.no_grad()
def fold_affine_into_next_linear(
    weight: Tensor, bias: Tensor | None, gamma: Tensor | None, beta: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Fold ``x * gamma + beta`` over the last dim into the next Linear: ``Linear(gamma*x + beta) == Linear'(x)``.

    ``w' = w * gamma[None, :]`` and ``b' = b + w @ beta``; ``gamma``/``beta`` None mean ones/zeros and have
    length ``in_features``. Typical use: a LayerNorm's elementwise affine folded into the next projection.

    Example:
        >>> w, b = fold_affine_into_next_linear(torch.ones(1, 2), None, torch.tensor([2.0, 3.0]), torch.ones(2))
        >>> w, b
        (tensor([[2., 3.]]), tensor([2.]))
    """
    _check_weight(weight, (2,), "Linear")
    out, inp = weight.shape
    if gamma is not None:
        _check_vector("gamma", gamma, inp, "in_features of the Linear")
    if beta is not None:
        _check_vector("beta", beta, inp, "in_features of the Linear")
    if bias is not None:
        _check_vector("bias", bias, out, "out_features of the Linear")
    dtype = _compute_dtype(weight, bias, gamma, beta)
    w = weight.to(dtype)
    if gamma is None:
        new_w = torch.empty_like(weight).copy_(weight)
    else:
        new_w = _new_weight(weight, _read_as(gamma, weight, dtype)[None, :], dtype)
    b = torch.zeros(out, dtype=dtype, device=weight.device) if bias is None else _as(bias, weight, dtype)
    if beta is not None:
        b = b + w @ _read_as(beta, weight, dtype)
    return new_w, b.to(weight.dtype).contiguous()


@torch.no_grad()
def fold_bn_into_next_linear(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold ``x * scale + shift`` (a BatchNorm1d on ``(N, C)`` input) applied BEFORE a Linear of weight ``(out, C)``.

    Only valid when the normalized dim is the Linear's last (input) dim, i.e. 2-D ``(N, C)`` BN input.

    Example:
        >>> w, b = fold_bn_into_next_linear(torch.ones(1, 2), torch.zeros(1), torch.tensor([2.0, 3.0]), torch.ones(2))
        >>> w, b
        (tensor([[2., 3.]]), tensor([2.]))
    """
    _check_weight(weight, (2,), "Linear")
    _check_vector("scale", scale, weight.shape[1], "in_features of the Linear")
    _check_vector("shift", shift, weight.shape[1], "in_features of the Linear")
    return fold_affine_into_next_linear(weight, bias, scale, shift)
