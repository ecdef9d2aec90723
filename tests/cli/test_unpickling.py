"""Reading files without running code from them (``fxnorm.cli.unpickling``): the allow-list of MODEL
files, and the restricted unpickler of ``--weights`` files against pickles that try to run code."""

from __future__ import annotations

import argparse
import functools
import pickle
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from fxnorm import ChannelAffine, ModelLoadError
from fxnorm.cli.unpickling import Stub, load_model_file, read_checkpoint, safe_classes, state_dict_in
from fxnorm.errors import UnsafeFileError


class Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_the_allow_list_is_classes_of_torch_nn_torchvision_and_fxnorm() -> None:
    allowed = safe_classes()
    for cls in (nn.Conv2d, nn.BatchNorm2d, nn.Sequential, torchvision.models.ResNet, ChannelAffine,
                torchvision.ops.misc.Conv2dNormActivation, torchvision.models.detection._utils.BoxCoder,
                functools.partial):
        assert cls in allowed, cls
    assert all(isinstance(c, type) for c in allowed)  # no function: nothing the file could call at load time
    assert not any(issubclass(c, fx.GraphModule) for c in allowed)  # GraphModules carry code
    assert Net not in allowed and argparse.Namespace not in allowed


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_b_16"])
def test_whole_torchvision_models_load_by_default(name: str, tmp_path: Path) -> None:
    kwargs = {"image_size": 32} if name.startswith("vit") else {}  # small: fast
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model_file(str(tmp_path / "m.pt"))
    assert type(loaded) is type(model)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_other_classes_are_refused_and_their_code_never_runs(tmp_path: Path) -> None:
    torch.save(Payload(tmp_path / "pwned"), tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"needs exec, which is not on fxnorm's list .* --trust-file"):
        load_model_file(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
    load_model_file(str(tmp_path / "evil.pt"), trust=True)  # the payload is real: trusted, it runs
    assert (tmp_path / "pwned").read_text() == "pwned"


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_checkpoints_are_read_with_stand_ins(tmp_path: Path, zipped: bool) -> None:
    net = Net()
    args = argparse.Namespace(lr=0.1, payload=Payload(tmp_path / "pwned"))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict(), "args": args, "epoch": 3}, path, _use_new_zipfile_serialization=zipped)
    checkpoint = read_checkpoint(str(path))
    assert isinstance(checkpoint["args"], Stub) and checkpoint["args"].stub_of == "argparse.Namespace"
    assert checkpoint["args"].state["lr"] == 0.1 and checkpoint["epoch"] == 3
    found = state_dict_in(checkpoint)
    assert found is not None and found.keys() == net.state_dict().keys()
    assert all(torch.equal(found[k], v) for k, v in net.state_dict().items())
    assert not (tmp_path / "pwned").exists()


def test_a_pickled_model_of_any_class_gives_its_state_dict(tmp_path: Path) -> None:
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_()
    torch.save(net, tmp_path / "net.pt")
    found = state_dict_in(read_checkpoint(str(tmp_path / "net.pt")))
    assert found is not None and sorted(found) == sorted(net.state_dict())  # not the non-persistent buffer
    assert torch.equal(found["bn.running_mean"], net.bn.running_mean)


def test_a_pickle_cannot_set_the_state_of_a_function_or_class(tmp_path: Path) -> None:
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD {"x": 1}: would write an attribute on torch's function
    path = tmp_path / "attack.pt"
    path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00xK\x01sb.")
    with pytest.raises(ModelLoadError, match="refused to set the state of function"):
        read_checkpoint(str(path))
    assert not hasattr(torch._utils._rebuild_tensor_v2, "x")
    path.write_bytes(pickle.dumps(42, protocol=2))  # a plain pickle: read, but not a torch file
    with pytest.raises(ModelLoadError, match=r"attack.pt: not a file written by torch.save, or a damaged one "
                                             r"\(Invalid magic number; corrupt file\?\)"):
        read_checkpoint(str(path))
