"""zoo.cifar_resnet: architecture, timm integration, and the real akamaster weights."""
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from tests.conftest import SHARED_DATA, SHARED_ZOO, need_shared
from zoo.cifar_resnet import CifarResNet, local_dir_for

DEPTHS = (20, 32, 44, 56)
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}
PUBLISHED_TOP1_FIRST846 = {20: 91.73, 56: 93.26}


@pytest.mark.parametrize("depth", DEPTHS)
def test_param_count_matches_paper(depth):
    model = timm.create_model(f"cifar_resnet{depth}")
    assert isinstance(model, CifarResNet)
    # parameters() counts BN affine weights but not running stats (those are buffers)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[depth]


def test_timm_interface_and_shapes():
    model = timm.create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier() is model.linear and model.num_classes == 10
    assert [f["module"] for f in model.feature_info] == ["layer1", "layer2", "layer3"]
    # the option-A shortcut carries no parameters: only the first block of layer2/3 pads
    assert sum(p.numel() for p in model.layer2[0].shortcut.parameters()) == 0
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["first_conv"] == "conv1"

    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5


def test_features_only_follows_feature_info():
    feats = timm.create_model("cifar_resnet20", features_only=True)(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_local_dir_config_is_timm_layout(tmp_path):
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(
        {k: v for k, v in timm.create_model("cifar_resnet20").state_dict().items()
         if not k.endswith("num_batches_tracked")},
        weights,
    )
    out = local_dir_for(weights, "cifar_resnet20", tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "cifar_resnet20" and cfg["num_classes"] == 10
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert (out / "model.safetensors").resolve() == weights.resolve()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # loads strictly, with the missing num_batches_tracked filled in by the filter
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert int(model.bn1.num_batches_tracked) == 0


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    need_shared()
    root = tmp_path_factory.mktemp("cifar_local")
    return {d: local_dir_for(SHARED_ZOO / f"resnet{d}.safetensors", f"cifar_resnet{d}", root / f"r{d}")
            for d in DEPTHS}


@pytest.mark.parametrize("depth", DEPTHS)
def test_real_weights_load_strictly(real_dirs, depth):
    file_keys = set(safetensors.torch.load_file(SHARED_ZOO / f"resnet{depth}.safetensors"))
    model = timm.create_model(f"local-dir:{real_dirs[depth]}", pretrained=True)
    model_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert file_keys == model_keys  # the files load as they are: no renaming, nothing left over
    ref = safetensors.torch.load_file(SHARED_ZOO / f"resnet{depth}.safetensors")
    assert torch.equal(model.linear.weight, ref["linear.weight"])


@pytest.mark.parametrize("depth", [d if d == min(PUBLISHED_TOP1_FIRST846) else pytest.param(d, marks=pytest.mark.slow)
                                   for d in sorted(PUBLISHED_TOP1_FIRST846)])   # the deepest: ~10 s
def test_real_weights_accuracy_first846(real_dirs, depth):
    model = timm.create_model(f"local-dir:{real_dirs[depth]}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    data = np.load(SHARED_DATA / "test_first846_exact.npz")
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(256)])
    top1 = 100 * (pred.numpy() == data["labels"]).mean()
    assert abs(top1 - PUBLISHED_TOP1_FIRST846[depth]) <= 1.0, top1


def test_module_registers_all_depths():
    assert timm.list_models("cifar_resnet*") == [f"cifar_resnet{d}" for d in DEPTHS]
