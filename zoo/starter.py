"""A built-in starter family: three tiny ViTs trained on scikit-learn's digits, no network needed.

On a fresh machine with no Hub access there is still something to stitch: `ensure_starter()` writes
the digits as an ImageFolder, trains `starter_vit_tiny/small/base` (same depth, growing width, as in
DeiT, so SN-Net's paired stitching applies) on the train split, and saves each as a timm
`local-dir:` folder. The first call takes well under a minute on 2 cores; later calls read the
manifest and return at once.

Importing this module registers the three architectures with timm, which `local-dir:` loading needs.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, save_for_hf
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["StarterFamily", "ensure_starter", "default_cache_dir", "STARTER_MODELS"]

# Bump when the data, architectures or training change, so old caches are rebuilt, not reused.
STARTER_VERSION = 1
STARTER_MODELS = ("starter_vit_tiny", "starter_vit_small", "starter_vit_base")  # small -> large
SEED = 0
VAL_FRACTION = 0.3
IMG_SIZE = 16

# One training recipe for all three (~45 s in all on one core). Chosen by trying a few: it keeps the
# accuracies clearly ordered by width, the thing a stitching demo needs.
EPOCHS = 20
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 0.05


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, IMG_SIZE, IMG_SIZE),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "nearest",  # the digits are upscaled nearest; keep any resize the same
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "bsd-3-clause",  # the digits data set ships with scikit-learn (BSD-3)
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in STARTER_MODELS})

# Same depth for all three; width and heads grow (DeiT-style family).
_ARCH_ARGS = {
    "starter_vit_tiny": dict(embed_dim=16, num_heads=2),
    "starter_vit_small": dict(embed_dim=32, num_heads=2),
    "starter_vit_base": dict(embed_dim=64, num_heads=4),
}


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    model_args = dict(img_size=IMG_SIZE, patch_size=4, in_chans=3, depth=4, num_classes=10,
                      class_token=True, **_ARCH_ARGS[variant])
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


@register_model
def starter_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 16x16 digits: patch 4, depth 4, width 16, 2 heads."""
    return _create("starter_vit_tiny", pretrained, **kwargs)


@register_model
def starter_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 16x16 digits: patch 4, depth 4, width 32, 2 heads."""
    return _create("starter_vit_small", pretrained, **kwargs)


@register_model
def starter_vit_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 16x16 digits: patch 4, depth 4, width 64, 4 heads."""
    return _create("starter_vit_base", pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------
# The cached family
# ---------------------------------------------------------------------------------------------
@dataclass
class StarterFamily:
    anchors: list[str]  # "local-dir:<root>/models/<name>", small -> large
    train_dir: Path
    val_dir: Path
    accuracies: dict[str, float] = field(default_factory=dict)  # anchor -> val top-1 in %
    root: Path | None = None


def default_cache_dir() -> Path:
    """ZOO_COMPOSER_CACHE if set, else ~/.cache/zoo-composer."""
    env = os.environ.get("ZOO_COMPOSER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zoo-composer"


def ensure_starter(cache_dir: Path | None = None, progress: bool = True) -> StarterFamily:
    """Return the starter family, building it under `<cache_dir>/starter` on first use.

    `cache_dir` defaults to `default_cache_dir()`. The whole folder (data, models, manifest) is
    built in a temporary sibling and renamed into place, so an interrupted build leaves nothing
    half-made and a concurrent build by another process is harmless.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "starter"
    family = _read_family(target)
    if family is not None:
        return family

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".starter-build-", dir=root))
    try:
        _build(tmp, progress)
        if target.exists():  # a stale or incomplete earlier build: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder now): use theirs.
            if _read_family(target) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    family = _read_family(target)
    assert family is not None, f"starter build at {target} produced no readable manifest"
    return family


def _read_family(target: Path) -> StarterFamily | None:
    """The family recorded in `target/manifest.json`, or None when absent, stale or incomplete."""
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != STARTER_VERSION:
        return None
    if not all((target / "models" / n / "model.safetensors").is_file() for n in STARTER_MODELS):
        return None
    anchors = [f"local-dir:{target / 'models' / n}" for n in STARTER_MODELS]
    return StarterFamily(
        anchors=anchors,
        train_dir=target / "data" / "train",
        val_dir=target / "data" / "val",
        accuracies={a: manifest["accuracies"][n] for a, n in zip(anchors, STARTER_MODELS)},
        root=target,
    )


def _build(out: Path, progress: bool) -> None:
    """Write data, train and save the three models, and write the manifest, all under `out`."""
    start = time.perf_counter()
    (x_train, y_train), _ = _write_digits(out / "data")
    # One intra-op thread while training, whatever the caller set: these matrices are so small
    # that thread hand-offs cost more than they save (measured: 2 threads on a busy 2-core
    # machine ran >10x slower than 1), and one thread makes the result independent of the
    # machine's core count, so the recorded accuracies reproduce everywhere.
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracies = _train_and_save_all(out, x_train, y_train, progress)
    finally:
        torch.set_num_threads(caller_threads)
    manifest = {
        "version": STARTER_VERSION,
        "models": list(STARTER_MODELS),
        "accuracies": accuracies,
        "data": "scikit-learn digits, 8x8 upscaled to 16x16 nearest, stratified 70/30 split, seed 0",
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _train_and_save_all(out: Path, x_train: np.ndarray, y_train: np.ndarray, progress: bool) -> dict[str, float]:
    from tqdm.auto import tqdm

    accuracies = {}
    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)
    with tqdm(total=len(STARTER_MODELS) * EPOCHS * steps_per_epoch, desc="starter zoo",
              unit="step", disable=not progress, file=sys.stderr) as bar:
        for name in STARTER_MODELS:
            bar.set_postfix_str(name)
            model = _train(name, x_train, y_train, bar)
            save_for_hf(model, str(out / "models" / name), safe_serialization=True)
            # Measured on the PNGs as written, through timm's own eval transform, so it is the
            # number anyone gets who loads the anchor and evaluates it on val_dir.
            accuracies[name] = evaluate_folder(model, out / "data" / "val")
    return accuracies


def _write_digits(data_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Write train/val ImageFolders of RGB PNGs; return the same uint8 NHWC arrays and labels."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 -> 0..255, 8x8 -> 16x16 nearest (each pixel repeated 2x2), grey -> RGB
    img = np.round(digits.images * (255 / 16)).astype(np.uint8)
    img = img.repeat(2, axis=1).repeat(2, axis=2)
    img = np.repeat(img[..., None], 3, axis=3)
    idx_train, idx_val = train_test_split(
        np.arange(len(img)), test_size=VAL_FRACTION, stratify=digits.target, random_state=SEED)
    splits = {"train": idx_train, "val": idx_val}
    for split, idx in splits.items():
        for i in idx:
            folder = data_dir / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[i], mode="RGB").save(folder / f"{i}.png")
    return ((img[idx_train], digits.target[idx_train]), (img[idx_val], digits.target[idx_val]))


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised NCHW float, matching the pretrained_cfg mean/std of 0.5."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5


def _train(name: str, images: np.ndarray, labels: np.ndarray, bar: Any) -> torch.nn.Module:
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(name)
    x, y = _to_input(images), torch.from_numpy(labels).long()
    # Start the position embedding at the fixed 2-D sin-cos table (as MAE does) instead of timm's
    # near-zero random init: with a few hundred steps, learning positions from scratch is what
    # holds a ViT back on 1,258 images. It stays a learned parameter.
    with torch.no_grad():
        grid = model.patch_embed.grid_size
        model.pos_embed[0, model.num_prefix_tokens:] = build_sincos2d_pos_embed(list(grid), dim=model.embed_dim)
        model.pos_embed[0, :model.num_prefix_tokens] = 0
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(y) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=gen)
        for batch in order.split(BATCH_SIZE):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    return model.eval()


def evaluate_folder(model: torch.nn.Module, folder: Path, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of `model` on an ImageFolder, with timm's eval transform for the model."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.create_dataset("", root=str(folder), transform=timm.data.create_transform(**cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for xb, yb in loader:
            correct += int((model(xb).argmax(1) == yb).sum())
            total += len(yb)
    return round(100 * correct / total, 2)
