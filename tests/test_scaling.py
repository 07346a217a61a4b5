"""Fast Scaling: the dWr rule, predicted costs of scaled models, filling a gap, latency R^2, CLI."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the CIFAR ResNets and starter ViTs)
from composer.run import read_candidates
from composer.costs import model_cost
from composer.plan import build_plan
from composer.run import load_anchors
from composer.builders.scaling import (LatencyPoint, ScaleConfig, ScaleError, base_config, build, dwr_factors, dwr_scale,
                              latency_fit, predict, suggest_fill, vit_heads)

CIFAR20 = ScaleConfig("cifar_resnet", "cifar_resnet20", (3, 3, 3), (16, 32, 64), 32, 10)


def _cpu(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kw).eval()


# --- the dWr rule ---------------------------------------------------------------------------

def test_dwr_rule_by_hand():
    # s = 4, alpha = 0.8: d = 4^0.1 = 1.149, w = 4^0.4 = 1.741, r = 4^0.05 = 1.072
    # depth 3 x 1.149 = 3.45 -> 3; widths 27.9 / 55.7 / 111.4 -> 24 / 56 / 112; res 34.3 -> 36
    assert dwr_scale(CIFAR20, 4) == replace(CIFAR20, widths=(24, 56, 112), resolution=36)
    # alpha = 0: depth and resolution only (d = 2, r = 4^0.25 = 1.414: 45.25 -> 44)
    assert dwr_scale(CIFAR20, 4, alpha=0) == replace(CIFAR20, depths=(6, 6, 6), resolution=44)
    # alpha = 1: width only (w = 2)
    assert dwr_scale(CIFAR20, 4, alpha=1) == replace(CIFAR20, widths=(32, 64, 128))
    # scaling down never goes below one block or one group of 8 channels
    tiny = dwr_scale(CIFAR20, 1e-4)
    assert min(tiny.depths) == 1 and min(tiny.widths) == 8 and tiny.resolution == 20


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_dwr_factors_multiply_to_s_and_round_like_pycls(alpha):
    previous = None
    for s in [0.3, 0.7, 1.0, 1.3, 2.0, 3.1, 8.0]:
        d, w, r = dwr_factors(s, alpha)
        assert d * w * w * r * r == pytest.approx(s)
        assert w == pytest.approx(s ** (alpha / 2)) and r * r == pytest.approx(d)
        c = dwr_scale(CIFAR20, s, alpha)
        assert all(x % 8 == 0 for x in c.widths) and c.resolution % 4 == 0 and min(c.depths) >= 1
        if previous is not None:   # more MACs never means a smaller depth, width or resolution
            assert all(a >= b for a, b in zip(c.depths + c.widths, previous.depths + previous.widths))
            assert c.resolution >= previous.resolution
        previous = c
    assert dwr_scale(CIFAR20, 1.0, alpha) == CIFAR20


@pytest.mark.parametrize("s, alpha, match", [(0, 0.8, "positive"), (-2, 0.8, "positive"), (math.nan, 0.8, "positive"),
                                             (math.inf, 0.8, "positive"), (2, 1.5, "alpha"), (2, -0.1, "alpha")])
def test_bad_factor_or_alpha(s, alpha, match):
    with pytest.raises(ScaleError, match=match):
        dwr_scale(CIFAR20, s, alpha)


# --- predicted costs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, size", [("cifar_resnet20", {}, 32), ("resnet18", {}, 224),
                                            ("starter_vit_tiny", {}, 16),
                                            ("deit_tiny_patch16_224", dict(img_size=32, depth=2), 32)])
def test_unscaled_config_predicts_the_real_model(name, kw, size):
    """Config read from a real (CPU) model, rebuilt on the meta device: the same counts."""
    model = _cpu(name, **kw)
    config = base_config(model)
    assert config.resolution == size
    assert predict(config) == model_cost(model, (3, size, size))


def test_cifar_depth_scaling_gives_the_real_resnet56():
    assert predict(replace(CIFAR20, depths=(9, 9, 9))) == model_cost(_cpu("cifar_resnet56"))


def _cifar_counts(c: ScaleConfig) -> tuple[int, int, int]:
    """MACs, params, activations of a CIFAR ResNet config, by hand: 3x3 convs without bias,
    BN (2 params per channel), linear with bias; k^2 w_in w_out h w MACs per conv (pycls)."""
    macs = params = acts = 0
    h = c.resolution

    def conv(cin, cout, size):
        nonlocal macs, params, acts
        macs += 9 * cin * cout * size * size
        params += 9 * cin * cout + 2 * cout
        acts += cout * size * size

    conv(3, c.widths[0], h)
    cin = c.widths[0]
    for i, (n, w) in enumerate(zip(c.depths, c.widths)):
        if i:
            h = (h - 1) // 2 + 1          # 3x3, stride 2, padding 1
        for _ in range(n):
            conv(cin, w, h)
            conv(w, w, h)
            cin = w
    macs += cin * c.num_classes + c.num_classes     # bias: 1 MAC per output (pycls)
    params += cin * c.num_classes + c.num_classes
    acts += c.num_classes
    return macs, params, acts


@pytest.mark.parametrize("config", [dwr_scale(CIFAR20, 2.0), dwr_scale(CIFAR20, 0.6),
                                    replace(CIFAR20, depths=(2, 4, 1), widths=(8, 24, 40), resolution=36)])
def test_scaled_cifar_resnet_counts_by_hand_and_runs(config):
    cost = predict(config)
    assert (cost.macs, cost.params, cost.activations) == _cifar_counts(config)
    model = build(config, "cpu")
    x = torch.randn(2, 3, config.resolution, config.resolution)
    assert model(x).shape == (2, 10)
    # widths that do not double (24 -> 40): option A's zero padding spread over both sides
    block = model.layer3[0]
    feat = torch.randn(1, config.widths[1], 8, 8)
    padded = torch.zeros(1, config.widths[2], 4, 4)
    lo = (config.widths[2] - config.widths[1]) // 2
    padded[:, lo:lo + config.widths[1]] = feat[:, :, ::2, ::2]
    assert torch.equal(block.shortcut(feat), padded)


def test_scaled_vit_keeps_head_size_and_tiles_patches():
    with torch.device("meta"):
        base = base_config(timm.create_model("deit_tiny_patch16_224", img_size=48, depth=3))
    assert (base.widths, base.head_dim, base.patch, base.resolution) == ((192,), 64, 16, 48)
    c = dwr_scale(base, 3.0, alpha=0.6)    # r = 3^0.1: 48 x 1.116 = 53.6 -> 48, a multiple of 16 (not 52 or 56)
    assert c.resolution == 48
    assert c.resolution % 16 == 0 and c.widths[0] % 8 == 0
    heads = vit_heads(c.widths[0], 64)
    assert c.widths[0] % heads == 0 and abs(c.widths[0] / heads - 64) <= 32
    model = build(c, "cpu")
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (c.depths[0], c.widths[0], heads)
    assert model.pos_embed.shape[1] == (c.resolution // 16) ** 2 + 1
    # counted on the meta device = counted on real tensors (attention included)
    assert predict(c) == model_cost(model, (3, c.resolution, c.resolution))
    assert predict(c).macs > 2 * predict(base).macs


def test_family_that_cannot_be_built_from_a_config():
    with torch.device("meta"):
        model = timm.create_model("convnext_atto")
    with pytest.raises(ScaleError, match="CIFAR ResNets, timm ResNets, timm ViTs"):
        base_config(model)
    with pytest.raises(ScaleError, match="3 stage"):
        build(replace(CIFAR20, depths=(3, 3)))
    with pytest.raises(ScaleError, match="patch size"):
        build(ScaleConfig("vit", "deit_tiny_patch16_224", (2,), (64,), 40, 10, head_dim=32, patch=16))


# --- filling the biggest gap -----------------------------------------------------------------

@pytest.mark.slow   # ~13 s
def test_suggest_fill_on_the_cifar_resnets():
    with torch.device("meta"):   # architecture only; counts equal the real models' (tested above)
        bases = [base_config(timm.create_model(f"cifar_resnet{d}")) for d in (20, 32, 44, 56)]
    macs = [predict(b).macs for b in bases]
    fill = suggest_fill(bases)
    # 20 -> 32 is the biggest MACs ratio (1.70x; the others are 1.41x and 1.29x)
    assert fill.gap == (0, 1)
    target = math.sqrt(macs[0] * macs[1])
    assert fill.target_macs == pytest.approx(target)
    assert macs[0] < fill.cost.macs < macs[1]
    assert fill.cost == predict(fill.config) and fill.config == dwr_scale(bases[fill.base], fill.s)
    # no s on a fine grid, from either anchor, lands nearer the middle
    miss = abs(math.log(fill.cost.macs / target))
    for i in (0, 1):
        for s in np.geomspace(macs[0] / macs[i], macs[1] / macs[i], 12):
            assert miss <= abs(math.log(predict(dwr_scale(bases[i], s)).macs / target)) + 1e-12
    # the curve's own MACs decide the gap: make 44 -> 56 the biggest one
    fill = suggest_fill(bases, macs=[1.0e6, 1.2e6, 1.4e6, 125e6])
    assert fill.gap == (2, 3)
    with pytest.raises(ScaleError, match="two anchors"):
        suggest_fill(bases[:1])


# --- which cost predicts latency ---------------------------------------------------------------

def test_latency_fit_r2_against_correlation():
    rng = np.random.default_rng(0)
    macs = rng.integers(10**6, 10**8, 30)
    acts = rng.integers(10**4, 10**6, 30)
    lat = 3e-6 * acts + 1e-8 * macs + rng.normal(0, 0.2, 30) + 1.0
    pts = [LatencyPoint(str(i), int(m), int(a), float(t)) for i, (m, a, t) in enumerate(zip(macs, acts, lat))]
    fit = latency_fit(pts)
    # R^2 of a least-squares line equals the squared Pearson correlation
    assert fit.r2_macs == pytest.approx(np.corrcoef(macs, lat)[0, 1] ** 2)
    assert fit.r2_activations == pytest.approx(np.corrcoef(acts, lat)[0, 1] ** 2)
    assert fit.line_activations == pytest.approx(tuple(np.polyfit(acts, lat, 1)))
    assert fit.n == 30 and fit.better == "activations"
    exact = [LatencyPoint(p.label, p.macs, p.activations, 2.0 * p.macs + 5.0) for p in pts]
    assert latency_fit(exact).r2_macs == pytest.approx(1.0) and latency_fit(exact).better == "MACs"


def test_latency_fit_refuses_what_cannot_be_fitted():
    pts = [LatencyPoint("a", 1, 1, 1.0), LatencyPoint("b", 2, 2, 2.0)]
    with pytest.raises(ScaleError, match="at least 3"):
        latency_fit(pts)
    with pytest.raises(ScaleError, match="same latency"):
        latency_fit([LatencyPoint(str(i), i, i, 1.0) for i in range(3)])
    with pytest.raises(ScaleError, match="same macs"):
        latency_fit([LatencyPoint(str(i), 7, i, float(i)) for i in range(3)])


# --- CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan():
    _, infos = load_anchors(["cifar_resnet20", "cifar_resnet32"], pretrained=False, device="meta")
    return build_plan(infos)


def _write_run(run: Path, plan, top1: dict[int, float] | None = None) -> Path:
    """A run folder as `fit` + `evaluate` leave it (no weights: costs need none)."""
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"anchors": plan.anchors, "pretrained": False}))
    plan.save(run / "plan.json")
    top1 = top1 or {s.id: 50.0 + s.id for s in plan.stitches}
    rows = [{"id": s.id, "top1": top1[s.id]} for s in plan.stitches]
    (run / "evaluation.json").write_text(json.dumps({"data": "x", "images": 10, "stitches": rows}))
    return run


def test_cli_scale_factor_and_fill(plan, tmp_path, main):
    run = _write_run(tmp_path / "run", plan)
    r = main("scale", run, "--factor", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = dwr_scale(CIFAR20, 2)
    assert out["config"] == expected.to_dict() and out["predicted"] == predict(expected).to_dict()
    [cand] = read_candidates(run)
    assert (cand.method, cand.status, cand.top1, cand.macs) == ("scale", "predicted", None, predict(expected).macs)

    r = main("scale", run, "--fill", "--alpha", 0.5, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert plan.infos[0].total.macs < out["predicted"]["macs"] < plan.infos[1].total.macs
    assert len(read_candidates(run)) == 2

    # the curve lists the predicted candidates (no accuracy: listed, not drawn, never on the front)
    r = main("curve", run, "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert "0 of 2 candidates drawn" in r.stdout
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [c["top1"] for c in rows["candidates"]] == [None, None]
    assert rows["candidates"][0]["x"] == pytest.approx(predict(expected).macs / 1e6)
    assert all(isinstance(i, int) for i in rows["pareto"])

    r = main("scale", run, "--factor", 1.5)   # the human-readable form
    assert r.returncode == 0 and "predicted" in r.stdout and "->" in r.stdout


def test_cli_scale_bad_input_is_one_line(plan, tmp_path, main):
    run = _write_run(tmp_path / "run", plan)
    for args, match in [(["--factor", 0], "positive"), (["--factor", -1], "positive"),
                        (["--factor", 2, "--alpha", 3], "alpha"), (["--factor", 2, "--anchor", 5], "does not exist"),
                        (["--factor", "1e300"], "between 0.01 and 100"), (["--factor", "nan"], "finite")]:
        r = main("scale", run, *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert match in r.stderr
    _, infos = load_anchors(["convnext_atto", "convnext_femto"], pretrained=False, device="meta")
    other = _write_run(tmp_path / "convnext", build_plan(infos, points=[[[0, 0], [1, 1]]]))
    r = main("scale", other, "--fill")
    assert r.returncode == 2 and "CIFAR ResNets, timm ResNets, timm ViTs" in r.stderr
    assert read_candidates(run) == [] and read_candidates(other) == []


def test_cli_latency_fit_reads_then_measures(plan, tmp_path, main):
    run = _write_run(tmp_path / "run", plan)
    ms = {s.id: 0.5 + s.id * 0.1 for s in plan.stitches}
    (run / "latency.json").write_text(json.dumps({"ms": {str(k): v for k, v in ms.items()}}))
    r = main("latency-fit", run, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    lat = [ms[s.id] for s in plan.stitches]
    assert out["n"] == len(plan.stitches)
    assert out["r2_macs"] == pytest.approx(np.corrcoef([plan.cost(s).macs for s in plan.stitches], lat)[0, 1] ** 2)
    assert out["r2_activations"] == pytest.approx(
        np.corrcoef([plan.cost(s).activations for s in plan.stitches], lat)[0, 1] ** 2)

    # a run without latency: every stitch is timed (on the fitted network), saved, then fitted
    from composer.run import build_network, save_fitted
    fitted = tmp_path / "fitted"
    net = build_network(["cifar_resnet20", "cifar_resnet32"], pretrained=False, points=[[[0, 1], [1, 2]]])
    save_fitted(fitted, net, {"pretrained": False})
    r = main("latency-fit", fitted, "--repeats", 2)
    assert r.returncode == 0, r.stderr
    saved = json.loads((fitted / "latency.json").read_text())["ms"]
    assert sorted(map(int, saved)) == [0, 1, 2] and all(v > 0 for v in saved.values())
    assert "through 3 points" in r.stdout and "latency ~ activations" in r.stdout

    r = main("latency-fit", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.startswith("error:")
