"""fxnorm.tracing: whole-model tracing, part-by-part fallback, leaves, concrete_args, no mutation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from devices import DEVICES
from helpers import randomize_norms
from fxnorm import FxNormError, TraceError, TraceReport, trace, report_of
from fxnorm.graph.tracing import NormTracer, graph_parts, is_traced


class BNAct(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class Block(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = BNAct(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """Top-level forward branches on a tensor value; its children trace fine."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = Block(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if y.sum() > 0:
            y = self.body(y)
        return self.head(y)


class BranchyChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.bn(self.conv(x))
        return self.conv(x)


class NestedUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = BranchyChild()
        self.mods = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.ReLU()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        for m in self.mods:
            x = m(x)
        return x



def _ids(module: nn.Module) -> dict[str, int]:
    return {name: id(m) for name, m in module.named_modules()}


def test_whole_model_is_one_graph_with_scopes() -> None:
    model = randomize_norms(Block()).eval()
    gm = trace(model)
    assert isinstance(gm, fx.GraphModule)
    report = report_of(gm, TraceReport)
    assert report.complete and report.graphs == [""] and report.untraced == []
    mods = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    # plain conv/bn stay leaves, the BN subclass with its own forward is traced through
    assert set(mods) == {"conv", "bn"}
    funcs = [n for n in gm.graph.nodes if n.op == "call_function"]
    bn_calls = [n for n in funcs if n.target is F.batch_norm]
    assert len(bn_calls) == 1
    assert bn_calls[0].meta["fxnorm_scope"] == "act"
    assert [n.meta["fxnorm_scope"] for n in funcs if n.target in (F.relu, torch.relu)] == ["act"]
    assert mods["conv"].meta["fxnorm_scope"] == "conv" and mods["bn"].meta["fxnorm_scope"] == "bn"
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # going inside BNAct silenced its rank check for the trace only
    assert "_check_input_dim" not in vars(model.act)
    with pytest.raises(ValueError, match="expected 4D input"):
        model.act(torch.randn(2, 4))


def test_bn_subclass_in_training_mode_updates_statistics_and_leaves_counters() -> None:
    model = Block().train()
    ref = copy.deepcopy(model)
    gm = trace(model)
    assert report_of(gm, TraceReport).complete
    # tracing ran BNAct's code on the real buffers; the user's counters must be left as they were
    assert int(model.act.num_batches_tracked) == 0
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(gm(x), ref(x))
    torch.testing.assert_close(model.act.running_mean, ref.act.running_mean)
    torch.testing.assert_close(model.act.running_var, ref.act.running_var)
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)


def test_scope_of_nested_module_is_qualified() -> None:
    outer = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(Block(4)))
    gm = trace(outer.eval())
    scopes = {n.meta["fxnorm_scope"] for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm}
    assert scopes == {"1.0.act"}


@pytest.mark.parametrize("device", DEVICES)
def test_data_dependent_model_traces_part_by_part(device: str) -> None:
    model = randomize_norms(DataDependent()).eval().to(device)
    before = _ids(model)
    traced = trace(model)
    assert type(traced) is DataDependent  # the glue stays eager, same class
    report = report_of(traced, TraceReport)
    assert not report.complete
    assert report.graphs == ["stem", "body"]  # the plain conv head is a leaf: nothing to trace
    assert [u.name for u in report.untraced] == [""]
    assert report.untraced[0].type == "DataDependent"
    assert "TraceError" in report.untraced[0].reason and "control flow" in report.untraced[0].reason
    assert "\n" not in report.untraced[0].reason
    assert isinstance(traced.stem, fx.GraphModule) and isinstance(traced.body, fx.GraphModule)
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(traced(-x), model(-x), rtol=0, atol=0)
    # the user's model is untouched: same child objects, none of them a GraphModule
    assert _ids(model) == before
    assert not any(isinstance(m, fx.GraphModule) for m in model.modules())
    # parameters are shared, as with torch.fx.symbolic_trace
    assert traced.stem.get_submodule("0").weight is model.stem[0].weight


def test_nested_untraceable_and_containers() -> None:
    model = randomize_norms(NestedUntraceable()).eval()
    traced = trace(model)
    report = report_of(traced, TraceReport)
    untraced = {u.name: u.type for u in report.untraced}
    assert untraced == {"": "NestedUntraceable", "b": "BranchyChild"}
    # a ModuleList is a container: its members are tried one by one. The plain conv is a leaf and
    # stays as it is; the ReLU becomes a (trivial) graph. BranchyChild's conv and bn are leaves.
    assert report.graphs == ["a", "mods.1"]
    assert traced.mods[0] is model.mods[0] and isinstance(traced.mods[1], fx.GraphModule)
    assert traced.b.conv is model.b.conv and traced.b is not model.b
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(traced(-x), model(-x), rtol=0, atol=0)
    assert [name for name, _ in graph_parts(traced)] == [g for g in report.graphs]


def test_inplace_replaces_children_of_the_model() -> None:
    model = DataDependent().eval()
    stem = model.stem
    traced = trace(model, inplace=True)
    assert traced is model
    assert isinstance(model.stem, fx.GraphModule) and model.stem is not stem
    assert report_of(model, TraceReport).graphs == report_of(traced, TraceReport).graphs


def test_copy_leaves_trained_flags_and_plain_attributes() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 7
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.holder = Holder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # untraceable glue that reads a plain attribute of a traced child
                return self.holder(x) * self.holder.width
            return self.holder(x)

    model = Outer().train()
    traced = trace(model)
    assert isinstance(traced.holder, fx.GraphModule)
    assert traced.holder.width == 7 and traced.holder.training
    x = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(traced(x), model(x))
    copied = copy.deepcopy(traced)  # GraphModule copies rebuild the module: the attribute must survive
    assert copied.holder is not traced.holder and copied.holder.width == 7
    torch.testing.assert_close(copied(x), model(x))


@pytest.mark.parametrize("spec", ["type", "name", "instance"])
def test_leaf_modules_are_honoured(spec: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(4)).eval()
    leaf = {"type": Block, "name": "1", "instance": model[1]}[spec]
    gm = trace(model, leaf_modules=[leaf])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)


def test_leaf_module_by_qualified_name_in_a_part() -> None:
    model = DataDependent().eval()
    traced = trace(model, leaf_modules=["body.act"])
    body = traced.body
    assert isinstance(body, fx.GraphModule)
    assert "act" in [n.target for n in body.graph.nodes if n.op == "call_module"]
    # the same name without the prefix does not exist at the top level, so nothing breaks
    plain = trace(model)
    assert "act" not in [n.target for n in plain.body.graph.nodes if n.op == "call_module"]


def test_concrete_args_are_honoured() -> None:
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor, use_bn: bool = True) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) if use_bn else y

    model = randomize_norms(Flag()).eval()
    without = trace(model)
    assert not report_of(without, TraceReport).complete  # `if use_bn` on a proxy fails
    gm = trace(model, concrete_args={"use_bn": False})
    assert report_of(gm, TraceReport).complete
    assert "bn" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(gm(x, False), model(x, use_bn=False))


def test_tracing_a_graph_module_keeps_it() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    assert trace(gm) is gm or isinstance(trace(gm), fx.GraphModule)
    assert report_of(gm, TraceReport).complete  # a GraphModule traced elsewhere counts as complete
    assert is_traced(gm)


def test_errors() -> None:
    with pytest.raises(TraceError, match="expects an nn.Module, got int"):
        trace(3)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="fxnorm.trace"):
        report_of(nn.Linear(1, 1), TraceReport)
    assert issubclass(TraceError, FxNormError)
    assert not is_traced(nn.Linear(1, 1))


def test_norm_tracer_keeps_frozen_bn_and_conv_subclasses_as_leaves() -> None:
    from torchvision.models.video.resnet import Conv3DSimple

    model = nn.Sequential(Conv3DSimple(3, 4), nn.BatchNorm3d(4), nn.Conv2d(1, 1, 1), FrozenBatchNorm2d(1))
    graph = NormTracer().trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]


def test_report_dataclass_defaults() -> None:
    r = TraceReport()
    assert r.graphs == [] and r.untraced == [] and not r.complete


@pytest.mark.parametrize("device", DEVICES)
def test_detection_model_parts_and_outputs(device: str) -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_detections_per_img=10, min_size=128, max_size=160,
    )
    model = randomize_norms(model).eval().to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace(model)
    report = report_of(traced, TraceReport)
    assert "backbone" in report.graphs and "roi_heads.box_head" in report.graphs
    names = {u.name for u in report.untraced}
    assert {"", "transform", "rpn", "roi_heads"} <= names
    assert all(u.reason for u in report.untraced)
    # MultiScaleRoIAlign caches values on first call; tracing must not leave proxies behind
    pool = model.roi_heads.box_roi_pool
    assert not any(isinstance(v, fx.Proxy) for v in vars(pool).values())
    torch.manual_seed(0)
    images = [torch.rand(3, 128, 160, device=device)]
    with torch.no_grad():
        ref = model(images)[0]
        out = traced(images)[0]
    assert ref["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(isinstance(m, fx.GraphModule) for m in model.modules())


def test_optical_flow_model_traces_in_parts() -> None:
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    traced = trace(model)
    report = report_of(traced, TraceReport)
    assert {"feature_encoder", "context_encoder", "update_block"} <= set(report.graphs)
    assert report.untraced[0].name == ""
    torch.manual_seed(0)
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(traced(a, b, num_flow_updates=1)[-1], model(a, b, num_flow_updates=1)[-1], rtol=0, atol=0)


def test_deepcopy_of_traced_part_model_works() -> None:
    traced = trace(DataDependent().eval())
    clone = copy.deepcopy(traced)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(clone(x), traced(x))
