"""Anchors at their own input sizes (`--resolution native`, issue 14): a route takes its first
anchor's resolution and each stitching layer resamples onto the next anchor's grid.

Anchors are random-weight CIFAR ResNets (ResNet-20 at 32 px, ResNet-32 as if trained at 40 px);
every check is against an independent computation: the blocks run by hand with F.interpolate,
a float64 lstsq on resampled features, the anchors' own costs at their own sizes.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo.cifar_resnet  # noqa: F401  (registers the CIFAR ResNets with timm)
from composer.cli import main
from composer.costs import describe, model_cost
from composer.curve import curve_figure
from composer.export import load_stitched, route_of
from composer.fit import HOLDOUT_EVERY, fit_stitches
from composer.plan import PlanError, build_plan
from composer.snnet import StitchedNetwork, prefix_outputs
from tests.engine_models import cifar, mixed_size_cifar_zoo
from zoo.adapters import adapt

SIZES = (32, 40)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _native_net() -> StitchedNetwork:
    models = [cifar(20, 1), cifar(32, 2)]
    infos = [describe(f"m{i}", adapt(m), (3, n, n)) for i, (m, n) in enumerate(zip(models, SIZES))]
    plan = build_plan(infos)
    return StitchedNetwork([{"m0": models[0], "m1": models[1]}[n] for n in plan.anchors], plan)


def _bilinear(x: torch.Tensor, n: int) -> torch.Tensor:
    return F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False, antialias=n < x.shape[-1])


def _route_by_hand(net: StitchedNetwork, sid: int, x: torch.Tensor) -> torch.Tensor:
    """Resize the images to the first anchor's size, its blocks, the 1x1 map, bilinear onto the back
    anchor's grid, the back anchor's blocks and head: timm's modules called one by one."""
    (f, b), (key,) = net.stitches[sid].route, net.stitches[sid].layers
    front, back = net.anchors[f.anchor], net.anchors[b.anchor]
    h = _bilinear(x, SIZES[0] if f.anchor == 0 else SIZES[1])
    h = F.relu(front.bn1(front.conv1(h)))
    blocks = [blk for stage in (front.layer1, front.layer2, front.layer3) for blk in stage]
    for blk in blocks[:f.last + 1]:
        h = blk(h)
    layer = net.stitch_layers[key]
    h = F.conv2d(h, layer.weight[:, :, None, None], layer.bias)
    grid = net.plan.infos[b.anchor].in_shapes[b.first][1:]
    h = F.interpolate(h, size=grid, mode="bilinear", align_corners=False, antialias=h.shape[-1] > grid[-1])
    blocks = [blk for stage in (back.layer1, back.layer2, back.layer3) for blk in stage]
    with net.route_statistics(net.stitches[sid]):
        for blk in blocks[b.first:]:
            h = blk(h)
        return back.linear(h.mean(dim=(2, 3)))


def test_plan_stitches_different_grids_and_counts_each_anchor_at_its_own_size():
    net = _native_net()
    plan = net.plan
    assert plan.native_resolution and net.input_anchor == 1      # images come at the larger size, 40 px
    grids = {(plan.infos[s.route[0].anchor].out_shapes[s.route[0].last][1:],
              plan.infos[s.route[1].anchor].in_shapes[s.route[1].first][1:]) for s in plan.stitches if not s.is_anchor}
    assert any(a != b for a, b in grids), "stitches join 32-px grids to 40-px grids"
    for i, n in enumerate(SIZES):   # anchors' costs: the models alone at their own sizes
        assert plan.cost(i).macs == model_cost(net.anchors[i], (3, n, n)).macs
    # at one size the same anchors agree on every grid, and the plan does not resample
    same = build_plan([describe(f"m{i}", adapt(m), (3, 32, 32)) for i, m in enumerate(net.anchors)])
    assert not same.native_resolution
    # the curve says at which sizes the routes ran
    top1 = {s.id: 50.0 + s.id for s in plan.stitches}
    assert "each route at its first anchor's size (32x32, 40x40 px)" in curve_figure(plan, top1).layout.xaxis.title.text
    assert "at 32x32 px" in curve_figure(same, top1).layout.xaxis.title.text


def test_routes_equal_the_blocks_and_bilinear_resampling_by_hand():
    net = _native_net().eval()
    torch.manual_seed(0)
    fit_stitches(net, [torch.randn(10, 3, 40, 40)])
    x = torch.randn(3, 3, 40, 40)
    crossing = [s.id for s in net.stitches if not s.is_anchor]
    assert crossing
    with torch.no_grad():
        for sid in crossing:
            torch.testing.assert_close(net.select(sid)(x), _route_by_hand(net, sid, x), rtol=1e-5, atol=1e-5)
        # an anchor's own route: the model on images resized to its own size
        torch.testing.assert_close(net.select(0)(x), net.anchors[0](_bilinear(x, 32)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.select(1)(x), net.anchors[1](x), rtol=1e-5, atol=1e-5)


def test_each_layer_is_the_least_squares_of_resampled_front_features():
    net = _native_net().eval()
    torch.manual_seed(3)
    x = torch.randn(15, 3, 40, 40)
    fit_stitches(net, [x[:8], x[8:]], ridge=0.0)
    fit_images = x[[i for i in range(len(x)) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]]
    checked = 0
    for s in net.stitches:
        if s.is_anchor:
            continue
        f, b = s.route
        with torch.no_grad():
            feats = prefix_outputs(net, fit_images, {f.anchor: {f.last}, b.anchor: {b.first - 1}})
        Y = feats[(b.anchor, b.first - 1)]
        X = feats[(f.anchor, f.last)]
        if X.shape[-1] != Y.shape[-1]:
            X = F.interpolate(X, size=Y.shape[-2:], mode="bilinear", align_corners=False, antialias=X.shape[-1] > Y.shape[-1])
            checked += 1
        X, Y = (t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double() for t in (X, Y))
        theta = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), Y).solution
        layer, scale = net.stitch_layers[s.layers[0]], theta.abs().max()
        torch.testing.assert_close(layer.weight.double(), theta[:-1].T, rtol=0, atol=2e-4 * scale)
        torch.testing.assert_close(layer.bias.double(), theta[-1], rtol=0, atol=2e-4 * scale)
    assert checked, "some stitches cross grids"


# --- the CLI: plan, fit, train, evaluate, export ---------------------------------------------------

def test_plan_efficientnets_each_at_its_own_size_offline(capsys):
    assert main(["plan", "efficientnet_b0", "efficientnet_b1", "--resolution", "native", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_sizes"] == [[3, 224, 224], [3, 240, 240]] and len(out["stitches"]) > 2
    b1 = timm.create_model("efficientnet_b1", pretrained=False)
    assert out["stitches"][1]["macs"] == model_cost(b1, (3, 240, 240)).macs   # B1 counted at 240, not 224
    with pytest.raises(SystemExit) as refused:   # argparse's own error, one line
        main(["plan", "efficientnet_b0", "efficientnet_b1", "--resolution", "natve"])
    assert refused.value.code == 2
    assert "'native' (each anchor at its own size) or a whole number" in capsys.readouterr().err


@pytest.fixture
def family(tmp_path):
    return mixed_size_cifar_zoo(tmp_path)


def test_cli_native_run_fits_trains_evaluates_and_exports_at_each_size(family, tmp_path, capsys):
    from composer.run import load_run, read_manifest
    specs, data = family
    run = tmp_path / "RUN"
    fit = ["fit", *specs, "--data", str(data), "--calib", "12", "--batch-size", "4", "--out", str(run), "--device", "cpu"]
    assert main(fit) == 2 and "disagree on preprocessing" in capsys.readouterr().err
    assert main(fit + ["--resolution", "native"]) == 0
    manifest = read_manifest(run)
    assert manifest["resolution"] == "native" and manifest["data_config"]["input_size"] == [3, 40, 40]
    # fine-tune two steps with distillation from the original anchors (each teacher at its own size)
    assert main(["train", str(run), "--data", str(data), "--steps", "2", "--batch-size", "4", "--distill", "anchors",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(data), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12

    net = load_run(run).net.eval()
    assert net.plan.native_resolution
    sid = next(s.id for s in net.stitches if not s.is_anchor and s.route[0].anchor == 0)
    out = tmp_path / "stitch"
    assert main(["export", str(run), "--stitch", str(sid), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preprocessing"]["input_size"] == [3, 32, 32]        # its first anchor's size
    assert "its own input size" in (out / "README.md").read_text()
    module = load_stitched(out)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():   # the exported route on images at 32 px = the SN-Net's route on the 40-px images
        torch.testing.assert_close(module(_bilinear(x, 32)), net.select(sid)(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(route_of(net, sid)[0](_bilinear(x, 32)), net.select(sid)(x), rtol=1e-4, atol=1e-5)


def test_stitching_tokens_of_different_counts_is_still_refused():
    """Resampling is for feature maps: ViT tokens at two sizes have no grid to resample onto."""
    from tests.engine_models import vit
    a, b = vit(32, 2, depth=2, seed=1), vit(48, 3, depth=2, seed=2)
    infos = [describe("m0", adapt(a), (3, 32, 32))]
    b.patch_embed.img_size, b.patch_embed.grid_size = (48, 48), (6, 6)
    b.patch_embed.num_patches = 36
    b.pos_embed = torch.nn.Parameter(torch.zeros(1, 37, 48))
    infos.append(describe("m1", adapt(b), (3, 48, 48)))
    with pytest.raises(PlanError, match="token counts differ"):
        build_plan(infos)


def test_app_opens_a_family_of_mixed_sizes_each_at_its_own_and_fits_it(family, tmp_path):
    """The app has no size to choose for a newcomer: a family whose members were trained at
    different sizes opens with each at its own (the one way that keeps every member as trained);
    the plan's message and the curve's axis say so, and the run is fitted that way."""
    from composer.run import read_manifest
    from composer.ui.session import AppConfig, Session
    specs, data = family
    config = AppConfig(runs_root=tmp_path / "runs", exports_dir=tmp_path / "exports", data_roots=[data],
                       model_roots=[tmp_path], eval_limit=12)
    s = Session("native-resolution-session-key", config)
    s.custom_family(", ".join(specs))
    s.choose_family("custom")
    assert sorted(r["resolution"] for r in s.members()) == ["32x32", "40x40"]
    assert s.plan.native_resolution and "32x32, 40x40 px" in s.message and "stitching layers resample" in s.message
    s.fit(str(data), calib=12, eval_images=12)
    assert read_manifest(s.run_dir)["resolution"] == "native"
    assert set(s.top1) == {st.id for st in s.plan.stitches}
    assert "each route at its first anchor's size" in s.curve_figure().layout.xaxis.title.text
