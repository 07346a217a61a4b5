"""The team's real CIFAR-10 family and images (../shared), laid out as the CLI reads them.

Nothing happens at import. `cifar10_splits()` materialises, once, in the cache folder
($ZOO_COMPOSER_CACHE, default ~/.cache/zoo-composer):

  cifar10-test/
    jpg/test/<class>/<k>.jpg      the shared JPEG (q75) copy, extracted: all 10,000 test images (`.test`)
    calib/<class>/<index>.jpg     official test indices >= 5000 (symlinks into jpg/)
    eval/<class>/<index>.jpg      official test indices <  5000 (symlinks into jpg/)
    exact846/<class>/<index>.png  the first 846 test images, exact pixels, lossless
    COMPLETE

and `cifar10_train()`, once, the training set:

  cifar10-train/
    jpg/train/<class>/<k>.jpg     the shared JPEG copy of the 50,000 training images, extracted
    COMPLETE

`<k>` is the k-th image of its class in official order, so with the official label list
(`all_labels`) every test JPEG gets its official index. The protocol (../shared/data/README.md):
calibrate and fine-tune on the training set (`cifar10_train()`), evaluate on all 10,000 test JPEGs
(`.test`, or a seeded subset) and report the 846 exact images (`.exact846`) beside. The calib / eval
halves of the test set are the earlier protocol (calibrate on official test indices >= 5000,
evaluate on < 5000), kept for the benches that still use it. Class folders are named alike
everywhere, and sorted they are CIFAR-10's label order, so ImageFolder labels agree with the models'
outputs 0..9.

Each folder is built under a temporary name and renamed into place, so a reader never sees a
half-built one and a second call only checks for COMPLETE.

`cifar_anchor_specs()` gives "local-dir:" specs for the real ResNet-20/32/44/56 weights.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_ZOO = SHARED / "zoo" / "cifar10-resnet"
SHARED_DATA = SHARED / "data" / "cifar10-test"
JPEG_TAR = SHARED_DATA / "test_jpg_q75.tar.gz"
EXACT_NPZ = SHARED_DATA / "test_first846_exact.npz"
TRAIN_TAR = SHARED / "data" / "cifar10-train" / "train_jpg.tar.gz"
TRAIN_PER_CLASS = 5000

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEPTHS = (20, 32, 44, 56)
CALIB_FROM = 5000          # official indices >= this calibrate, < this evaluate
LAYOUT_VERSION = "1"       # bump when the layout changes: older caches are rebuilt


class SharedDataMissing(RuntimeError):
    """../shared (the team's real weights and images) is not on this machine."""


class CifarDataError(RuntimeError):
    """The shared files are there but not as expected (e.g. an unsafe or incomplete archive)."""


@dataclass(frozen=True)
class CifarSplits:
    root: Path
    calib: Path       # ImageFolder, 5000 JPEGs, official indices >= 5000
    eval: Path        # ImageFolder, 5000 JPEGs, official indices < 5000
    exact846: Path    # ImageFolder, 846 lossless PNGs, official indices 0..845

    @property
    def test(self) -> Path:
        """ImageFolder, all 10,000 test JPEGs (q75), `<class>/<k>.jpg`."""
        return self.root / "jpg" / "test"


def missing_shared_reason(train: bool = False) -> str | None:
    """Why the shared CIFAR files cannot be used here, or None if they can (train=True: the
    training-set protocol, which also needs ../shared/data/cifar10-train)."""
    needed = [JPEG_TAR, EXACT_NPZ] + [SHARED_ZOO / f"resnet{d}.safetensors" for d in DEPTHS] + ([TRAIN_TAR] if train else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        return f"needs the team's shared CIFAR-10 files (absent on a fresh machine): {', '.join(missing[:2])}"
    return None


def need_cifar(train: bool = False) -> None:
    """Raise SharedDataMissing (with the reason) where ../shared is absent."""
    reason = missing_shared_reason(train)
    if reason:
        raise SharedDataMissing(reason)


def cache_root(cache_dir: Path | str | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("ZOO_COMPOSER_CACHE", Path.home() / ".cache" / "zoo-composer")).expanduser()


def cifar10_splits(cache_dir: Path | str | None = None) -> CifarSplits:
    """The calib / eval / exact846 ImageFolders, built on first use (a few seconds)."""
    need_cifar()
    target = cache_root(cache_dir) / "cifar10-test"
    splits = CifarSplits(target, target / "calib", target / "eval", target / "exact846")
    marker = target / "COMPLETE"
    if marker.is_file() and marker.read_text().strip() == LAYOUT_VERSION:
        return splits
    _build_into(target, _build)
    return splits


def cifar10_train(cache_dir: Path | str | None = None) -> Path:
    """The ImageFolder of the 50,000 training JPEGs, extracted on first use (~10 s): calibration and
    fine-tuning images of the training-set protocol."""
    need_cifar(train=True)
    target = cache_root(cache_dir) / "cifar10-train"
    folder = target / "jpg" / "train"
    marker = target / "COMPLETE"
    if not (marker.is_file() and marker.read_text().strip() == LAYOUT_VERSION):
        _build_into(target, _build_train)
    return folder


def _build_into(target: Path, build) -> None:
    """build(tmp) into a temporary sibling of `target`, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():   # an older layout (or a hand-edited folder): build it afresh
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "COMPLETE").is_file():   # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def cifar_anchor_specs(cache_dir: Path | str | None = None) -> list[str]:
    """"local-dir:" specs of the real ResNet-20/32/44/56, in that order (folders in the cache)."""
    need_cifar()
    import zoo  # noqa: F401  (registers the cifar_resnet architectures with timm)
    from zoo.cifar_resnet import local_dir_for

    specs = []
    for d in DEPTHS:
        weights = SHARED_ZOO / f"resnet{d}.safetensors"
        folder = cache_root(cache_dir) / "cifar10-resnet" / f"resnet{d}"
        linked = folder / "model.safetensors"
        ready = (folder / "config.json").is_file() and linked.exists() and linked.resolve() == weights.resolve()
        if not ready:
            local_dir_for(weights, f"cifar_resnet{d}", folder)
        specs.append(f"local-dir:{folder}")
    return specs


# --- building ------------------------------------------------------------------------------------

def _build(root: Path) -> None:
    import numpy as np

    _extract_safely(JPEG_TAR, root / "jpg")
    exact = np.load(EXACT_NPZ)
    all_labels = exact["all_labels"]
    if len(all_labels) != 10000:
        raise CifarDataError(f"{EXACT_NPZ}: expected 10000 labels, got {len(all_labels)}")
    for c, name in enumerate(CLASSES):
        official = np.flatnonzero(all_labels == c)   # this class's official indices, in order
        jpegs = sorted((root / "jpg" / "test" / name).glob("*.jpg"), key=lambda p: int(p.stem))
        if [int(p.stem) for p in jpegs] != list(range(len(official))):
            raise CifarDataError(f"{JPEG_TAR}: class {name} should hold 0000..{len(official) - 1:04d}.jpg")
        for jpg, index in zip(jpegs, official):
            split = "calib" if index >= CALIB_FROM else "eval"
            link = root / split / name / f"{index:05d}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            # relative, so the links survive renaming the temporary folder into place
            os.symlink(os.path.relpath(jpg, link.parent), link)
    _write_exact(root / "exact846", exact["images"], exact["labels"])
    (root / "COMPLETE").write_text(LAYOUT_VERSION + "\n")


def _build_train(root: Path) -> None:
    _extract_safely(TRAIN_TAR, root / "jpg")
    top = root / "jpg"
    if sorted(p.name for p in top.iterdir()) != ["train"]:
        raise CifarDataError(f"{TRAIN_TAR}: expected one folder 'train' at the top")
    if sorted(p.name for p in (top / "train").iterdir()) != list(CLASSES):
        raise CifarDataError(f"{TRAIN_TAR}: expected the class folders {', '.join(CLASSES)}")
    for name in CLASSES:
        n = sum(1 for _ in (top / "train" / name).glob("*.jpg"))
        if n != TRAIN_PER_CLASS:
            raise CifarDataError(f"{TRAIN_TAR}: class {name} holds {n} images, expected {TRAIN_PER_CLASS}")
    (root / "COMPLETE").write_text(LAYOUT_VERSION + "\n")


def _extract_safely(tar_path: Path, dest: Path) -> None:
    """Extract regular files and folders only, refusing absolute or '..' member names."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if PurePosixPath(m.name).is_absolute() or ".." in parts:
                raise CifarDataError(f"{tar_path}: unsafe member name {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise CifarDataError(f"{tar_path}: unexpected member {m.name!r} (not a file or folder)")
        # tarfile's own "data" filter checks again (links, permissions, device files)
        tar.extractall(dest, members=members, filter="data")


def _write_exact(folder: Path, images, labels) -> None:
    from PIL import Image

    present = {int(y) for y in labels}
    if present != set(range(len(CLASSES))):
        # ImageFolder numbers the classes it finds: a missing class would shift every label
        raise CifarDataError(f"{EXACT_NPZ}: the exact images lack classes {sorted(set(range(10)) - present)}")
    for index, (img, y) in enumerate(zip(images, labels)):
        path = folder / CLASSES[int(y)] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)   # PNG: lossless, the exact pixels
