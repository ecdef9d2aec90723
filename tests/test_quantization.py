"""Quantization after fxnorm: recalibrate -> fold -> export -> torchao PT2E (``prepare_pt2e`` /
``convert_pt2e``, the ``quant`` extra; skipped without torchao), and FX graph mode quantization
(``torch.ao.quantization.quantize_fx.prepare_fx``) on fxnorm's folded GraphModule.

Agreement is measured between the float program (recalibrated, folded) and the quantized one on
held-out generated images. Bounds: resnet18 measured 14.1-18.0 dB SQNR, min cosine 0.965-0.987
(PT2E x86 18.0 dB, PT2E XNNPACK 15.5 dB, prepare_fx x86 14.1 dB); the tests ask for 10 dB and 0.9.
The toy transformer block measured 36 dB (bound 20 dB). Random networks with batch norm amplify perturbations
(docs/quantization.md): mobilenets/efficientnets measure far lower, as does their float model under
8-bit-sized weight noise, so they are not used for agreement bounds.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import zoo
from fxnorm import recalibrate, count_batch_norm_ops, export_for_quantization, norms_with_affine, fold, trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="needs the quant extra: pip install 'fxnorm[quant]'")
MIN_SQNR_DB, MIN_COSINE = 10.0, 0.9


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("quantize_pt2e", os.path.join(ROOT, "examples", "quantize_pt2e.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["quantize_pt2e"] = module
    spec.loader.exec_module(module)
    return module


def _conv_weights_dequantized(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """(convs and linears, how many of them read a dequantized weight)."""
    layers = [n for n in graph.graph.nodes if n.op == "call_function"
              and str(n.target).split(".")[1] in ("conv2d", "linear")]
    fed = [n for n in layers if isinstance(n.args[1], torch.fx.Node) and "dequantize" in str(n.args[1].target)]
    return len(layers), len(fed)


@needs_torchao
@pytest.mark.parametrize("quantizer", ["x86", "xnnpack"])
def test_pt2e_resnet18(example, quantizer: str) -> None:
    model = zoo.build("resnet18")
    before = copy.deepcopy(model.state_dict())
    calibration = [example.images(8, 32, seed=i) for i in range(3)]
    held_out = example.images(8, 32, seed=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_graph, quantized, _ = example.quantize(model, (calibration[0],), calibration, quantizer)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed
    assert count_batch_norm_ops(float_graph) == 0
    # the float program is the model recalibrated on the same batches, then folded
    expected = fold(recalibrate(copy.deepcopy(model), calibration))
    with torch.no_grad():
        assert zoo.rel_err(float_graph(held_out), expected(held_out)) < 1e-4
        q = quantized(held_out)
    layers, fed = _conv_weights_dequantized(quantized)
    assert layers == 21 and fed == 21  # 20 convs + fc: every weight is quantized
    result = example.agreement(expected(held_out), q)
    assert result["sqnr_db"] >= MIN_SQNR_DB and result["min_cosine"] >= MIN_COSINE, result


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm -> attention projections, LayerNorm -> MLP."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


@needs_torchao
def test_pt2e_transformer_block_with_norm_affine_folded(example) -> None:
    """The rotation/smoothing preparation: the LayerNorms lose their affine part to the Linears, then
    the block is quantized (every Linear)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = zoo.randomize_norms(Block(), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 8, 32, generator=gen) for _ in range(3)]
    held_out = torch.randn(4, 8, 32, generator=gen)
    graph = export_for_quantization(model, (calibration[0],), norm_affine=True)
    assert norms_with_affine(graph) == {}
    assert sum(1 for n in graph.graph.nodes if "layer_norm" in str(n.target)) == 2
    with torch.no_grad():
        reference = model(held_out)
        assert zoo.rel_err(graph(held_out), reference) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, example.make_quantizer("xnnpack"))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        quantized = convert_pt2e(prepared)
    assert _conv_weights_dequantized(quantized) == (4, 4)
    with torch.no_grad():
        result = example.agreement(reference.flatten(0, 1), quantized(held_out).flatten(0, 1))
    assert result["sqnr_db"] >= 20 and result["min_cosine"] >= 0.99, result


def test_prepare_fx_accepts_the_traced_folded_model(example) -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calibration = [example.images(8, 32, seed=i) for i in range(3)]
    held_out = example.images(8, 32, seed=1000)
    folded = fold(recalibrate(zoo.build("resnet18"), calibration))
    traced = trace(copy.deepcopy(folded))  # traced through the Identity modules left by the folded norms
    assert count_batch_norm_ops(traced) == 0 and not any(isinstance(m, torch.nn.Identity) for m in traced.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(traced, get_default_qconfig_mapping("x86"), (calibration[0],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        quantized = convert_fx(prepared)
    convs = [m for m in quantized.modules() if ".quantized" in type(m).__module__  # ConvReLU2d too
             and "Conv" in type(m).__name__]
    assert len(convs) == 20  # every conv of resnet18 (bn folded) became a quantized conv
    assert sum("ConvReLU" in type(m).__name__ for m in convs) == 9  # stem + each block's conv1: fused with their ReLU
    with torch.no_grad():
        result = example.agreement(folded(held_out), quantized(held_out))
    assert result["sqnr_db"] >= MIN_SQNR_DB and result["min_cosine"] >= MIN_COSINE, result


def test_the_quantization_page_examples_run(tmp_path, monkeypatch) -> None:
    """Every ```python block with ``>>>`` prompts in docs/quantization.md, in order, in one namespace
    (they need both extras: onnx and torchao)."""
    import doctest
    import re

    for module in ("onnx", "onnxruntime", "onnxscript", "torchao"):
        pytest.importorskip(module, reason="docs/quantization.md uses the onnx and quant extras")
    monkeypatch.chdir(tmp_path)  # the page writes resnet18.onnx
    path = os.path.join(ROOT, "docs", "quantization.md")
    with open(path) as f:
        text = f.read()
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    namespace: dict = {}
    out: list[str] = []
    blocks = [m for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S) if ">>>" in m.group(1)]
    assert len(blocks) >= 6
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for match in blocks:
            line = text.count("\n", 0, match.start(1))
            test = parser.get_doctest(match.group(1), namespace, "quantization.md", path, line)
            test.globs = namespace
            runner.run(test, out=out.append, clear_globs=False)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 40, "".join(out)
