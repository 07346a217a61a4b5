"""SN-Netv2 beyond the plan: least squares for routes there and back, their BatchNorm statistics,
shared-prefix evaluation and export; low-rank stitching layers; FLOPs-gap sampling.

Anchors are tiny random-weight models (tests.engine_models, and tests.test_train's local-dir
families for run folders); the slow test at the end runs the CLI on the real CIFAR ResNets.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer import data
from composer.evaluate import evaluate_all
from composer.export import export_snnet, export_stitch, load_snnet, load_stitched
from composer.fit import HOLDOUT_EVERY, calibrate_route_stats, fit_stitches
from composer.plan import macs_step_groups
from composer.run import build_network, load_run, save_fitted
from composer.snnet import prefix_outputs
from composer.train import StitchSampler, TrainError, train
from tests.engine_models import cifar, network, vit
from tests.test_train import CNN, make_family, small
from tests.test_two_way import _by_hand_vit


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Features as (rows, channels) in float64: one row per pixel or token."""
    t = t.permute(0, 2, 3, 1) if layout == "nchw" else t
    return t.reshape(-1, t.shape[-1]).double()


def _three(net) -> list[int]:
    return [s.id for s in net.stitches if len(s.route) == 3]


# --- least squares, BatchNorm statistics, shared-prefix evaluation ----------------------------------

@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_each_two_way_layer_is_its_junctions_least_squares(family):
    if family == "vit":
        net = network([vit(32, 2, depth=3, seed=1), vit(48, 3, depth=6, seed=2)], (3, 32, 32), two_way=True)
    else:
        net = network([cifar(20, 1), cifar(32, 2)], (3, 32, 32), two_way=True)
    torch.manual_seed(3)
    x = torch.randn(15, 3, 32, 32)
    report = fit_stitches(net, [x[:8], x[8:]], ridge=0.0)
    fit_images = x[[i for i in range(len(x)) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]]

    # every junction of every route: (front anchor, its last block) -> (back anchor, its first block - 1)
    junctions = {}
    for s in net.stitches:
        for a, b, key in zip(s.route, s.route[1:], s.layers):
            junctions.setdefault(key, set()).add(((a.anchor, a.last), (b.anchor, b.first - 1)))
    assert all(len(j) == 1 for j in junctions.values()), "SN-Netv2: one layer per direction and position"
    needed = {}
    for (((fa, fu), (ba, bu)),) in junctions.values():
        needed.setdefault(fa, set()).add(fu)
        needed.setdefault(ba, set()).add(bu)
    with torch.no_grad():
        feats = prefix_outputs(net.eval(), fit_images, needed)
    layouts = [info.layout for info in net.plan.infos]
    for key, (((fa, fu), (ba, bu)),) in junctions.items():
        X, Y = _rows(feats[(fa, fu)], layouts[fa]), _rows(feats[(ba, bu)], layouts[ba])
        theta = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), Y).solution
        layer = net.stitch_layers[key]
        scale = theta.abs().max()
        torch.testing.assert_close(layer.weight.double(), theta[:-1].T, rtol=0, atol=2e-4 * scale)
        torch.testing.assert_close(layer.bias.double(), theta[-1], rtol=0, atol=2e-4 * scale)

    # a route there and back is as good as its worse junction, each the junction of a one-way route
    one_way = {s.layers[0]: s.id for s in net.stitches if len(s.route) == 2}
    assert _three(net)
    for sid in _three(net):
        first, second = net.stitches[sid].layers
        assert report.r2[sid] == min(report.r2[one_way[first]], report.r2[one_way[second]])


def test_fitted_route_there_and_back_is_the_blocks_and_both_layers_by_hand():
    net = network([vit(32, 2, depth=3, seed=1), vit(48, 3, depth=6, seed=2)], (3, 32, 32), two_way=True)
    torch.manual_seed(4)
    fit_stitches(net, [torch.randn(10, 3, 32, 32)])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for sid in _three(net):
            torch.testing.assert_close(net.select(sid)(x), _by_hand_vit(net, sid, x), rtol=1e-5, atol=1e-5)


def test_route_statistics_and_shared_prefix_evaluation_there_and_back():
    net = network([cifar(20, 1), cifar(32, 2)], (3, 16, 16), two_way=True)   # 16 px: a quarter of the work
    torch.manual_seed(5)
    calib = torch.randn(24, 3, 16, 16)
    fit_stitches(net, [calib[:12], calib[12:]])
    calibrate_route_stats(net, [calib])   # one batch: each stitch's statistics are that batch's
    three = _three(net)
    for sid in (three[0], three[len(three) // 2], three[-1]):
        # the BatchNorms of all later segments run on the stitch's statistics, the third one's too
        s = net.stitches[sid]
        last = s.route[2]
        names = net.route_bn_names(s)
        units = net.adapters[last.anchor].units[last.first:last.last + 1]
        third = [n for n in names if any(n.startswith(f"anchors.{last.anchor}.{m}.") for u in units for m in u.modules)]
        assert third
        i = names.index(third[-1])
        assert not torch.allclose(net.route_stats[str(sid)].mean(i), net.get_submodule(third[-1]).running_mean)
        # by hand, for the third segment: the stitch's batch statistics (its BatchNorms in train mode,
        # momentum 1), the anchor's alone from the same block (the anchor run whole, those BatchNorms in
        # train mode), and the anchor's running statistics r: r + (stitch - anchor) x sqrt(r_var / anchor_var)
        probe = copy.deepcopy(net).eval()
        alone = copy.deepcopy(net.anchors[last.anchor]).eval()
        with torch.no_grad():
            for n in names:
                probe.get_submodule(n).train().momentum = 1.0
            probe.select(sid)(calib)          # writes into the probe's route statistics of this stitch
            for n in third:
                alone.get_submodule(n.split(".", 2)[2]).train().momentum = 1.0
            alone(calib)
        for n in third:
            i = names.index(n)
            mu_s, var_s = probe.route_stats[str(sid)].mean(i), probe.route_stats[str(sid)].var(i)
            a = alone.get_submodule(n.split(".", 2)[2])
            r = net.get_submodule(n)
            torch.testing.assert_close(net.route_stats[str(sid)].mean(i),
                                       r.running_mean + (mu_s - a.running_mean) * (r.running_var / a.running_var).sqrt(),
                                       rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(net.route_stats[str(sid)].var(i), var_s * r.running_var / a.running_var,
                                       rtol=1e-3, atol=1e-5)

    torch.manual_seed(6)
    x, y = torch.randn(20, 3, 16, 16), torch.randint(0, 10, (20,))
    res = evaluate_all(net, [(x[:8], y[:8]), (x[8:], y[8:])])
    net.eval()
    with torch.no_grad():
        for s in net.stitches:
            predicted = net.select(s.id)(x).argmax(-1)
            assert torch.equal(res.predictions[s.id], predicted), s.id
            assert res.top1[s.id] == 100.0 * float((predicted == y).sum()) / len(y)


# --- run folders: export of a route there and back, low-rank layers ---------------------------------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    torch.set_num_threads(1)   # module fixtures run before the per-test thread setting
    return make_family(tmp_path_factory.mktemp("cnn"), CNN)


def _fitted(folder: Path, family, stitch_rank: int | None = None) -> Path:
    """A two-way run of the family fitted as `python -m composer fit --two-way` does."""
    specs, train_dir, _ = family
    net = build_network(specs, None, stitch_rank=stitch_rank, two_way=True)
    ds = data.open_dataset(train_dir, data.data_config(net.anchors[0]))
    fit_stitches(net, (x for x, _ in data.loader(ds, 16)))
    calibrate_route_stats(net, (x for x, _ in data.loader(ds, 16)))
    save_fitted(folder, net, {"pretrained": None})
    return folder


@pytest.fixture(scope="module")
def two_way_run(family, tmp_path_factory):
    torch.set_num_threads(1)
    return _fitted(tmp_path_factory.mktemp("runs") / "two_way", family)


@pytest.fixture(scope="module")
def low_rank_run(family, tmp_path_factory):
    torch.set_num_threads(1)
    return _fitted(tmp_path_factory.mktemp("runs") / "low_rank", family, stitch_rank=2)


def test_cli_exports_a_route_there_and_back_that_loads_standalone(two_way_run, tmp_path, main):
    net = load_run(two_way_run).net.eval()
    sid = _three(net)[len(_three(net)) // 2]
    r = main("export", two_way_run, "--stitch", sid, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["route"]) == 3 and len(config["stitch_layers"]) == 2
    assert config["program"]["kind"] == "torch.export"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net.select(sid)(x)
        got = load_stitched(tmp_path / "out")(x)
        program = torch.export.load(tmp_path / "out" / "model.pt2").module()(x)
    assert (got - want).abs().max() <= 1e-5
    assert (program - want).abs().max() <= 1e-5


def test_low_rank_layers_start_as_the_fitted_ones(two_way_run, low_rank_run):
    full, low = load_run(two_way_run).net.eval(), load_run(low_rank_run).net.eval()
    assert json.loads((low_rank_run / "manifest.json").read_text())["stitch_rank"] == 2
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for s in full.stitches:
            assert torch.equal(full.select(s.id)(x), low.select(s.id)(x)), s.id
    # what training sees: only B, A and the bias, R (in + out) + out numbers per layer
    trained = {n: p for n, p in low.named_parameters() if n.startswith("stitch_layers.") and p.requires_grad}
    assert not any(n.endswith(".weight") for n in trained)
    assert sum(p.numel() for p in trained.values()) == sum(
        2 * (spec.in_channels + spec.out_channels) + spec.out_channels for spec in low.plan.layers.values())
    from composer.train import TrainConfig, _param_groups
    groups = _param_groups(low, TrainConfig(anchor_lr_scale=1.0, weight_decay=0.0))
    in_stitch_group = {id(p) for g in groups if g["name"].startswith("stitch") for p in g["params"]}
    assert {id(p) for p in trained.values()} <= in_stitch_group
    assert not any(id(layer.weight) in in_stitch_group for layer in low.stitch_layers.values())


@pytest.mark.slow   # trains two runs and exports twice: ~17 s
def test_low_rank_training_moves_only_the_update_and_bias_and_resumes_exactly(low_rank_run, family, tmp_path):
    before = load_run(low_rank_run).net.state_dict()
    runs = {}
    for name, stops in (("straight", [3]), ("resumed", [1, 3])):
        runs[name] = tmp_path / name
        shutil.copytree(low_rank_run, runs[name])
        for steps in stops:   # sampled stitches only (anchors frozen), so that every step trains a layer
            result = train(runs[name], family[1], small(steps=steps, stitch_layers_only=True, checkpoint_every=1),
                           eval_data=family[2])
            assert result["status"] == "done"
    after = load_run(runs["straight"]).net.state_dict()
    layers = {k for k in before if k.startswith("stitch_layers.")}
    changed = {k for k in layers if not torch.equal(before[k], after[k])}
    assert changed, "training moved no stitching layer"
    assert all(k.endswith((".lora_a", ".lora_b", ".bias")) for k in changed), changed
    assert any(k.endswith(".lora_b") for k in changed)
    resumed = load_run(runs["resumed"]).net.state_dict()
    for k in after:
        assert torch.equal(after[k], resumed[k]), k

    # exports merge W + B A into one matrix and compute what the SN-Net does
    net = load_run(runs["straight"]).net.eval()
    moved = {k.split(".")[1] for k in changed if k.endswith(".lora_b")}
    sid = next(s.id for s in net.stitches if set(s.layers) & moved)
    out = export_stitch(runs["straight"], sid, tmp_path / "stitch")
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    whole = export_snnet(runs["straight"], tmp_path / "whole")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net.select(sid)(x)
        assert (load_stitched(out)(x) - want).abs().max() <= 1e-5
        assert (load_snnet(whole).select(sid)(x) - want).abs().max() <= 1e-5


def test_cli_fit_two_way_low_rank_then_train_with_flops_gap_groups(family, tmp_path, main):
    specs, train_dir, val_dir = family
    run = tmp_path / "run"
    r = main("fit", *specs, "--two-way", "--stitch-rank", 2, "--data", train_dir, "--calib", 16, "--out", run,
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "low-rank" in r.stdout
    assert load_run(run).net.stitch_rank == 2
    r = main("train", run, "--data", train_dir, "--eval-data", val_dir, "--steps", 1, "--batch-size", 4,
             "--eval-limit", 4, "--sampling", "flops_gap", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: --macs-gap goes with --sampling flops_gap")
    r = main("train", run, "--data", train_dir, "--eval-data", val_dir, "--steps", 2, "--batch-size", 4,
             "--eval-limit", 4, "--sampling", "flops_gap", "--macs-gap", "2M", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "manifest.json").read_text())["train"]["config"]
    assert config["sampling"] == "flops_gap" and config["macs_gap"] == 2e6
    r = main("fit", *specs, "--stitch-rank", 0, "--data", train_dir, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "--stitch-rank" in r.stderr


# --- FLOPs-gap groups -----------------------------------------------------------------------------

def test_flops_gap_sampler_draws_macs_step_groups_each_equally_often():
    net = network([cifar(20, 1), cifar(56, 2)], (3, 32, 32), two_way=True)
    macs = [float(net.plan.cost(s).macs) for s in net.stitches]
    gap = (max(macs) - min(macs)) / 6
    groups = macs_step_groups(macs, gap)
    assert len(groups) >= 4 and len({len(g) for g in groups}) > 1   # unequal groups: not uniform over stitches
    sampler = StitchSampler(net, "flops_gap", groups=4, seed=0, gap=gap)
    assert sorted(map(sorted, sampler.groups)) == sorted(map(sorted, groups))
    group_of = {sid: i for i, g in enumerate(groups) for sid in g}
    n = 20000
    counts = Counter(group_of[sampler.pick(step)] for step in range(n))
    p = 1 / len(groups)
    se = math.sqrt(p * (1 - p) / n)
    for i in range(len(groups)):
        assert abs(counts[i] / n - p) < 4 * se, (i, counts[i] / n, p, se)

    with pytest.raises(TrainError, match="MACs gap"):
        StitchSampler(net, "flops_gap", groups=4, seed=0)


# --- the real CIFAR ResNets from the CLI -----------------------------------------------------------

@pytest.mark.slow   # fits, trains 3 steps, evaluates, draws and exports a ResNet-20 + ResNet-56 two-way run: ~1 min
def test_cli_two_way_run_on_the_cifar_resnets(tmp_path, main):
    from bench.cifar10 import cifar10_splits, cifar10_train, cifar_anchor_specs, missing_shared_reason
    if (reason := missing_shared_reason(train=True)):
        pytest.skip(reason)
    specs = cifar_anchor_specs()
    small_spec, large_spec = specs[0], specs[-1]   # ResNet-20 and ResNet-56
    test, train_dir = str(cifar10_splits().test), str(cifar10_train())
    r = main("plan", small_spec, large_spec, "--two-way", "--json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)["stitches"]
    assert len(planned) == 30 and sum(len(s["route"]) == 3 for s in planned) == 18
    run = tmp_path / "run"
    steps = [("fit", small_spec, large_spec, "--two-way", "--data", train_dir, "--calib", 32, "--out", run),
             ("train", run, "--data", train_dir, "--eval-data", test, "--steps", 3, "--batch-size", 16,
              "--eval-limit", 32),
             ("evaluate", run, "--data", test, "--limit", 64),
             ("curve", run, "--out", tmp_path / "curve.json")]
    for args in steps:
        r = main(*args, "--device", "cpu") if args[0] != "curve" else main(*args)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
    rows = json.loads((run / "evaluation.json").read_text())["stitches"]
    assert len(rows) == 30 and all(row["top1"] is not None for row in rows)
    assert json.loads((tmp_path / "curve.json").read_text())["pareto"]
    sid = next(row["id"] for row in rows if len(row["route"]) == 3)
    r = main("export", run, "--stitch", sid, "--out", tmp_path / "stitch")
    assert r.returncode == 0, r.stderr
    net = load_run(run).net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (load_stitched(tmp_path / "stitch")(x) - net.select(sid)(x)).abs().max() <= 1e-4
