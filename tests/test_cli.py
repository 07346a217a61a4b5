"""The CLI end to end on tiny local-dir anchors, and its error contract: one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.engine_models import tiny_vit_zoo


def cli(*args, timeout=300):
    """The real process: python -m composer ... (only the smoke test below: every other CLI test
    runs `composer.cli.main` in this process through conftest's `main` fixture)."""
    return subprocess.run([sys.executable, "-m", "composer", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """Three tiny ViTs saved in timm's local-dir format, and a 3-class ImageFolder."""
    return tiny_vit_zoo(tmp_path_factory.mktemp("zoo"), dims=(16, 24, 32), depth=4, per_class=12)


def test_plan_deit_family_offline_json(main):
    r = main("plan", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["anchors"] == ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    assert len(out["stitches"]) == 71
    first = out["stitches"][0]
    assert set(first) == {"id", "route", "macs", "params", "activations"}
    assert first["route"] == [{"anchor": 0, "blocks": [0, 11]}]
    macs = [s["macs"] for s in out["stitches"]]
    assert macs[0] < macs[1] < macs[2] and min(macs[3:]) > macs[0]
    # a 12-block stitch Ti[0..j] -> S[j+1..11] costs between Ti and S
    for s in out["stitches"][3:37]:
        (f, b) = s["route"]
        if b["blocks"][0] == f["blocks"][1] + 1:
            assert macs[0] < s["macs"] < macs[1]


def test_fit_then_evaluate_round_trip(tiny_zoo, tmp_path, main):
    from composer import data as data_mod
    from composer.fit import HOLDOUT_EVERY
    from composer.run import load_run
    from tests.test_stitching import _rows_by_hand

    specs, data = tiny_zoo
    run = tmp_path / "run"
    r = main("fit", *specs, "--data", data, "--calib", 20, "--out", run, "--batch-size", 8, "--json")
    assert r.returncode == 0, r.stderr
    fitted = json.loads(r.stdout)
    assert len(fitted["stitches"]) == 3 + 2 * 10 and (run / "stitch_layers.safetensors").is_file()
    r2 = {s["id"]: s["r2"] for s in fitted["stitches"] if "r2" in s}
    assert len(r2) == 20
    net = load_run(run).net.eval()
    assert len(net.plan.stitches) == 23
    # R^2 of every stitch by hand: the same 20 calibration images (seeded subset, in order), rows of the
    # front block's output and the back block's input, every 5th image held out, the saved layer applied
    calib = data_mod.subset(data_mod.open_dataset(str(data), data_mod.data_config(net.anchors[0])), 20, seed=0)
    images = [x for x, _ in data_mod.loader(calib, 8)]
    held = lambda i: (i % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
    for sid, got in r2.items():
        f, b = net.plan.stitches[sid].route
        X, Y = _rows_by_hand(net, images, (f.anchor, f.last), (b.anchor, b.first - 1), held)
        layer = net.stitch_layers[net.plan.stitches[sid].layers[0]]
        pred = X @ layer.weight.detach().double().T + layer.bias.detach().double()
        want = 1 - ((Y - pred) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
        # the saved float32 layer vs the fit's float64 solution: measured <= 3.3e-7 apart (in-sample R^2: 0.04)
        assert got == pytest.approx(float(want), abs=1e-5), sid

    r = main("evaluate", run, "--data", data, "--limit", 30, "--latency", "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["images"] == 30 and len(ev["stitches"]) == 23
    assert all(s["macs"] > 0 and s["latency_ms"] > 0 for s in ev["stitches"])
    assert json.loads((run / "evaluation.json").read_text())["stitches"] == ev["stitches"]
    # the fitted layers came back: top-1 by hand on the same 30 images (seeded subset), the anchors as
    # the plain timm models they are, every other stitch as one forward of its route
    ds = data_mod.subset(data_mod.open_dataset(str(data), data_mod.data_config(net.anchors[0]), split="validation"),
                         30, seed=0)
    batches = list(data_mod.loader(ds, 8))
    with torch.no_grad():
        for s in ev["stitches"]:
            model = net.anchors[s["id"]] if s["id"] < len(net.anchors) else net.select(s["id"])
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
            assert s["top1"] == pytest.approx(100 * correct / 30), s


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(("error:", "python -m composer")) and "error" in last
    return last


def test_bad_input_in_a_real_process_is_one_line():
    r = cli("plan", "no_such_net")
    assert "unknown model 'no_such_net'" in _one_error_line(r)
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_inputs_end_with_one_clear_line(tiny_zoo, tmp_path, main):
    specs, data = tiny_zoo
    cli = main
    assert "unknown model 'no_such_net'" in _one_error_line(cli("plan", "no_such_net"))
    assert "stages" in _one_error_line(cli("plan", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"))
    assert "must be at least 1" in _one_error_line(cli("fit", *specs, "--data", data, "--calib", 0, "--out", tmp_path / "r"))
    assert "does not exist" in _one_error_line(cli("fit", *specs, "--data", tmp_path / "nope", "--out", tmp_path / "r"))
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in _one_error_line(cli("fit", *specs, "--data", tmp_path / "empty", "--out", tmp_path / "r"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"{blocker} is a file" in _one_error_line(cli("fit", *specs, "--data", data, "--out", blocker / "run"))
    assert "not a run folder" in _one_error_line(cli("evaluate", tmp_path, "--data", data))
    assert "--points" in _one_error_line(cli("plan", "deit_tiny_patch16_224", "--points", "[[oops"))
    assert "wrong way" in _one_error_line(cli("plan", "deit_tiny_patch16_224", "deit_small_patch16_224",
                                              "--points", "[[[1, 2], [0, 3]]]"))


def test_corrupted_and_pickled_weights_are_refused(tiny_zoo, tmp_path, main):
    specs, data = tiny_zoo
    cli = main
    src = Path(specs[0].removeprefix("local-dir:"))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "corrupted" in _one_error_line(cli("fit", f"local-dir:{bad}", specs[1], "--data", data, "--out", tmp_path / "r"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    torch.save({"state": {"a": torch.zeros(1)}, "evil": Path("/")}, pickled / "pytorch_model.bin")
    msg = _one_error_line(cli("fit", f"local-dir:{pickled}", specs[1], "--data", data, "--out", tmp_path / "r"))
    assert "pickle" in msg or "safe" in msg


def test_families_offline_lists_starter_and_local(starter_family, main, tmp_path):
    r = main("families", "--local", starter_family.root / "models", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "offline" in out["hub_status"]
    by_source = {f["source"]: f for f in out["families"]}
    assert by_source["starter"]["members"] == starter_family.anchors          # small -> large
    assert by_source["local"]["members"] == starter_family.anchors
    assert "is not a folder" in _one_error_line(main("families", "--local", tmp_path / "missing"))


def test_starter_shorthand_plans_the_starter_family(starter_family, main):
    r = main("plan", "starter", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["anchors"] == starter_family.anchors and len(out["stitches"]) == 3 + 2 * 10


def test_shrink_scale_and_fold_on_the_starter_family(starter_family, main, tmp_path):
    """The builders' CLI on the starter family (trained tiny ViTs): shrink meets its target with a
    network that rebuilds and measures the same; scale predicts what the scaled model counts; fold
    refuses, saying why (LayerNorm ViTs have nothing linear to merge)."""
    from composer import data
    from composer.run import read_candidates
    from composer.costs import model_cost
    from composer.builders.elastic import load_subnet, top1
    import timm

    from composer.builders.scaling import anchor_config, build, dwr_scale

    run = tmp_path / "run"
    assert main("fit", "starter", "--data", "starter", "--calib", 16, "--out", run).returncode == 0
    anchors = starter_family.anchors
    r = main("shrink", run, "--anchor", 2, "--data", "starter", "--target-macs", "0.3M", "--steps", 5,
             "--eval-limit", 60, "--batch-size", 16, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counted_macs"] <= 300_000 < out["full_macs"] and out["bn_images"] == 0   # no BatchNorm in a ViT
    net = load_subnet(run / out["folder"])
    assert model_cost(net).macs == out["counted_macs"]
    ds = data.subset(data.open_dataset("starter", data.data_config(net), split="validation"), 60, seed=0)
    assert top1(net, data.loader(ds, 16)) == pytest.approx(out["top1_after"])

    r = main("scale", run, "--factor", 2, "--anchor", 0, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    config = dwr_scale(anchor_config(anchors[0]), 2)
    model = build(config, "cpu")
    assert out["config"] == config.to_dict()
    assert out["predicted"]["macs"] == model_cost(model, (3, config.resolution, config.resolution)).macs
    r = main("scale", run, "--fill", "--json")
    assert r.returncode == 0, r.stderr
    filled = json.loads(r.stdout)["predicted"]["macs"]
    macs = sorted(model_cost(timm.create_model(a)).macs for a in anchors)
    gaps = [macs[1] / macs[0], macs[2] / macs[1]]   # the biggest ratio between neighbours is filled
    lo = gaps.index(max(gaps))
    assert macs[lo] < filled < macs[lo + 1]

    r = main("fold", run, "--anchor", 0, "--data", "starter", "--out", tmp_path / "folded", "--no-latency")
    assert r.returncode == 2 and r.stderr.startswith("error: nothing folds in") and r.stderr.count("\n") == 1
    assert "LayerNorm" in r.stderr
    assert sorted(c.method for c in read_candidates(run)) == ["scale", "scale", "shrink"]
