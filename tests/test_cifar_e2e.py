"""End to end on real weights nobody here trained: the CLI fits and evaluates SN-Net on the four
CIFAR-10 ResNets of ../shared (akamaster's ResNet-20/32/44/56) with real CIFAR-10 test images.

Protocol (../shared/data/README.md, the training-set protocol): calibrate and fine-tune on the
CIFAR-10 training set (JPEG), measure on the test set: the first 846 test images with their exact
pixels, and the 10,000 test JPEGs. To stay near two minutes on two cores, all 40 networks are
evaluated on a seeded 128-image subset of the 846 (and a 64-image subset of the test JPEGs around a
3-step fine-tune), and the anchors alone on all 846. Skips, saying why, without ../shared.
"""
import contextlib
import hashlib
import io
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import need_shared

DEPTHS = (20, 32, 44, 56)
PUBLISHED_EXACT846 = {20: 91.73, 32: 93.03, 44: 93.74, 56: 93.26}   # ../shared/zoo/README.md
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}
SUBSET = 128      # exact images every stitch is evaluated on
# Every test here is slow (python -m pytest -m "not slow" skips the module): writing the splits takes ~7 s,
# the fitted run's fixture fits and evaluates 40 networks (~45 s), the 846-image anchor check ~30 s.


def cli(*args) -> dict:
    """`python -m composer ... --json` in this process (composer.cli.main, what `python -m composer`
    runs); returns its JSON. Usable from module fixtures, where conftest's `main` (capsys) is not.
    One torch thread: on a busy 2-core machine two threads wait on each other (measured 3x slower)."""
    from composer.cli import main
    torch.set_num_threads(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*map(str, args), "--json"])
    assert code == 0, out.getvalue()[-3000:]   # the error line itself is on the captured stderr
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    need_shared()
    from bench.cifar10 import cifar10_splits, cifar10_train, cifar_anchor_specs, missing_shared_reason
    if (reason := missing_shared_reason(train=True)):
        pytest.skip(reason)
    cache = tmp_path_factory.mktemp("cache")
    return SimpleNamespace(cache=cache, splits=cifar10_splits(cache), train=cifar10_train(cache),
                           anchors=cifar_anchor_specs(cache))


@pytest.fixture(scope="module")
def fitted(cifar, tmp_path_factory):
    """fit on 64 training images, then evaluate every stitch on SUBSET exact images."""
    run = tmp_path_factory.mktemp("runs") / "cifar"
    fit = cli("fit", *cifar.anchors, "--data", cifar.train, "--calib", 64, "--out", run)
    ev = cli("evaluate", run, "--data", cifar.splits.exact846, "--limit", SUBSET, "--batch-size", 256)
    return SimpleNamespace(run=run, fit=fit, evaluation=ev)


# --- the data layout ---------------------------------------------------------------------------

@pytest.mark.slow   # writes the CIFAR-10 splits (~7 s) and extracts the training set (~10 s) from ../shared
def test_splits_follow_official_test_indices(cifar):
    from bench.cifar10 import CLASSES, EXACT_NPZ, cifar10_splits, cifar10_train
    exact = np.load(EXACT_NPZ)
    labels = exact["all_labels"]
    s = cifar.splits
    for folder, indices in ((s.calib, range(5000, 10000)), (s.eval, range(5000)), (s.exact846, range(846))):
        assert sorted(p.name for p in folder.iterdir()) == list(CLASSES)
        files = sorted(folder.glob("*/*"))
        assert sorted(int(f.stem) for f in files) == list(indices)
        # the class folder of every image is its official label
        assert all(CLASSES[labels[int(f.stem)]] == f.parent.name for f in files)
    # the exact split holds the exact pixels (PNG is lossless)
    from PIL import Image
    for i in (0, 17, 845):
        png = s.exact846 / CLASSES[labels[i]] / f"{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(png)), exact["images"][i])
    # a JPEG is (close to) the exact image of the same index: the k-th of its class is right
    jpg = next((s.eval / CLASSES[labels[3]]).glob("00003.jpg"))
    err = np.abs(np.asarray(Image.open(jpg), dtype=float) - exact["images"][3]).mean()
    assert err < 10, err   # JPEG q75 noise; another image of the class would differ by ~50
    # a second call finds the finished folder and builds nothing
    marker = s.root / "COMPLETE"
    before = marker.stat().st_mtime_ns
    assert cifar10_splits(cifar.cache) == s and marker.stat().st_mtime_ns == before
    # every test JPEG, k-th of its class, in one folder (the training-set protocol's evaluation)
    assert sorted(p.name for p in s.test.iterdir()) == list(CLASSES)
    assert [len(list((s.test / c).glob("*.jpg"))) for c in CLASSES] == [int((labels == i).sum()) for i in range(10)]
    # the training set: 5,000 JPEGs per class, built once
    train = cifar.train
    assert sorted(p.name for p in train.iterdir()) == list(CLASSES)
    assert [len(list((train / c).glob("*.jpg"))) for c in CLASSES] == [5000] * 10
    assert np.asarray(Image.open(train / "cat" / "0000.jpg")).shape == (32, 32, 3)
    marker = train.parents[1] / "COMPLETE"
    before = marker.stat().st_mtime_ns
    assert cifar10_train(cifar.cache) == train and marker.stat().st_mtime_ns == before


# --- fit + evaluate through the CLI ------------------------------------------------------------

def _stitches(result: dict) -> list[dict]:
    return [r for r in result["stitches"] if len(r["route"]) > 1]


@pytest.mark.slow
def test_every_stitch_is_reported_with_costs_and_accuracy(fitted, cifar):
    fit, ev = fitted.fit, fitted.evaluation
    n = len(fit["stitches"])
    assert n == len(ev["stitches"]) and n > 4 + 30      # SN-Net's defaults: 36 stitches + 4 anchors
    assert [r["id"] for r in ev["stitches"]] == list(range(n))
    for r in ev["stitches"]:
        assert all(isinstance(r[k], int) and r[k] > 0 for k in ("macs", "params", "activations")), r
        correct = r["top1"] * SUBSET / 100      # a count of images right out of SUBSET
        assert correct == pytest.approx(round(correct), abs=1e-9), r
    assert all(isinstance(r["r2"], float) for r in _stitches(fit))
    assert ev["images"] == SUBSET
    # the anchors' top-1 recomputed by hand: each anchor alone (plain timm model from its folder) on the
    # same seeded SUBSET of the exact images
    from composer import data
    from zoo.sources import create_anchor
    torch.set_num_threads(1)
    for spec, row in zip(cifar.anchors, ev["stitches"]):     # anchors come first, in MACs order = depth order
        model = create_anchor(spec).eval()
        ds = data.subset(data.open_dataset(str(cifar.splits.exact846), data.data_config(model)), SUBSET, seed=0)
        with torch.no_grad():
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data.loader(ds, 128))
        assert row["top1"] == pytest.approx(100 * correct / SUBSET), (spec, row)


@pytest.mark.slow
def test_least_squares_alone_gives_working_stitches(fitted):
    top1 = [r["top1"] for r in _stitches(fitted.evaluation)]
    # chance is 10%; SN-Net's own random / identity init stays there (methods.md)
    assert statistics.median(top1) > 50, sorted(top1)
    assert sum(t > 20 for t in top1) >= 0.9 * len(top1), sorted(top1)


@pytest.mark.slow
def test_a_short_fine_tune_is_judged_against_the_original_anchors(fitted, cifar, tmp_path):
    """Issue 15 through the CLI: the fitted run evaluated on 64 test JPEGs is the reference; 3 steps
    of fine-tuning on the training set; `evaluate --reference` judges every stitch against the line
    between the original anchors and reports each anchor's change (a smoke test of the wiring, not
    of accuracy: 3 steps and 64 images)."""
    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    test, n = cifar.splits.test, 64
    before = cli("evaluate", run, "--data", test, "--limit", n, "--batch-size", 256)
    shutil.copy(run / "evaluation.json", tmp_path / "before.json")
    assert "judgement" not in before
    r = cli("train", run, "--data", cifar.train, "--eval-data", test, "--steps", 3, "--batch-size", 32,
            "--eval-limit", 16)
    assert r["step"] == 3
    after = cli("evaluate", run, "--data", test, "--limit", n, "--batch-size", 256, "--reference", tmp_path / "before.json")
    j = after["judgement"]
    assert j["reference"] == "original anchors" and j["stitches_judged"] == 36
    ref = {row["id"]: row["top1"] for row in before["stitches"]}
    now = {row["id"]: row["top1"] for row in after["stitches"]}
    assert [a["reference"] for a in j["anchors"]] == [ref[i] for i in range(4)]
    assert [a["change"] for a in j["anchors"]] == pytest.approx([now[i] - ref[i] for i in range(4)])
    assert now != ref   # the fine-tune moved something
    # one stitch by hand: the line through the original anchors of its route, in MACs
    g = j["gaps"][0]
    lo, hi = g["ends"]
    macs = {row["id"]: row["macs"] for row in after["stitches"]}
    line = ref[lo] + (ref[hi] - ref[lo]) * (macs[g["id"]] - macs[lo]) / (macs[hi] - macs[lo])
    assert g["gap"] == pytest.approx(now[g["id"]] - line)
    assert j["within"] == sum(x["gap"] >= -1 for x in j["gaps"])


@pytest.mark.slow
def test_anchors_match_published_accuracy_on_exact_images(cifar, tmp_path):
    """The anchors alone (an empty --points list) on all 846 exact images, through the CLI."""
    run = tmp_path / "anchors"
    cli("fit", *cifar.anchors, "--points", "[]", "--data", cifar.train, "--calib", 1, "--out", run)
    ev = cli("evaluate", run, "--data", cifar.splits.exact846, "--batch-size", 256)
    assert ev["images"] == 846 and len(ev["stitches"]) == 4
    for depth, row in zip(DEPTHS, ev["stitches"]):   # anchors are ordered by MACs: 20, 32, 44, 56
        assert abs(row["top1"] - PUBLISHED_EXACT846[depth]) <= 1.0, (depth, row["top1"])
        assert row["params"] == PARAMS[depth]


class _HookCount:
    """Independent counts from a real forward of one image: MACs and outputs of every conv,
    linear and stitching layer, and the parameters of every module that actually ran."""

    def __init__(self, model: nn.Module):
        from composer.snnet import StitchLayer
        self.macs = self.activations = 0
        self.params: dict[int, int] = {}
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules()]
        self.counted = (nn.Conv2d, nn.Linear, StitchLayer)

    def hook(self, m, args, out):
        self.params.update((id(p), p.numel()) for p in m.parameters(recurse=False))
        if not isinstance(m, self.counted):
            return
        per_output = {nn.Conv2d: lambda: m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1],
                      nn.Linear: lambda: m.in_features}.get(type(m), lambda: m.weight.shape[1])()
        has_bias = getattr(m, "bias", None) is not None
        self.macs += out.numel() * (per_output + has_bias)    # a bias add counts one MAC (pycls)
        self.activations += out.numel()

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _count(model: nn.Module, fn) -> _HookCount:
    torch.set_num_threads(1)   # one image: thousands of tiny ops, where a second thread only waits
    counter = _HookCount(model)
    try:
        fn(torch.zeros(1, 3, 32, 32))
    finally:
        counter.close()
    return counter


@pytest.mark.slow
def test_anchor_costs_equal_an_independent_hook_count(fitted):
    for depth, row in zip(DEPTHS, fitted.fit["stitches"]):
        model = timm.create_model(f"cifar_resnet{depth}").eval()
        c = _count(model, model)
        assert (row["macs"], row["activations"]) == (c.macs, c.activations)
        assert row["params"] == sum(c.params.values()) == PARAMS[depth]
    assert 40e6 < fitted.fit["stitches"][0]["macs"] < 42e6    # ResNet-20: 40.55 M MACs


@pytest.mark.slow
def test_run_folder_reloads_and_every_route_costs_what_it_runs(fitted, cifar):
    from composer import data
    from composer.evaluate import evaluate_naive
    from composer.run import load_run
    run = load_run(fitted.run)
    net = run.net
    assert len(net.plan.stitches) == len(fitted.fit["stitches"])
    saved = load_file(fitted.run / "stitch_layers.safetensors")
    # the stitching layers and each stitch's BatchNorm statistics (route_stats.*), nothing else
    state = {**net.stitch_layers.state_dict(), **{f"route_stats.{k}": v for k, v in net.route_stats.state_dict().items()}}
    assert saved and saved.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in saved.items())
    assert any(k.startswith("route_stats.") for k in saved)
    for row in fitted.evaluation["stitches"]:
        net.select(row["id"])
        c = _count(net, net)
        assert (row["macs"], row["activations"], row["params"]) == (c.macs, c.activations, sum(c.params.values())), row
    # the reloaded network predicts what the CLI reported: one full forward per stitch, on the
    # same seeded subset, for the best and the worst stitch
    stitches = sorted(_stitches(fitted.evaluation), key=lambda r: r["top1"])
    ids = [stitches[0]["id"], stitches[-1]["id"]]
    ds = data.subset(data.open_dataset(str(cifar.splits.exact846), data.data_config(net.anchors[0])), SUBSET, seed=0)
    ref = evaluate_naive(net, data.loader(ds, 256), stitch_ids=ids)
    for i in ids:
        assert ref.top1[i] == pytest.approx(fitted.evaluation["stitches"][i]["top1"])


# --- bad input: one line, exit 2, nothing lost --------------------------------------------------

def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _copy_config(cifar, folder: Path) -> Path:
    folder.mkdir()
    src = Path(cifar.anchors[0].removeprefix("local-dir:"))
    shutil.copy(src / "config.json", folder / "config.json")
    return folder


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_bad_inputs_end_with_one_clear_line(cifar, fitted, tmp_path, main):
    good, calib = cifar.anchors[1], cifar.train

    corrupt = _copy_config(cifar, tmp_path / "corrupt")
    weights = Path(cifar.anchors[0].removeprefix("local-dir:")) / "model.safetensors"
    (corrupt / "model.safetensors").write_bytes(weights.read_bytes()[:4000])   # truncated copy
    msg = _one_error_line(main("fit", f"local-dir:{corrupt}", good, "--data", calib, "--out", tmp_path / "r1"))
    assert "corrupt" in msg

    pickled = _copy_config(cifar, tmp_path / "pickled")
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3), "note": Path("/")}, pickled / "pytorch_model.bin")
    msg = _one_error_line(main("fit", f"local-dir:{pickled}", good, "--data", calib, "--out", tmp_path / "r2"))
    assert "pickle" in msg or "safe" in msg

    (tmp_path / "a_file").write_text("")
    msg = _one_error_line(main("fit", cifar.anchors[0], good, "--data", calib, "--out", tmp_path / "a_file" / "run"))
    assert "a_file" in msg and "is a file" in msg   # names what is in the way

    # a failed fit into an existing run folder leaves that run as it was
    existing = tmp_path / "existing"
    shutil.copytree(fitted.run, existing)
    before = _digest(existing)
    (tmp_path / "empty").mkdir()
    msg = _one_error_line(main("fit", cifar.anchors[0], good, "--data", tmp_path / "empty", "--out", existing))
    assert "no class subfolders" in msg
    unreadable = tmp_path / "unreadable" / "cat"
    unreadable.mkdir(parents=True)
    for i in range(12):
        (unreadable / f"{i}.jpg").write_bytes(b"not a jpeg")
    msg = _one_error_line(main("fit", cifar.anchors[0], good, "--data", unreadable.parent, "--out", existing))
    assert "could not be read" in msg
    assert _digest(existing) == before


@pytest.mark.slow
def test_every_builder_joins_the_stitches_on_one_curve(cifar, fitted, tmp_path, main):
    """Issue 5 on the real ResNets: elastic, shrink, fold and scale each add their points to the
    fitted run, and one curve lists them with the 40 stitches (quick settings: this checks that the
    builders work on real weights; bench figures are in the README)."""
    run = tmp_path / "run"
    shutil.copytree(fitted.run, run)
    calib, exact = cifar.train, cifar.splits.exact846
    r20_macs = 40_551_050
    torch.set_num_threads(1)
    r = main("elastic", run, "--anchor", 1, "--data", calib, "--eval-data", exact, "--budget-macs", r20_macs,
             "--samples", 8, "--eval-limit", 64, "--bn-images", 128, "--population", 16, "--generations", 3,
             "--check", 1, "--json")
    assert r.returncode == 0, r.stderr
    [elastic] = json.loads(r.stdout)["candidates"]
    assert elastic["macs"] <= r20_macs and elastic["top1"] > 30   # chance is 10 %
    r = main("shrink", run, "--anchor", 1, "--data", calib, "--eval-data", exact, "--target-macs", 50_000_000,
             "--steps", 10, "--eval-limit", 64, "--bn-images", 128, "--batch-size", 32, "--json")
    assert r.returncode == 0, r.stderr
    shrunk = json.loads(r.stdout)
    assert shrunk["counted_macs"] <= 50_000_000 and shrunk["top1_after"] > 30
    r = main("fold", run, "--anchor", 0, "--data", exact, "--out", tmp_path / "folded", "--limit", 64, "--no-latency")
    assert r.returncode == 0, r.stderr
    assert main("scale", run, "--fill").returncode == 0
    r = main("curve", run, "--out", tmp_path / "curve.json")
    assert r.returncode == 0, r.stderr
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert len(curve["stitches"]) == 40
    by_method = {c["method"]: c for c in curve["candidates"]}
    assert set(by_method) == {"elastic", "shrink", "fold", "scale"}
    assert by_method["fold"]["top1"] > 85 and by_method["scale"]["top1"] is None   # folded R-20: exact images
    assert by_method["scale"]["macs"] > r20_macs   # the gap ResNet-20 -> 32 is the biggest
