"""The real-data domain-shift example (examples/domain_shift.py): it trains, adapts and measures for
real, so these tests assert on measured accuracies (scikit-learn's digits; skipped without the
``examples`` extra) and on statistics computed by hand from the adaptation batches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICES
from scripts import load_script

pytest.importorskip("sklearn", reason="the domain-shift example needs scikit-learn (the 'examples' extra)")

CORRUPTIONS = ["clean", "low_contrast", "brightness", "inversion"]


@pytest.fixture(scope="module")
def ds():
    return load_script("domain_shift", "examples", "domain_shift.py")


@pytest.fixture(scope="module")
def run_output(ds, tmp_path_factory):
    """One fast run of the example's command line (2 epochs, narrow network), with JSON and plot."""
    out = tmp_path_factory.mktemp("domain_shift")
    json_path, png_path = out / "shift.json", out / "shift.png"
    threads = torch.get_num_threads()
    try:  # tiny tensors: one thread is several times faster than two on a shared two-core machine
        result = ds.main(["--epochs", "2", "--quick", "--threads", "1", "--corruptions", *CORRUPTIONS,
                          "--json", str(json_path), "--plot", str(png_path)])
    finally:
        torch.set_num_threads(threads)
    return result, json_path, png_path


def _rows(result):
    return {r["corruption"]: r for r in result["rows"]}


def test_json_is_the_result(run_output):
    result, json_path, _ = run_output
    written = json.loads(json_path.read_text())
    assert written["rows"] == result["rows"]
    assert [r["corruption"] for r in written["rows"]] == CORRUPTIONS
    assert written["config"]["quick"] is True and written["config"]["epochs"] == 2
    for row in written["rows"]:
        for method in ("source", "update_bn", "update_bn_no_dropout", "fxnorm"):
            # accuracies are fractions of the 540 test images
            assert 0.0 <= row[method] <= 1.0
            assert abs(row[method] * written["config"]["test_images"] - round(row[method] * 540)) < 1e-6


def test_source_model_learned_the_clean_task(run_output):
    rows = _rows(run_output[0])
    assert rows["clean"]["source"] > 0.5  # chance is 0.1


def test_recalibration_recovers_accuracy_under_shift(run_output):
    rows = _rows(run_output[0])
    clean = rows["clean"]["source"]
    recovered = [name for name, r in rows.items()
                 if r["source"] < clean - 0.2 and r["fxnorm"] > r["source"] + 0.2]
    assert recovered, f"no corruption where the source model drops and fxnorm recovers: {rows}"


def test_recalibration_on_clean_data_does_not_hurt(run_output):
    rows = _rows(run_output[0])
    assert rows["clean"]["fxnorm"] >= rows["clean"]["source"] - 0.03


def test_plot_is_a_readable_chart(run_output):
    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(str(run_output[2]))
    assert pixels.shape[:2] == (462, 990)  # figsize (9, 4.2) at 110 dpi
    rgb = torch.from_numpy(pixels[::3, ::3, :3].copy()).reshape(-1, 3)
    # the four method colours are drawn as bars (more than a few pixels of each)
    for hexcode in ("#9e9e9e", "#f28e2b", "#f7c99b", "#4e79a7"):
        want = torch.tensor([int(hexcode[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert int(((rgb - want).abs().max(dim=1).values < 0.01).sum()) > 50, hexcode


def _drifting_batches(sizes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 1, 8, 8, generator=gen) * (1 + i) + 0.5 * i).to(device) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("device", DEVICES)
def test_adapt_pools_exact_statistics_and_keeps_the_model(ds, device):
    torch.manual_seed(0)
    model = ds.SmallNet(width=4, dropout=0.5).eval().to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _drifting_batches([7, 5, 2], device=device)  # unshuffled drift and a short last batch
    fx_model = ds.adapt(model, "fxnorm", batches)
    torch_model = ds.adapt(model, "update_bn", batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # adapt works on a copy

    conv1, bn1, conv2 = model.features[0], model.features[1], model.features[4]
    with torch.no_grad():
        first = [conv1(b).double() for b in batches]
        # what the second BN sees with BN1 normalizing by batch statistics and the Dropout in eval mode
        second = [conv2(F.relu(F.batch_norm(c.float(), None, None, bn1.weight, bn1.bias, training=True,
                                            eps=bn1.eps))).double() for c in first]

    def pooled(outputs):
        flat = torch.cat([o.transpose(0, 1).reshape(o.shape[1], -1) for o in outputs], dim=1)
        return flat.mean(1), flat.var(1, unbiased=True)

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    for index, outputs in ((1, first), (5, second)):
        mean, var = pooled(outputs)
        got = fx_model.features[index]
        assert got.running_mean.device.type == device
        assert rel(got.running_mean, mean) < 1e-5
        assert rel(got.running_var, var) < 1e-5
    # update_bn averages per-batch variances (and runs the Dropout): measurably off on this stream
    assert rel(torch_model.features[1].running_var, pooled(first)[1]) > 1e-2
    assert rel(torch_model.features[5].running_var, pooled(second)[1]) > 1e-2


def test_corruptions_change_the_images(ds):
    x = ds.load_data(size=8)["x_test"][:64]
    for name in ds.CORRUPTIONS:
        y = ds.corrupt(x, name, seed=3)
        assert y.shape == x.shape and torch.isfinite(y).all()
        if name == "clean":
            assert torch.equal(y, x)
        else:
            assert (y - x).abs().mean() > 0.02, name
    assert torch.allclose(ds.corrupt(x, "inversion"), 1 - x)
    # contrast keeps each image's mean and shrinks its spread by 4
    low = ds.corrupt(x, "low_contrast")
    assert torch.allclose(low.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(low.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)) / 4, atol=1e-6)
    with pytest.raises(SystemExit, match="unknown corruption"):
        ds.corrupt(x, "fog")
