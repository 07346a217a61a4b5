"""Tiny random-weight anchors of each supported family, small enough for fast tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from composer.costs import describe
from composer.plan import build_plan
from composer.snnet import StitchedNetwork
from zoo.adapters import adapt

# name -> (timm model, kwargs, input size): shrunk where timm allows, real configs otherwise.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2), (3, 32, 32)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), (3, 32, 32)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), (3, 32, 32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 1, 2, 2)), (3, 56, 56)),
    "resnet": ("resnet18", {}, (3, 64, 64)),
    "cifar_resnet": ("cifar_resnet20", {}, (3, 32, 32)),
    "convnext": ("convnext_atto", {}, (3, 64, 64)),
    "levit": ("levit_128s", {}, (3, 224, 224)),
    "mobilenetv3": ("mobilenetv3_small_050", {}, (3, 64, 64)),
    "efficientnet": ("efficientnet_b0", {}, (3, 64, 64)),
    "regnet": ("regnetx_002", {}, (3, 64, 64)),
}


def tiny(family: str, seed: int = 0):
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval(), size


def vit(dim: int, heads: int, depth: int = 4, seed: int = 0, num_classes: int = 10):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=dim,
                             depth=depth, num_heads=heads, num_classes=num_classes).eval()


def cifar(depth: int, seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(f"cifar_resnet{depth}", pretrained=False).eval()


def tiny_vit_zoo(root: Path, dims: tuple[int, ...] = (16, 24), depth: int = 2, per_class: int = 8,
                 random_heads: bool = False) -> tuple[list[str], Path]:
    """Tiny ViTs (2 heads, 3 classes, 32x32 images in 8x8 patches) saved in timm's local-dir format as
    root/vit{dim}, and root/images: a 3-class ImageFolder of `per_class` random 32x32 PNGs per class.
    Returns the anchors' "local-dir:" specs (in `dims` order) and the image folder.

    random_heads: heads drawn with std 1, so that predictions vary from image to image (a fresh
    head's tiny weights give every image the same class)."""
    specs = []
    for dim in dims:
        model = vit(dim, 2, depth=depth, num_classes=3)
        if random_heads:
            torch.nn.init.normal_(model.head.weight, std=1.0)
        d = Path(root) / f"vit{dim}"
        save_for_hf(model, d, safe_serialization=True, model_args=dict(
            img_size=32, patch_size=8, depth=depth, num_classes=3, embed_dim=dim, num_heads=2))
        specs.append(f"local-dir:{d}")
    data = Path(root) / "images"
    rng = np.random.default_rng(0)
    for c in range(3):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"class{c}" / f"{i}.png")
    return specs, data


def mixed_size_cifar_zoo(root: Path, image_size: int = 44) -> tuple[list[str], Path]:
    """Two random-weight CIFAR ResNets (3 classes) in local-dir format, ResNet-20 at its 32 px and
    ResNet-32 saved as if trained at 40 px, and root/images: a 3-class ImageFolder of 4 random
    `image_size`-px PNGs per class. Returns the anchors' "local-dir:" specs and the image folder."""
    import json

    import zoo.cifar_resnet  # noqa: F401  (registers the CIFAR ResNets with timm)
    specs = []
    for i, (arch, size) in enumerate((("cifar_resnet20", 32), ("cifar_resnet32", 40))):
        torch.manual_seed(i)
        d = root / arch
        save_for_hf(timm.create_model(arch, num_classes=3), d, safe_serialization=True)
        cfg = json.loads((d / "config.json").read_text())
        cfg["pretrained_cfg"]["input_size"] = [3, size, size]
        (d / "config.json").write_text(json.dumps(cfg))
        specs.append(f"local-dir:{d}")
    data = root / "images"
    rng = np.random.default_rng(0)
    for c in range(3):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(
                data / f"class{c}" / f"{i}.png")
    return specs, data


def network(models, size, **plan_options) -> StitchedNetwork:
    infos = [describe(f"m{i}", adapt(m), size) for i, m in enumerate(models)]
    plan = build_plan(infos, **plan_options)
    order = {f"m{i}": m for i, m in enumerate(models)}
    return StitchedNetwork([order[n] for n in plan.anchors], plan)


def vit_family(**plan_options) -> StitchedNetwork:
    return network([vit(32, 2, seed=1), vit(48, 3, seed=2), vit(64, 4, seed=3)], (3, 32, 32), **plan_options)


def cifar_family(**plan_options) -> StitchedNetwork:
    return network([cifar(20, 1), cifar(32, 2)], (3, 32, 32), **plan_options)
