"""Model sources: spec parsing, every source kind, checkpoints and their failure messages."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zoocompiler.core.errors import CheckpointError, InputShapeError, UnknownModelError, ZooError
from zoocompiler.sources import (
    ModelSpec,
    default_input_shape,
    load_checkpoint,
    load_model,
    parse_spec,
    read_state_dict,
)

TINY = "python:models_for_tests:tiny_cnn"  # tests/ is on sys.path (conftest.py)


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every float parameter and buffer random values, so a checkpoint differs from any fresh init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return model.eval()


def outputs(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- spec parsing


def test_parse_spec_literals_nested_commas_and_strings():
    spec = parse_spec("timm:vit_tiny_patch16_224, img_size=(32, 48),num_classes=10,drop=0.5,flag=True,act=gelu")
    options = {"img_size": (32, 48), "num_classes": 10, "drop": 0.5, "flag": True, "act": "gelu"}
    assert spec == ModelSpec("timm", "vit_tiny_patch16_224", options)
    assert parse_spec("python:pkg.mod:factory,x='a,b'") == ModelSpec("python", "pkg.mod:factory", {"x": "a,b"})
    assert parse_spec("TorchVision:resnet18") == ModelSpec("torchvision", "resnet18", {})
    assert str(parse_spec("zoo:lenet,x=1")) == "zoo:lenet,x=1"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty model spec"),
        ("resnet18", "did you mean torchvision:resnet18 or timm:resnet18?"),
        ("timmy:resnet18", "did you mean 'timm:resnet18'?"),
        ("timm:resnet18,num_classes", "bad option 'num_classes'"),
        ("python:os", "write python:package.module:factory"),
        ("torchvision:", "has no model name"),
    ],
)
def test_parse_spec_errors_name_cause_and_fix(spec, fragment):
    with pytest.raises(UnknownModelError) as info:
        parse_spec(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- sources


def test_torchvision_source_builds_eval_model_and_overrides_win():
    model = load_model("torchvision:resnet18,num_classes=10")
    assert not model.training
    assert model.fc.out_features == 10
    assert outputs(model, (3, 32, 32)).shape == (2, 10)
    assert load_model("torchvision:resnet18,num_classes=10", num_classes=7).fc.out_features == 7
    assert default_input_shape(model, "torchvision:resnet18") == (3, 224, 224)


def test_timm_source_with_kwargs_and_input_shape():
    spec = "timm:vit_tiny_patch16_224,img_size=32,num_classes=10,in_chans=1"
    model = load_model(spec)
    assert not model.training
    assert model.patch_embed.proj.in_channels == 1
    assert outputs(model, (1, 32, 32)).shape == (2, 10)
    assert default_input_shape(model, spec) == (1, 32, 32)
    plain = load_model("timm:resnet18,num_classes=5")
    assert default_input_shape(plain, "timm:resnet18,num_classes=5") == (3, 224, 224)


def test_python_factory_source():
    model = load_model(TINY + ",num_classes=3", width=4)
    assert not model.training
    assert model[0].out_channels == 4
    assert outputs(model, (3, 16, 16)).shape == (2, 3)
    assert default_input_shape(model, TINY) == (3, 16, 16)
    linear = load_model("python:torch.nn:Linear,in_features=4,out_features=2")
    assert isinstance(linear, nn.Linear)
    with pytest.raises(InputShapeError, match="pass --input-shape C,H,W"):
        default_input_shape(linear, "python:torch.nn:Linear")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("python:models_for_tests:not_a_model", "returned str, not a torch.nn.Module"),
        ("python:models_for_tests:tiny_cn", "did you mean python:models_for_tests:tiny_cnn?"),
        ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        (TINY + ",depth=3", "cannot build 'python:models_for_tests:tiny_cnn' with depth=3"),
        ("timm:resnet18,foo=1", "unexpected keyword argument 'foo'"),
    ],
)
def test_python_and_option_errors(spec, fragment):
    with pytest.raises(UnknownModelError) as info:
        load_model(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("spec", "suggestions"),
    [
        ("timm:resnet1800", ["timm:resnet18", "timm:resnet101"]),
        ("torchvision:resnet", ["torchvision:resnet18", "torchvision:resnet50"]),
        ("torchvision:mobilenetv2", ["torchvision:mobilenet_v2"]),
        ("timm:vit_tiny", ["timm:vit_tiny_patch16_224"]),
    ],
)
def test_unknown_model_suggests_close_matches(spec, suggestions):
    with pytest.raises(UnknownModelError) as info:
        load_model(spec)
    message = str(info.value)
    assert message.startswith(f"unknown {spec.split(':')[0]} model '{spec.split(':')[1]}'")
    for suggestion in suggestions:
        assert suggestion in message


# ----------------------------------------------------------------------------- pretrained without network


def test_torchvision_pretrained_without_network_says_how_to_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(ZooError) as info:
        load_model("torchvision:resnet18", pretrained=True)
    message = str(info.value)
    assert message.startswith("cannot fetch pretrained weights for 'torchvision:resnet18'")
    assert "download the weights where you have network and pass --checkpoint FILE" in message
    assert not isinstance(info.value, UnknownModelError)


def test_timm_pretrained_without_network_says_how_to_fix(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)
    with pytest.raises(ZooError) as info:
        load_model("timm:resnet18", pretrained=True)
    assert str(info.value).startswith("cannot fetch pretrained weights for 'timm:resnet18'")
    assert "--checkpoint FILE" in str(info.value)


def test_pretrained_and_checkpoint_together_is_an_error(tmp_path):
    with pytest.raises(ZooError, match="pass only one of them"):
        load_model(TINY, pretrained=True, checkpoint=tmp_path / "w.pt")
    with pytest.raises(ZooError, match="has no pretrained weights"):
        load_model(TINY, pretrained=True)


# ----------------------------------------------------------------------------- checkpoints


def test_real_user_checkpoint_round_trip_torchvision(tmp_path):
    """A fine-tuned torchvision model saved the usual ways loads back to identical outputs."""
    trained = randomized(load_model("torchvision:resnet18,num_classes=10"))
    expected = outputs(trained, (3, 32, 32))
    fresh = outputs(load_model("torchvision:resnet18,num_classes=10"), (3, 32, 32))
    assert not torch.allclose(fresh, expected)

    plain = tmp_path / "resnet18.pth"
    torch.save(trained.state_dict(), plain)
    nested = tmp_path / "train_state.pt"  # DataParallel prefix, nested under "model", with extras
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, nested)
    for path in (plain, nested):
        loaded = load_model("torchvision:resnet18,num_classes=10", checkpoint=path)
        assert torch.equal(outputs(loaded, (3, 32, 32)), expected)


def test_safetensors_round_trip(tmp_path):
    trained = randomized(load_model(TINY))
    path = tmp_path / "tiny.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = load_model(TINY, checkpoint=path)
    assert torch.equal(outputs(loaded, (3, 16, 16)), outputs(trained, (3, 16, 16)))
    assert set(read_state_dict(path)) == set(trained.state_dict())


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_checkpoint_nested_keys(tmp_path, key):
    trained = randomized(load_model(TINY))
    path = tmp_path / "ckpt.pt"
    torch.save({key: trained.state_dict(), "step": 10}, path)
    loaded = load_checkpoint(load_model(TINY), path)
    assert torch.equal(outputs(loaded, (3, 16, 16)), outputs(trained, (3, 16, 16)))


def test_pickled_object_refused_unless_allowed(tmp_path):
    from models_for_tests import TrainingConfig

    trained = randomized(load_model(TINY))
    path = tmp_path / "with_config.pt"
    torch.save({"state_dict": trained.state_dict(), "config": TrainingConfig()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(TINY, checkpoint=path)
    message = str(info.value)
    assert "models_for_tests.TrainingConfig" in message
    assert "--allow-pickle" in message and "if you trust the file" in message
    loaded = load_model(TINY, checkpoint=path, allow_pickle=True)
    assert torch.equal(outputs(loaded, (3, 16, 16)), outputs(trained, (3, 16, 16)))

    whole = tmp_path / "whole_module.pt"  # torch.save(model): only loadable with allow_pickle
    torch.save(trained, whole)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(TINY, checkpoint=whole)
    loaded = load_model(TINY, checkpoint=whole, allow_pickle=True)
    assert torch.equal(outputs(loaded, (3, 16, 16)), outputs(trained, (3, 16, 16)))


def test_shape_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "ten_classes.pt"
    torch.save(load_model("torchvision:resnet18,num_classes=10").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_model("torchvision:resnet18", checkpoint=path)
    message = str(info.value)
    assert "checkpoint does not match torchvision:resnet18: 2 shape mismatches" in message
    assert "fc.weight: checkpoint [10, 512] vs model [1000, 512]" in message
    assert "fc.bias: checkpoint [10] vs model [1000]" in message
    assert "num_classes=N" in message
    assert "\n" not in message


def test_missing_and_unexpected_keys_are_counted_and_listed(tmp_path):
    state = load_model(TINY).state_dict()
    dropped = [k for k in state if not k.endswith("num_batches_tracked")][:7]
    for key in dropped:
        del state[key]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(TINY, checkpoint=path)
    message = str(info.value)
    assert f"7 missing keys [{', '.join(dropped[:5])}, ...]" in message
    assert "1 unexpected keys [head.weight]" in message
    assert dropped[5] not in message


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    trained = randomized(load_model(TINY))
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_style.safetensors"
    save_file(state, str(path))
    loaded = load_model(TINY, checkpoint=path)
    assert torch.equal(outputs(loaded, (3, 16, 16)), outputs(trained, (3, 16, 16)))


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_corrupted_files_are_reported_as_such(tmp_path):
    state = load_model(TINY).state_dict()
    good_pt, good_st = tmp_path / "good.pt", tmp_path / "good.safetensors"
    torch.save(state, good_pt)
    save_file(state, str(good_st))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    bad_files = [
        _truncated(good_pt, tmp_path / "truncated.pt"),
        _truncated(good_st, tmp_path / "truncated.safetensors"),
        garbage,
        empty,
    ]
    for path in bad_files:
        with pytest.raises(CheckpointError) as info:
            load_model(TINY, checkpoint=path)
        assert "file is corrupted or not a checkpoint" in str(info.value), path
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(TINY, checkpoint=tmp_path / "missing.pt")


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no state dict under state_dict/model/model_state_dict"):
        load_model(TINY, checkpoint=path)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_model(TINY, checkpoint=path)
