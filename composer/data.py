"""Labelled images for calibration, fine-tuning and evaluation, preprocessed as the anchors expect.

A data spec is one of:
- a folder in ImageFolder layout (one subfolder per class), read by timm's `create_dataset`;
- "starter" / "starter:train" / "starter:val": the built-in starter family's digits;
- a timm dataset name with a scheme ("torch/cifar10", "hfds/...", ...), read by `create_dataset`
  with root $ZOO_COMPOSER_DATA (default ~/.cache/zoo-composer/data).
Transforms come from the anchor's pretrained config (`resolve_data_config` + `create_transform`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from composer.errors import UserError

_SCHEMES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(UserError):
    """A data spec that gives no usable images; the message says why."""


class SizeMismatch(DataError):
    """Anchors trained at different input sizes (`--resolution` says how to run them)."""


def data_config(model: nn.Module) -> dict:
    return resolve_data_config(model=model)


def check_same_preprocessing(models: list[nn.Module], names: list[str], same_size: bool = True) -> dict:
    """Stitched anchors see the same images, so they must agree on size and normalisation (only on
    normalisation with `same_size=False`: anchors at their own sizes, see composer.run.set_native)."""
    cfgs = [data_config(m) for m in models]
    keys = ("input_size", "mean", "std") if same_size else ("mean", "std")
    for name, cfg in zip(names[1:], cfgs[1:]):
        for k in keys:
            if tuple(cfg[k]) != tuple(cfgs[0][k]):
                text = f"anchors disagree on preprocessing: {names[0]} has {k}={tuple(cfgs[0][k])}, {name} has {tuple(cfg[k])}"
                if k == "input_size":
                    raise SizeMismatch(text + ": run them with --resolution N (all at N x N) or --resolution native "
                                              "(each at its own size)")
                raise DataError(text)
    return cfgs[0]


def open_dataset(spec: str, config: dict, train: bool = False, split: str = "train") -> Dataset:
    """The data set named by `spec` with the anchor's eval (or train-time augmenting) transform."""
    transform = create_transform(**{k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in config},
                                 is_training=train)
    if spec.startswith("starter"):
        from zoo.starter import ensure_starter
        fam = ensure_starter()
        part = spec.partition(":")[2] or {"validation": "val"}.get(split, split)   # timm's name for held-out
        if part not in ("train", "val"):
            raise DataError(f"starter data has splits train and val, not '{part}'")
        root = Path(fam.train_dir if part == "train" else fam.val_dir)
    elif spec.startswith(_SCHEMES):
        root = Path(os.environ.get("ZOO_COMPOSER_DATA", Path.home() / ".cache" / "zoo-composer" / "data"))
        try:
            return create_dataset(spec, root=str(root), split=split, is_training=train, transform=transform)
        except Exception as e:  # timm raises many kinds; the user needs the name and the cause
            raise DataError(f"data set '{spec}' could not be opened under {root}: {e}") from None
    else:
        root = Path(spec).expanduser()
    _check_image_folder(root)
    return create_dataset("", root=str(root), transform=transform)


def _check_image_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data {root} is not a folder (expected ImageFolder layout: one subfolder per class)")
    classes = [d for d in root.iterdir() if d.is_dir()]
    if not classes:
        raise DataError(f"data folder {root} has no class subfolders (expected ImageFolder layout)")
    if not any(f.suffix.lower() in _IMAGE_EXT for d in classes for f in d.rglob("*")):
        raise DataError(f"data folder {root} has class folders but no images")


def subset(ds: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of `limit` images (ImageFolders are sorted by class, so the first N
    images would all be one class)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit <= 0:
        raise DataError(f"the number of images must be positive, got {limit}")
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist())


def loader(ds: Dataset, batch_size: int = 64, shuffle: bool = False, workers: int = 0, seed: int = 0) -> DataLoader:
    if len(ds) == 0:
        raise DataError("the data set is empty")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(_ReadErrorsAsDataError(ds), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=g, persistent_workers=False, drop_last=False)


def forever(batches: Iterable, empty: UserError) -> Iterator:
    """`batches` pass after pass, without end: a shuffling DataLoader reshuffles on each pass, where
    itertools.cycle would replay the first pass and keep every batch of it in memory. A pass that
    gives nothing raises `empty` (the caller's message), not an endless loop."""
    while True:
        got_one = False
        for b in batches:
            got_one = True
            yield b
        if not got_one:
            raise empty


class _ReadErrorsAsDataError(Dataset):
    """timm skips an unreadable image (logging a warning) but after 10 in a row raises a bare
    RuntimeError; say which data is unreadable instead of ending in a stack trace."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index):
        try:
            return self.ds[index]
        except RuntimeError as e:
            if "consecutive samples" not in str(e):
                raise
            ds = self.ds
            while isinstance(ds, Subset):
                ds, index = ds.dataset, ds.indices[index]
            where = ds.filename(index, absolute=True) if hasattr(ds, "filename") else f"item {index}"
            raise DataError(f"images could not be read (not images, or corrupted), from {where} on") from None
