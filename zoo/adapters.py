"""Block adapters: any supported timm model seen as stem -> ordered blocks -> head.

Stitching needs one common view of very different models, as timm's `forward_features` /
`forward_head` give one common interface. Each family gets a small function that names the
modules of its stem, of each stitchable block ("unit"), and of its head. A unit is one residual
block; a stage's downsampling layer is folded into the stage's first unit, so that every unit
after the first of a stage keeps the stage's shape (that is where SN-Net stitches).

The three parts partition the model's parameters exactly; `adapt` checks that, which catches a
wrong adapter the moment a new timm release renames something.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from composer.errors import UserError

# How a block's output is laid out: tokens (B, N, C), channels-last maps (B, H, W, C) as in timm's
# Swin, or channels-first maps (B, C, H, W). It decides the stitching layer (Linear vs 1x1 conv).
LAYOUTS = ("nlc", "nhwc", "nchw")


@dataclass(frozen=True)
class Unit:
    """One stitchable block: the modules it runs, in order, and the stage it belongs to."""
    stage: int
    modules: tuple[str, ...]


@dataclass
class BlockAdapter:
    """A model as stem -> units -> head. `stem`, `unit` and `head` run the parts."""
    model: nn.Module
    layout: str
    units: list[Unit]
    stem_modules: tuple[str, ...]   # modules or parameters owned by the stem
    head_modules: tuple[str, ...]   # ... and by the head
    _stem: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    _head: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._stem(self.model, x)

    def unit(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for name in self.units[i].modules:
            x = self.model.get_submodule(name)(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.model, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole model through the adapter: must equal `model(x)` (tested per family)."""
        x = self.stem(x)
        for i in range(len(self.units)):
            x = self.unit(i, x)
        return self.head(x)

    @property
    def num_stages(self) -> int:
        return max(u.stage for u in self.units) + 1

    def part_parameters(self, part: str | int) -> list[nn.Parameter]:
        """Parameters owned by 'stem', 'head' or unit i (shared tensors counted once)."""
        names = {"stem": self.stem_modules, "head": self.head_modules}.get(part)
        if names is None:
            names = self.units[int(part)].modules
        return [p for n, p in self.model.named_parameters() if _owned(n, names)]


def _owned(param_name: str, owners: tuple[str, ...]) -> bool:
    return any(param_name == o or param_name.startswith(o + ".") for o in owners)


def _staged_units(stages: list[tuple[str, list[str]]]) -> list[Unit]:
    """Units of staged models: a stage's downsample module (if any) joins its first block."""
    units = []
    for s, (downsample, blocks) in enumerate(stages):
        for i, block in enumerate(blocks):
            mods = (downsample, block) if (i == 0 and downsample) else (block,)
            units.append(Unit(s, mods))
    return units


def _children(model: nn.Module, path: str) -> list[str]:
    return [f"{path}.{n}" for n, _ in model.get_submodule(path).named_children()]


def _downsample_stages(model: nn.Module, path: str) -> list[tuple[str, list[str]]]:
    """Stages shaped like timm's Swin / ConvNeXt / LeViT stages: `downsample` then `blocks`."""
    stages = []
    for i, _ in enumerate(model.get_submodule(path)):
        ds = f"{path}.{i}.downsample"
        has_ds = not isinstance(model.get_submodule(ds), nn.Identity)
        stages.append((ds if has_ds else "", _children(model, f"{path}.{i}.blocks")))
    return stages


# --- one small function per family -------------------------------------------------------------

def _vit(m: nn.Module) -> BlockAdapter:
    def stem(m, x):
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    if getattr(m, "attn_pool", None) is not None:
        raise UnsupportedModel(f"{type(m).__name__} with attention pooling (attn_pool) has no block adapter yet")
    units = [Unit(0, (n,)) for n in _children(m, "blocks")]
    return BlockAdapter(
        m, "nlc", units,
        ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre"),
        ("norm", "fc_norm", "head", "head_dist"),
        stem, lambda m, x: m.forward_head(m.norm(x)))


def _swin(m: nn.Module) -> BlockAdapter:
    return BlockAdapter(
        m, "nhwc", _staged_units(_downsample_stages(m, "layers")), ("patch_embed", "absolute_pos_embed"), ("norm", "head"),
        lambda m, x: m.patch_embed(x), lambda m, x: m.forward_head(m.norm(x)))


def _resnet(m: nn.Module) -> BlockAdapter:
    stages = [("", _children(m, f"layer{i}")) for i in range(1, 5)]
    return BlockAdapter(
        m, "nchw", _staged_units(stages), ("conv1", "bn1"), ("fc",),
        lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))), lambda m, x: m.forward_head(x))


def _cifar_resnet(m: nn.Module) -> BlockAdapter:
    stages = [("", _children(m, f"layer{i}")) for i in range(1, 4)]
    return BlockAdapter(
        m, "nchw", _staged_units(stages), ("conv1", "bn1"), ("linear",),
        lambda m, x: torch.relu(m.bn1(m.conv1(x))), lambda m, x: m.forward_head(x))


def _convnext(m: nn.Module) -> BlockAdapter:
    return BlockAdapter(
        m, "nchw", _staged_units(_downsample_stages(m, "stages")), ("stem",), ("norm_pre", "head"),
        lambda m, x: m.stem(x), lambda m, x: m.forward_head(m.norm_pre(x)))


def _levit(m: nn.Module) -> BlockAdapter:
    if m.use_conv:
        raise UnsupportedModel("LeViT in conv mode (use_conv=True) has no block adapter yet")
    return BlockAdapter(
        m, "nlc", _staged_units(_downsample_stages(m, "stages")), ("stem",), ("head", "head_dist"),
        lambda m, x: m.stem(x).flatten(2).transpose(1, 2), lambda m, x: m.forward_head(x))


def _mobilenetv3(m: nn.Module) -> BlockAdapter:
    stages = [("", _children(m, f"blocks.{i}")) for i, _ in enumerate(m.blocks)]
    return BlockAdapter(
        m, "nchw", _staged_units(stages), ("conv_stem", "bn1"),
        ("global_pool", "conv_head", "norm_head", "classifier"),
        lambda m, x: m.bn1(m.conv_stem(x)), lambda m, x: m.forward_head(x))


def _efficientnet(m: nn.Module) -> BlockAdapter:
    stages = [("", _children(m, f"blocks.{i}")) for i, _ in enumerate(m.blocks)]
    return BlockAdapter(
        m, "nchw", _staged_units(stages), ("conv_stem", "bn1"), ("conv_head", "bn2", "classifier"),
        lambda m, x: m.bn1(m.conv_stem(x)), lambda m, x: m.forward_head(m.bn2(m.conv_head(x))))


def _regnet(m: nn.Module) -> BlockAdapter:
    stages = [("", _children(m, f"s{i}")) for i in range(1, 5)]
    return BlockAdapter(
        m, "nchw", _staged_units(stages), ("stem",), ("final_conv", "head"),
        lambda m, x: m.stem(x), lambda m, x: m.forward_head(m.final_conv(x)))


# Keyed by class name so that importing a family's module is never needed to look it up;
# subclasses (e.g. VisionTransformerDistilled) find their parent's adapter through the MRO.
ADAPTERS: dict[str, Callable[[nn.Module], BlockAdapter]] = {
    "VisionTransformer": _vit,
    "SwinTransformer": _swin,
    "ResNet": _resnet,
    "CifarResNet": _cifar_resnet,
    "ConvNeXt": _convnext,
    "Levit": _levit,
    "MobileNetV3": _mobilenetv3,
    "EfficientNet": _efficientnet,
    "RegNet": _regnet,
}


class UnsupportedModel(UserError):
    """The model has no block adapter; the message says what is missing."""


def adapt(model: nn.Module) -> BlockAdapter:
    """Return the block adapter of a timm model, or raise UnsupportedModel naming the gap."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            adapter = ADAPTERS[cls.__name__](model)
            _check_partition(adapter)
            return adapter
    raise UnsupportedModel(
        f"no block adapter for {type(model).__name__} "
        f"(supported: {', '.join(sorted(ADAPTERS))}); add one in zoo/adapters.py")


def _check_partition(a: BlockAdapter) -> None:
    owners = [a.stem_modules, a.head_modules] + [u.modules for u in a.units]
    for name, _ in a.model.named_parameters():
        n = sum(_owned(name, o) for o in owners)
        if n != 1:
            what = "no part" if n == 0 else f"{n} parts"
            raise UnsupportedModel(
                f"the {type(a.model).__name__} adapter gives parameter '{name}' to {what}; "
                "the timm model's layout has changed")
