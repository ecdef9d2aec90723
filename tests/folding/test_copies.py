"""fxnorm.folding.copies: the fold's work copy is what copy.deepcopy makes, conv/linear tensors aside."""

import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

from fxnorm import fold
from fxnorm.folding.copies import copy_sharing_layers, unshare


class _OwnDeepcopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = _OwnDeepcopy()
        new.copies = self.copies + 1
        return new


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.tied = nn.Conv2d(2, 2, 1)
        self.tied.weight = self.conv.weight
        self.again = self.bn  # the same module under two names
        self.held = [self.bn, {"c": self.conv}]  # and outside the module tree
        self.own = _OwnDeepcopy()
        self.table = OrderedDict(a=1)
        self.empty: OrderedDict = OrderedDict()
        self.bn.register_forward_hook(lambda m, i, o: None)


def _shape(m: nn.Module, root: nn.Module) -> list:
    """Everything about a module tree but object identities: types, attribute names and values
    (modules and tensors by the path/structure they have inside ``root``)."""
    paths = {id(x): n for n, x in root.named_modules(remove_duplicate=False)}
    out = []
    for name, module in m.named_modules(remove_duplicate=False):
        out.append((name, type(module), list(module.__dict__)))
        for key, value in module.__dict__.items():
            if isinstance(value, (bool, int, float, str, type(None))):
                out.append((name, key, value))
            elif isinstance(value, dict):
                out.append((name, key, type(value), len(value)))
    for key, t in m.state_dict(keep_vars=True).items():
        out.append((key, type(t), t.dtype, tuple(t.shape), t.requires_grad, t.detach().clone()))
    out.append([paths.get(id(x)) for x in root.held[:1]] if hasattr(root, "held") else None)
    return out


def _equal(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and x and isinstance(x[-1], torch.Tensor):
            if x[:-1] != y[:-1] or not torch.equal(x[-1], y[-1]):
                return False
        elif x != y:
            return False
    return True


def _check_like_deepcopy(model: nn.Module) -> None:
    shared: dict = {}
    ours = copy_sharing_layers(model, shared)
    theirs = copy.deepcopy(model)
    assert _equal(_shape(ours, ours), _shape(theirs, theirs))
    ours_ids = {id(x) for x in ours.modules()} | {id(t) for t in ours.state_dict(keep_vars=True).values()}
    model_ids = {id(x) for x in model.modules()} | {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert ours_ids & model_ids == set(shared) & ours_ids  # only conv/linear tensors are shared
    unshare(ours, shared)
    ours_ids = {id(x) for x in ours.modules()} | {id(t) for t in ours.state_dict(keep_vars=True).values()}
    assert not ours_ids & model_ids


def test_structure_sharing_and_ties_like_deepcopy():
    model = _Model()
    ours = copy_sharing_layers(model, {})
    assert ours.again is ours.bn and ours.held[0] is ours.bn and ours.held[1]["c"] is ours.conv
    assert ours.tied.weight is ours.conv.weight
    assert ours.own.copies == 1  # its own __deepcopy__ ran
    assert list(ours.bn._forward_hooks) == list(model.bn._forward_hooks)
    assert ours.empty is not model.empty and ours.table == model.table and ours.table is not model.table
    assert ours.bn._forward_pre_hooks is not model.bn._forward_pre_hooks
    _check_like_deepcopy(model)


def test_detection_model_like_deepcopy():
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    _check_like_deepcopy(model)


class _Tensors(nn.Module):
    """Tensors copied on each of the copy's paths: views of one storage, a buffer that requires grad,
    strided and channels-last buffers, a tensor with attributes, a Parameter with attributes, a conj view."""

    def __init__(self):
        super().__init__()
        flat = torch.randn(10)
        self.register_buffer("head", flat[:4])
        self.register_buffer("tail", flat[4:].view(2, 3))
        self.register_buffer("grad", torch.randn(3, requires_grad=True))
        self.register_buffer("strided", torch.randn(4, 4)[:, ::2])
        self.register_buffer("odd_strides", torch.empty_strided((1, 4), (100, 1)).fill_(2.0))
        self.register_buffer("channels_last", torch.randn(1, 2, 3, 3).to(memory_format=torch.channels_last))
        self.register_buffer("conj", torch.randn(3, dtype=torch.complex64).conj())
        self.register_buffer("empty", torch.empty(0))
        tagged = torch.randn(2)
        tagged.note = [1, 2]
        self.register_buffer("tagged", tagged)
        self.p = nn.Parameter(torch.randn(3, 4).t())
        self.p.note = "dropped by Parameter.__deepcopy__"
        self.held = {"p": self.p, "tail": self.tail, 3: "three"}


def _tensor_facts(m: nn.Module) -> dict:
    storages = {}
    out = {}
    for name, t in m.state_dict(keep_vars=True).items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = (type(t), t.dtype, t.shape, t.stride(), t.storage_offset(), t.untyped_storage().nbytes(),
                     t.requires_grad, t.is_leaf, t.is_conj(), dict(t.__dict__), storages.setdefault(ptr, len(storages)))
    return out


def test_tensors_like_deepcopy():
    model = _Tensors()
    ours, theirs = copy_sharing_layers(model, {}), copy.deepcopy(model)
    assert _tensor_facts(ours) == _tensor_facts(theirs)
    for name, t in ours.state_dict(keep_vars=True).items():
        assert torch.equal(t, theirs.state_dict(keep_vars=True)[name])
    assert ours.tail.untyped_storage().data_ptr() == ours.head.untyped_storage().data_ptr()  # one storage, copied once
    assert ours.held["p"] is ours.p and ours.held["tail"] is ours.tail
    model_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not model_ptrs & {t.untyped_storage().data_ptr() for t in ours.state_dict().values() if t.numel()}


class _HoldsWeights(nn.Module):
    """Keeps references to layer weights besides the layers (lists, dicts, tuples), as wrappers and
    weight-tying helpers do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.held = [self.head.weight]
        self.by_name = {"conv": self.conv.weight, "nested": [(self.head.bias, 1)]}
        self.pair = (self.conv.bias, "label")

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_weights_held_besides_the_layers_are_copied_too():
    model = _HoldsWeights().eval()
    model.bn.running_mean.uniform_(-1, 1)
    originals = {id(t) for t in model.parameters()}
    folded = fold(model)
    assert isinstance(folded.bn, nn.Identity)  # the conv took the norm: its old weight is held only in by_name
    held = [folded.held[0], folded.by_name["conv"], folded.by_name["nested"][0][0], folded.pair[0]]
    assert not {id(t) for t in held} & originals
    assert folded.held[0] is folded.head.weight and folded.by_name["nested"][0][0] is folded.head.bias  # ties kept
    assert torch.equal(folded.by_name["conv"], model.conv.weight) and torch.equal(folded.pair[0], model.conv.bias)
    assert folded.by_name["conv"].untyped_storage().data_ptr() != model.conv.weight.untyped_storage().data_ptr()
    assert folded.pair[1] == "label" and folded.by_name["nested"][0][1] == 1
