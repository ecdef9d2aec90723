"""The folded model is still the user's model (issue "Drop-in folding").

Models here reproduce what libraries do with their models: parents that read properties of their
children, iterate containers, call blocks with optional ``None`` arguments, register forward hooks on
specific classes to collect hidden states, wrappers that read attributes and call methods. Folding
must keep all of that working, change only the folded norms and the layers that absorb them, and
give a model that deep-copies, saves, loads, exports and compiles.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_norms, rel_err

from fxnorm import FoldReport, find_norms, fold, report_of
from fxnorm.folding.modules import NormRemainder

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Block(nn.Module):
    """A residual block called with an optional skip tensor (``skip=None`` by default)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = ConvBN(c, c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.body(x)
        return y if skip is None else y + skip


class Encoder(nn.Module):
    output_stride = 1

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.blocks = nn.Sequential(Block(8), Block(8))

    @property
    def out_channels(self) -> int:
        return self.stem.conv.out_channels


class Net(nn.Module):
    """A parent that reads a child's property, iterates a container and passes optional arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(8, 3)
        self.names = ["cat", "dog", "bird"]
        self.config = {"stride": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.encoder.output_stride == 1 and self.encoder.out_channels == 8
        x = self.encoder.stem(x)
        skip = None
        for block in self.encoder.blocks:
            x = block(x, skip)
            skip = x
        return self.head(x.mean((2, 3)))

    def describe(self) -> str:
        return f"{len(self.names)} classes"


def _net() -> Net:
    torch.manual_seed(0)
    return randomize_norms(Net()).eval()


def _classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}


def test_the_folded_model_is_the_users_model():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    classes, keys = _classes(model), set(model.state_dict())
    folded = fold(model)
    report = report_of(folded, FoldReport)
    assert type(folded) is Net and folded is not model and _classes(model) == classes  # the input is untouched
    gone = {f.name for f in report.folded}
    assert gone == {"encoder.stem.bn", "encoder.blocks.0.body.bn", "encoder.blocks.1.body.bn"}
    assert {n for n, cls in _classes(folded).items() if classes[n] is not cls} == gone
    assert all(isinstance(folded.get_submodule(n), nn.Identity) for n in gone)
    assert folded.describe() == "3 classes" and folded.config == {"stride": 1} and folded.encoder.out_channels == 8
    with torch.no_grad():
        assert rel_err(folded(x), ref) < 1e-5
    # the state_dict differs only by the folded norms' entries and the added biases
    added = {f"{f.into}.bias" for f in report.folded}
    removed = {k for k in keys if k.rpartition(".")[0] in gone}
    assert set(folded.state_dict()) == (keys - removed) | added


def test_in_place_the_model_itself_is_folded_and_consistent():
    model = _net()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert fold(model, inplace=True) is model
        assert rel_err(model(x), ref) < 1e-5
    assert find_norms(model) == []


def test_class_specific_hooks_keep_firing_and_see_the_same_values():
    model = _net()
    x = torch.randn(2, 3, 8, 8)

    def hidden_states(net: nn.Module) -> tuple[list, object]:
        seen: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
                   for m in net.modules() if isinstance(m, Block)]
        return seen, handles

    expected, handles = hidden_states(model)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    folded = fold(model)
    seen, _ = hidden_states(folded)  # hooks registered by class, after the fold, as a library would
    with torch.no_grad():
        folded(x)
    assert len(seen) == len(expected) == 2 and all(rel_err(a, b) < 1e-5 for a, b in zip(seen, expected))
    # hooks already there on unchanged modules keep firing too
    calls = []
    model.encoder.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        fold(model)(x)
    assert calls == [1]


def test_a_norm_called_at_two_sites_where_one_cannot_fold_stays_a_norm():
    class TwoSites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.bn(torch.relu(x))  # the second call has no conv before it

    model = randomize_norms(TwoSites()).eval()
    x = torch.randn(2, 3, 4, 4)
    folded = fold(model)
    report = report_of(folded, FoldReport)
    assert report.folded == [] and isinstance(folded.bn, nn.BatchNorm2d)
    assert all("the same norm is also called at" in s.reason or "not a conv" in s.reason for s in report.skipped)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-6


def test_a_norm_registered_under_two_names_becomes_identity_at_both():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    model.alias = model[1]
    folded = fold(model)
    assert isinstance(folded[1], nn.Identity) and folded.alias is folded[1]


class BNAct(nn.BatchNorm2d):
    """BN + activation + dropout in one module (timm's BatchNormAct2d)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Dropout(0.1), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class FunctionalOwner(nn.Module):
    """A custom module whose own forward calls F.batch_norm on its own buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.tag = "keep me"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, None, None, False, 0.1, 1e-5) * 2


def _rewritten() -> nn.Module:
    torch.manual_seed(1)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4), FunctionalOwner())).eval()


def test_norm_subclasses_and_functional_norms_leave_the_model_keeping_what_remains():
    model = _rewritten()
    x = torch.randn(2, 3, 6, 6)
    folded = fold(model, example_inputs=(x,))
    report = report_of(folded, FoldReport)
    assert [(f.name, f.into) for f in report.folded] == [("1", "0"), ("2", "2.conv")]
    assert isinstance(folded[1], NormRemainder) and isinstance(folded[1].act, nn.SiLU)  # not a norm any more
    assert type(folded[2]) is FunctionalOwner and folded[2].tag == "keep me" and report.forwards == ["2"]
    assert "mean" not in dict(folded[2].named_buffers())
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    assert find_norms(folded) == []


@pytest.mark.parametrize("make", [_net, _rewritten])
def test_folded_models_copy_save_load_and_round_trip_their_state(tmp_path, make):
    model = make()
    x = torch.randn(1, 3, 8, 8)
    folded = fold(model, example_inputs=(x,))
    with torch.no_grad():
        ref = folded(x)
        assert rel_err(copy.deepcopy(folded)(x), ref) == 0
        path = tmp_path / "folded.pt"
        torch.save(folded, path)
        loaded = torch.load(path, weights_only=False)
        assert type(loaded) is type(folded) and rel_err(loaded(x), ref) == 0
        fresh = fold(make(), example_inputs=(x,))
        fresh.load_state_dict(folded.state_dict())
        assert rel_err(fresh(x), ref) == 0


@pytest.mark.parametrize("strict", [False, True])
def test_folded_models_export_wherever_the_original_did(strict):
    model = _rewritten()
    x = torch.randn(1, 3, 6, 6)
    torch.export.export(model, (x,), strict=strict)  # the original exports
    folded = fold(model, example_inputs=(x,))
    program = torch.export.export(folded, (x,), strict=strict)
    with torch.no_grad():
        assert rel_err(program.module()(x), folded(x)) < 1e-6
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)


def test_a_rewritten_forward_compiles():
    model = _rewritten()
    x = torch.randn(1, 3, 6, 6)
    folded = fold(model, example_inputs=(x,))
    compiled = torch.compile(folded, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), folded(x)) < 1e-6


def test_fold_twice_changes_nothing():
    model = _net()
    once = fold(model)
    buffer = io.BytesIO()
    torch.save(once.state_dict(), buffer)
    twice = fold(once, inplace=True)
    report = report_of(twice, FoldReport)
    assert twice is once and report.folded == [] and report.skipped == []
    buffer.seek(0)
    before = torch.load(buffer)
    assert all(torch.equal(before[k], v) for k, v in twice.state_dict().items()) and before.keys() == \
        twice.state_dict().keys()


def test_fold_under_inference_mode_gives_ordinary_tensors():
    model = _net()
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        folded = fold(model)
        out = folded(x)
    assert len(report_of(folded, FoldReport).folded) == 3
    assert not any(p.is_inference() for p in folded.parameters())
    with torch.no_grad():
        assert rel_err(out, model(x)) < 1e-5
    folded.head.weight.sum().backward()  # ordinary tensors: autograd works on the folded model


def test_a_root_forward_with_a_functional_norm_is_refused_with_the_remedy():
    owner = randomize_norms(FunctionalOwner()).eval()
    folded = fold(owner, example_inputs=(torch.randn(1, 4, 3, 3),))
    (skip,) = report_of(folded, FoldReport).skipped
    assert "root's forward" in skip.reason and "wrap" in skip.reason


def test_optional_arguments_keep_a_forward_from_being_rewritten():
    class Optional(FunctionalOwner):
        def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:  # type: ignore[override]
            return F.batch_norm(self.conv(x), self.mean, self.var, None, None, False, 0.1, 1e-5) * scale

    model = randomize_norms(nn.Sequential(Optional())).eval()
    x = torch.randn(1, 4, 3, 3)
    folded = fold(model, example_inputs=(x,))
    (skip,) = report_of(folded, FoldReport).skipped
    assert "optional argument scale=2.0" in skip.reason
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) == 0
