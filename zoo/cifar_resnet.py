"""The classic CIFAR-10 ResNets (He et al. 2016, "option A" shortcut) as timm models.

Importing this module registers `cifar_resnet20/32/44/56` with timm, so that
`timm.create_model("cifar_resnet20")` works, and so does `timm.create_model("local-dir:<dir>",
pretrained=True)` for a folder made by `local_dir_for` (timm looks the architecture up in its
registry, which only knows these names once this module has been imported).

Module names match github akamaster/pytorch_resnet_cifar10, so its converted weights
(/work/shared/zoo/cifar10-resnet/resnetNN.safetensors) load as they are.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._hub import save_config_for_hf

__all__ = ["CifarResNet", "BasicBlock", "local_dir_for"]

CIFAR_MEAN = (0.485, 0.456, 0.406)  # the normalisation akamaster trained with (ImageNet's)
CIFAR_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels; no parameters.

    The paper's option A keeps the parameter count of the plain network, which is why the published
    counts (269,722 for ResNet-20) only hold with it.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Always a module (identity or padding) so every block has the same attribute layout.
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 stem, three stages of widths 16/32/64, avg-pool, linear."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs: Any):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=16, reduction=1, module="layer1"),
            dict(num_chs=32, reduction=2, module="layer2"),
            dict(num_chs=64, reduction=4, module="layer3"),
        ]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        # global_pool is accepted for timm interface compatibility; this model always averages.
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _fill_num_batches_tracked(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted files carry no BN `num_batches_tracked`; add zeros so strict loading passes."""
    state_dict = dict(state_dict)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    return state_dict


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "license": "bsd-2-clause",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"cifar_resnet{d}": _cfg() for d in (20, 32, 44, 56)})


def _create(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        pretrained_filter_fn=_fill_num_batches_tracked,
        # three stages, not timm's default of five feature levels
        feature_cfg=dict(out_indices=(0, 1, 2)),
        depth=depth,
        **kwargs,
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 269,722 parameters)."""
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 464,154 parameters)."""
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 658,586 parameters)."""
    return _create("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 853,018 parameters)."""
    return _create("cifar_resnet56", 56, pretrained, **kwargs)


def local_dir_for(weights_file: Path, arch: str, out_dir: Path) -> Path:
    """Make `out_dir` a timm `local-dir:` model folder for `weights_file` (a safetensors file).

    Writes config.json in timm's own export layout (via timm's `save_config_for_hf` on a freshly
    built model, so it matches what `timm.models.save_for_hf` writes) and links model.safetensors to
    the given file (a copy where symlinks are not allowed). Returns `out_dir`.
    Then: `timm.create_model(f"local-dir:{out_dir}", pretrained=True)`.
    """
    import shutil

    import timm

    weights_file = Path(weights_file).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(arch, pretrained=False)

    # Each file is written under a temporary name, then renamed: a reader never sees half a file.
    fd, tmp_name = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=out_dir)
    os.close(fd)
    try:
        save_config_for_hf(model, tmp_name)
        os.replace(tmp_name, out_dir / "config.json")
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)

    tmp_weights = out_dir / f".model.{os.getpid()}.safetensors"
    try:
        try:
            os.symlink(weights_file, tmp_weights)
        except OSError:  # e.g. Windows without developer mode, or a filesystem without symlinks
            shutil.copyfile(weights_file, tmp_weights)
        os.replace(tmp_weights, out_dir / "model.safetensors")
    finally:
        if os.path.lexists(tmp_weights):
            os.unlink(tmp_weights)
    return out_dir
