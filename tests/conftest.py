"""Shared test set-up: offline by default, small thread count, paths to ../shared."""
import os
import sys
from pathlib import Path

import pytest

# Offline and quiet before anything imports huggingface_hub or gradio (both read env at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
SHARED_ZOO = SHARED / "zoo" / "cifar10-resnet"
SHARED_DATA = SHARED / "data" / "cifar10-test"


def need_shared() -> None:
    """Skip (with the reason) where ../shared is absent, as on a user's fresh machine."""
    if not (SHARED_ZOO.is_dir() and SHARED_DATA.is_dir()):
        pytest.skip(f"needs the team's shared data at {SHARED} (absent on a fresh machine)")


def pytest_collection_modifyitems(config, items):
    """A test that needs the starter family is slow: the first one of a session trains it (~1 min)."""
    for item in items:
        if "starter_family" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def starter_family(tmp_path_factory):
    """The built-in starter family, built once per test session into a temporary cache, which
    also becomes ZOO_COMPOSER_CACHE so that the "starter" data spec finds the same build.
    Tests using it are marked slow (pytest_collection_modifyitems above). Under pytest-xdist the
    workers share one build (the first builds it under a file lock, the others wait and read it)."""
    from filelock import FileLock

    from zoo.starter import ensure_starter
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "zoo_cache"    # the workers' common base
    else:
        cache = tmp_path_factory.mktemp("zoo_cache")
    old = os.environ.get("ZOO_COMPOSER_CACHE")
    os.environ["ZOO_COMPOSER_CACHE"] = str(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".build.lock")):
        family = ensure_starter(cache, progress=False)
    yield family
    if old is None:
        os.environ.pop("ZOO_COMPOSER_CACHE", None)
    else:
        os.environ["ZOO_COMPOSER_CACHE"] = old


@pytest.fixture
def main(capsys):
    """The CLI's entry point in-process: same code path as `python -m composer`, without the
    seconds a new interpreter costs. Returns returncode / stdout / stderr like subprocess.run."""
    from types import SimpleNamespace

    from composer.cli import main as cli_main

    def run(*args):
        try:
            rc = cli_main([str(a) for a in args])
        except SystemExit as e:   # argparse's own errors
            rc = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
    return run


def seed_everything(seed: int = 0) -> None:
    """Seed every global generator a test or the library may draw from: torch (CPU and CUDA),
    Python's random and numpy's legacy global generator."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same generator state, whichever tests ran before it or alone
    (pytest -k, -x, another order): a test that draws random numbers draws the same ones each run."""
    seed_everything(0)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """The same for shared fixtures (random-init anchors, fitted runs): a module or session fixture
    is built from seed 0 on one thread, not from whatever state the tests before it (which depend on
    -k) left."""
    if fixturedef.scope != "function":
        seed_everything(0)
        one_thread()     # and these run before the per-test setting below
    yield


def one_thread() -> None:
    """One torch intra-op thread. The tests' models are tiny: on this project's busy 2-core machines a
    second thread only spins waiting for the first (measured: 23 stitches of a tiny ViT forward in
    0.27 s on one thread, 12.4 s on two while other processes ran), and one thread keeps float32
    reductions in one order wherever the suite runs."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _few_threads():
    one_thread()
    yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run of one random-init CIFAR ResNet-20, and a 10-class folder of 32x32 images."""
    import numpy as np
    from PIL import Image

    from composer.cli import main as cli_main
    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"c{c}" / f"{i}.png")
    assert cli_main(["fit", "cifar_resnet20", "--data", str(root / "images"), "--calib", "4", "--out",
                     str(root / "run"), "--batch-size", "4"]) == 0
    return root / "run", root / "images"
