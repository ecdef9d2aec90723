"""Helpers shared by the tests (``tests/`` is on ``sys.path``: ``from helpers import rel_err``).

- :func:`rel_err`, :func:`flatten_outputs`: compare two (nested) outputs in float64;
- :func:`randomize_norms`: random statistics and affine parameters, so that no fold or reset is an
  identity;
- :func:`float64_moments`: the float64 reference of a norm's population statistics;
- :func:`one_thread`: run a block with one intra-op thread (a fixture of the same name is in
  ``conftest.py``);
- :func:`model_snapshot`, :func:`assert_model_unchanged`: everything a pass may not change in a
  model (values, objects, attributes, hooks, modes, classes, children), compared bitwise;
- :func:`capture_norm_inputs`: record what every norm module receives (forward pre-hooks).

Example:
    >>> import torch
    >>> mean, var, n = float64_moments([torch.zeros(3, 2), torch.full((1, 2), 4.0)])
    >>> mean.tolist(), var.tolist(), n
    ([1.0, 1.0], [3.0, 3.0], 4)
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["rel_err", "flatten_outputs", "randomize_norms", "float64_moments", "one_thread", "model_snapshot",
           "assert_model_unchanged", "capture_norm_inputs", "STAT_BUFFERS", "fold_exactly"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block (small inputs: faster, and on a loaded two-core machine
    two threads spin-wait on each other; observed: 100x slower forwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def float64_moments(batches: Sequence[torch.Tensor], channel_dim: int = 1,
                    unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, variance (biased unless ``unbiased``) and count of every element of
    ``batches``, in float64 on the CPU, straight from the data: the reference for recalibration."""
    flat = [b.detach().double().cpu().movedim(channel_dim, 0).reshape(b.shape[channel_dim], -1) for b in batches]
    data = torch.cat(flat, dim=1)
    return data.mean(dim=1), data.var(dim=1, correction=1 if unbiased else 0), data.shape[1]


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every normalization layer random statistics and affine parameters (in place).

    Modules with running stats (BatchNorm*, SyncBatchNorm, FrozenBatchNorm2d, tracked InstanceNorm):
    ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2)``, ``weight ~ U(0.5, 1.5)``,
    ``bias ~ N(0, 0.2)``, ``num_batches_tracked = 10``. LayerNorm / GroupNorm / RMSNorm / untracked
    InstanceNorm: affine parameters drawn the same way. Values are drawn on the CPU in float64 from
    one seeded generator, module by module in ``named_modules`` order, then cast to each tensor's dtype
    and device, so the same seed gives the same model anywhere.

    Example:
        >>> bn = randomize_norms(nn.BatchNorm2d(4))
        >>> bool((bn.running_var >= 0.5).all()), int(bn.num_batches_tracked)
        (True, 10)
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, kind: str) -> None:
        shape = t.shape
        if kind == "mean":
            v = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        elif kind == "var":
            v = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        elif kind == "weight":
            v = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            v = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
        t.copy_(v.to(dtype=t.dtype))

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    extra: tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    # a model holding a FrozenBatchNorm2d imported torchvision (not imported here: spawned test processes start faster)
    misc = sys.modules.get("torchvision.ops.misc")
    frozen: tuple[type, ...] = (misc.FrozenBatchNorm2d,) if misc is not None else ()
    for module in model.modules():
        if not isinstance(module, norm_types + extra + frozen):
            continue
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            draw(mean, "mean")
            draw(var, "var")
        nbt = getattr(module, "num_batches_tracked", None)
        if isinstance(nbt, torch.Tensor):
            nbt.fill_(10)
        for attr, kind in (("weight", "weight"), ("bias", "bias")):
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor):
                draw(t, kind)
    return model


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a nested output (tuples, lists, dicts, namedtuples), in a deterministic order
    (dict keys in insertion order).

    Example:
        >>> [t.item() for t in flatten_outputs({"a": torch.tensor(1), "b": [torch.tensor(2), None]})]
        [1, 2]
    """
    found: list[torch.Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(out)
    return found


def rel_err(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` over all tensors of two outputs (float64; ``b`` is the reference).

    Raises ValueError when the outputs do not have the same structure and shapes.

    Example:
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    xs, ys = flatten_outputs(a), flatten_outputs(b)
    if len(xs) != len(ys):
        raise ValueError(f"outputs differ in structure: {len(xs)} vs {len(ys)} tensors")
    diff, ref = 0.0, 0.0
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        x64, y64 = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        diff = max(diff, float((x64 - y64).abs().max()))
        ref = max(ref, float(y64.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / ref if ref > 0 else math.inf


#: The buffers recalibration writes.
STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def _attribute(value: Any) -> Any:
    """A comparable record of one module attribute (tensors cloned, containers of hooks copied)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value, value.detach().clone())
    if isinstance(value, dict):
        return ("dict", value, [(k, v, v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                for k, v in value.items()])
    if isinstance(value, (list, tuple, set)):
        return ("container", value, [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in value])
    return ("value", value, None)


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything of ``model`` a pass may not change, for :func:`assert_model_unchanged`: every
    module's class, identity, training flag and ``__dict__`` (parameters, buffers and children as
    objects and values, every hook dict, every other attribute), the global module hooks and the
    torch-function mode stack.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> snap = model_snapshot(m)
        >>> assert_model_unchanged(m, snap)
        >>> _ = m[0].register_forward_hook(lambda *a: None)
        >>> assert_model_unchanged(m, snap)
        Traceback (most recent call last):
        ...
        AssertionError: 0: attribute _forward_hooks changed
    """
    from torch.nn.modules import module as module_mod

    modules = {name: (m, type(m), {k: _attribute(v) for k, v in m.__dict__.items()})
               for name, m in model.named_modules(remove_duplicate=False)}
    hooks = {name: dict(getattr(module_mod, name, {})) for name in _GLOBAL_HOOKS}
    return {"modules": modules, "global_hooks": hooks, "modes": torch._C._len_torch_function_stack()}


def _same(before: tuple, now: Any, skip: set[str]) -> bool:
    kind, obj, copied = before
    if kind == "container":  # compared by value: a model's forward may rebuild a list (torchvision's cell_anchors)
        return type(now) is type(obj) and len(now) == len(copied) and all(
            (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b))
            or (not isinstance(b, torch.Tensor) and (a is b or _equal(a, b))) for a, b in zip(now, copied))
    if now is not obj and not (kind == "value" and _equal(now, obj)):
        return False
    if kind == "tensor":
        return now.dtype == copied.dtype and torch.equal(now, copied)
    if kind == "dict":
        items = list(now.items())
        return len(items) == len(copied) and all(
            k == k2 and v is v2 and (k in skip or not isinstance(v, torch.Tensor) or torch.equal(v, c))
            for (k, v), (k2, v2, c) in zip(items, copied))
    return True


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def assert_model_unchanged(model: nn.Module, snap: dict[str, Any], *, except_buffers: dict[str, tuple[str, ...]] | None
                           = None) -> None:
    """``model`` is exactly as :func:`model_snapshot` recorded it; ``except_buffers`` maps module names
    to buffer names whose *values* may differ (the objects may not)."""
    from torch.nn.modules import module as module_mod

    now = dict(model.named_modules(remove_duplicate=False))
    assert list(now) == list(snap["modules"]), "the module tree changed"
    for name, (module, cls, attributes) in snap["modules"].items():
        assert now[name] is module and type(module) is cls, f"{name}: module replaced"
        assert list(module.__dict__) == list(attributes), f"{name}: attributes added or removed"
        skip = set((except_buffers or {}).get(name, ()))
        for key, before in attributes.items():
            assert _same(before, module.__dict__[key], skip if key == "_buffers" else set()), \
                f"{name}: attribute {key} changed"
    for key, hooks in snap["global_hooks"].items():
        assert dict(getattr(module_mod, key, {})) == hooks, f"global {key} changed"
    assert torch._C._len_torch_function_stack() == snap["modes"], "a torch function mode was left on the stack"


@contextlib.contextmanager
def capture_norm_inputs(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the block, every input of the norm modules ``names`` (default: every module with a
    ``running_mean`` buffer) is recorded, cloned, by qualified name; the hooks go away after it.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with capture_norm_inputs(nn.Sequential(bn)) as seen:
        ...     _ = bn(torch.ones(3, 2))
        >>> {k: [tuple(x.shape) for x in v] for k, v in seen.items()}
        {'0': [(3, 2)]}
    """
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if (names is None and isinstance(getattr(m, "running_mean", None), torch.Tensor)) or (names and name in names):
            seen[name] = []
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen[name].append(args[0].detach().clone())))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def fold_exactly(model: nn.Module, x: torch.Tensor) -> Any:
    """Fold ``model`` (float64, eval) with ``example_inputs=(x,)``: the output matches to < 1e-9
    relative and ``find_norms`` predicted every fold; the :class:`~fxnorm.FoldReport`."""
    from fxnorm import FoldReport, find_norms, fold, report_of

    x = x.double()
    with torch.no_grad():
        ref = model(x)
        predicted = {s.name: (s.fold, s.fold_into) for s in find_norms(model, example_inputs=(x,)) if s.fold}
        folded = fold(model, example_inputs=(x,))
        err = rel_err(folded(x), ref)
    assert err < 1e-9, f"relative error {err}"
    report = report_of(folded, FoldReport)
    assert predicted == {f.name: (f.mode, f.into) for f in report.folded}
    return report
