"""composer.builders.elastic: rank correlation, predictor, search under budgets, measured candidates that
rebuild, exports that load, and the `elastic` CLI on a tiny run."""
import json
import random

import numpy as np
import pytest
import timm
import torch
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets and starter ViTs)
from composer.builders import elastic as el
from composer.candidates import CandidateError
from composer.run import read_candidates
from composer.costs import model_cost
from composer.builders.subnet import SubnetConfig, config_masks, extract, masked, subnet_cost
from zoo.adapters import UnsupportedModel

VIT_ARGS = {"img_size": 32, "depth": 3, "num_classes": 10}


@pytest.fixture(scope="module")
def cifar_anchor():
    torch.manual_seed(0)
    return el.prepare_anchor(timm.create_model("cifar_resnet20", pretrained=False), "cifar_resnet20")


@pytest.fixture(scope="module")
def vit_anchor():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **VIT_ARGS)
    return el.prepare_anchor(model, "deit_tiny_patch16_224", input_size=(3, 32, 32), model_args=VIT_ARGS)


def _batches(input_size, n_batches=2, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *input_size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


# --- rank correlation and predictor -------------------------------------------------------------------

def _spearman_by_hand(a, b) -> float:
    """Pearson correlation of average ranks (tied values share the mean of their positions), numpy only."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2 + 1
            i = j + 1
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _out_of_fold_rho(space, samples, kind, seed=0, folds=5) -> float:
    """A search's reported rank correlation, recomputed from its measured samples: each one predicted by
    a predictor fitted on the other folds (the library's seeded split), then Spearman by hand."""
    archs = [el.Arch(tuple(s["arch"]["depth"]), tuple(s["arch"]["width"])) for s in samples]
    x = el.encode(space, archs)
    y = torch.tensor([s["top1"] for s in samples], dtype=torch.float64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    pred = torch.empty(len(y), dtype=torch.float64)
    for f in range(folds):
        test = perm[f::folds]
        train = torch.cat([perm[g::folds] for g in range(folds) if g != f])
        pred[test] = el.fit_predictor(x[train], y[train], kind, seed)(x[test])
    return _spearman_by_hand(pred.numpy(), y.numpy())


def test_spearman_matches_known_values_and_handles_ties():
    # Wikipedia's worked example (IQ vs hours of TV): rho = -29/165
    iq = [106, 100, 86, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 27, 2, 50, 28, 29, 20, 12, 6, 17]
    assert el.spearman(iq, tv) == pytest.approx(-29 / 165, abs=1e-12)
    assert _spearman_by_hand(iq, tv) == pytest.approx(-29 / 165, abs=1e-12)   # the helper the tests below use
    assert _spearman_by_hand([1.0, 2.0, 2.0, 5.0], [0, 1, 2, 3]) == pytest.approx(el.spearman([1.0, 2.0, 2.0, 5.0], [0, 1, 2, 3]))
    assert el.spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)   # monotone, not linear
    # ties take their average rank: ranks of a are 1, 2.5, 2.5, 4, of b 1, 2, 3, 4
    a, b = [1.0, 2.0, 2.0, 5.0], [0.0, 1.0, 2.0, 3.0]
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert el.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    assert np.isnan(el.spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("kind", ["ridge", pytest.param("mlp", marks=pytest.mark.slow)])   # mlp: 500 Adam steps per fold, ~7 s
def test_predictor_ranks_held_out_points_of_a_learnable_function(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 8, generator=g, dtype=torch.float64)
    y = 50 + 20 * x[:, 0] + 10 * x[:, 1] - 5 * x[:, 2] + 0.3 * torch.randn(60, generator=g, dtype=torch.float64)
    assert el.cv_rank_correlation(x, y.tolist(), kind, seed=1) > 0.85
    # out-of-fold means out of fold: a predictor that memorised would still be scored on unseen rows
    assert el.cv_rank_correlation(torch.rand(30, 8, dtype=torch.float64), torch.rand(30).tolist(), kind) < 0.6
    p = el.fit_predictor(x, y.tolist(), kind)
    assert (p(x) - y).abs().mean() < 2.5
    with pytest.raises(el.ElasticError, match="at least 3"):
        el.fit_predictor(x[:2], y[:2].tolist(), kind)


# --- architectures and search -------------------------------------------------------------------------

def test_sampled_archs_are_distinct_valid_and_seeded(cifar_anchor):
    space = cifar_anchor.space
    archs = el.sample_archs(space, 25, seed=3)
    assert len(set(archs)) == 25 and archs == el.sample_archs(space, 25, seed=3)
    assert archs[0] == el.largest_arch(space) and archs[1] == el.smallest_arch(space)
    for a in archs:
        assert all(1 <= d <= 3 for d in a.depth) and set(a.width) <= set(el.WIDTH_CHOICES)
    macs = sorted(el.arch_cost(space, a).macs for a in archs)   # spread over the whole MACs range
    assert max(b - a for a, b in zip(macs, macs[1:])) < 0.2 * (macs[-1] - macs[0])
    # kept counts round half up and never reach zero; the full fraction gives the full model
    assert [el.kept_units(16, f) for f in el.WIDTH_CHOICES] == [4, 8, 12, 16]
    assert [el.kept_units(3, f) for f in el.WIDTH_CHOICES] == [1, 2, 2, 3]
    assert el.largest_arch(space).config(space) == space.full_config()
    x = el.encode(space, archs)
    assert x.shape == (25, 9 * 2 + 3 + 1) and x[0, -1] == 1.0 and x[1, -1] < 0.2


def test_evolutionary_search_stays_under_budget_and_beats_random_sampling(cifar_anchor):
    space = cifar_anchor.space
    weights = torch.linspace(1, 2, len(space.dims()), dtype=torch.float64)

    def predict(archs):   # a known objective: weighted kept width of the blocks that run
        out = []
        for a in archs:
            kept = space.kept_blocks(a.config(space))
            out.append(sum(w * f * kept[d.block] for w, f, d in zip(weights.tolist(), a.width, space.dims())))
        return torch.tensor(out)

    cost = el.budget_cost(space, "macs")
    budget = 0.5 * cost(el.largest_arch(space))
    res = el.evolutionary_search(space, predict, budget, cost, population=32, generations=15, seed=0)
    assert res.cost <= budget and res.cost == subnet_cost(space, res.arch.config(space)).macs
    assert res.predicted == pytest.approx(float(predict([res.arch])[0]))
    rnd = random.Random(0)
    feasible = [a for a in (el._random_arch(space, rnd, el.WIDTH_CHOICES) for _ in range(800)) if cost(a) <= budget]
    assert res.predicted >= float(predict(feasible).max())
    # activations budgets work alike; a budget below the smallest sub-network is refused
    act = el.budget_cost(space, "activations")
    res = el.evolutionary_search(space, predict, 0.6 * act(el.largest_arch(space)), act, population=16, generations=3)
    assert res.cost <= 0.6 * act(el.largest_arch(space))
    with pytest.raises(el.ElasticError, match="below the smallest"):
        el.check_budget(space, "macs", cost(el.smallest_arch(space)) - 1, None)
    with pytest.raises(el.ElasticError, match="latency table"):
        el.budget_cost(space, "latency")


# --- measuring ----------------------------------------------------------------------------------------

def test_evaluate_subnets_equals_masked_full_model(cifar_anchor):
    """Independent of extract: the masked full model (0/1 masks) predicts the same classes."""
    space, model = cifar_anchor.space, cifar_anchor.model
    batches = _batches(space.input_size)
    archs = el.sample_archs(space, 4, seed=1)
    got = el.evaluate_subnets(cifar_anchor, [a.config(space) for a in archs], batches)
    for a, acc in zip(archs, got):
        cfg, kept = a.config(space), space.kept_blocks(a.config(space))
        masks = {k: (torch.arange(space.dim(k).size) < n).float() for k, n in cfg.widths.items()}
        with torch.no_grad(), masked(model, space, masks.get, lambda b: None if kept[b] else torch.tensor(0.0)):
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
        assert acc == pytest.approx(100 * correct / 16)


def test_recalibrated_bn_statistics_are_those_of_the_images(cifar_anchor):
    x = torch.randn(12, 3, 32, 32)
    sub = extract(cifar_anchor.model, cifar_anchor.space, SubnetConfig([2, 2, 2]))
    el.recalibrate_bn(sub, [x])
    with torch.no_grad():
        feat = sub.conv1(x)             # what the first BN sees: by hand
    assert torch.allclose(sub.bn1.running_mean, feat.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(sub.bn1.running_var, feat.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert sub.bn1.momentum == 0.1 and not sub.training
    before = cifar_anchor.model.bn1.running_mean.clone()
    el.build_subnet(cifar_anchor, SubnetConfig([1, 1, 1]), [x])
    assert torch.equal(cifar_anchor.model.bn1.running_mean, before)   # the anchor is untouched


def test_latency_table_has_every_block_and_choice(vit_anchor):
    table = el.latency_table(vit_anchor, choices=(0.5, 1.0), repeats=1)
    assert len(table.blocks) == 3 * 4 and all(v > 0 for v in table.blocks.values()) and table.rest_ms >= 0
    for b in range(3):   # narrower is never slower, whatever the machine's load did to one timing
        t = {w: table.blocks[f"{b}:{w}"] for w in ("0.5,0.5", "0.5,1", "1,0.5", "1,1")}
        assert t["0.5,0.5"] <= min(t["0.5,1"], t["1,0.5"]) and max(t["0.5,1"], t["1,0.5"]) <= t["1,1"]
    space = vit_anchor.space
    arch = el.Arch((2,), (0.5, 1.0) * 3)
    want = table.rest_ms + table.blocks["0:0.5,1"] + table.blocks["1:0.5,1"]
    assert table.predict(space, arch) == pytest.approx(want)
    with pytest.raises(el.ElasticError, match="measured for widths"):
        table.predict(space, el.Arch((3,), (0.25,) * 6))


# --- the builder, candidates and export ---------------------------------------------------------------

def _agreement(model, batches):
    """Label images with the full model's own predictions: sub-networks then score their agreement
    with it, which varies with the architecture (random labels would give every one ~10 %)."""
    with torch.no_grad():
        return [(x, model(x).argmax(-1)) for x, _ in batches]


@pytest.mark.slow   # ~10 s
def test_search_elastic_measures_candidates_that_rebuild(vit_anchor):
    anchor, space = vit_anchor, vit_anchor.space
    batches = _agreement(anchor.model, _batches(space.input_size, 1, 32, seed=1))
    eval_batches = _agreement(anchor.model, _batches(space.input_size, seed=2))
    full = el.arch_cost(space, el.largest_arch(space)).macs
    res = el.search_elastic(anchor, batches, eval_batches, None, [("macs", 0.6 * full), ("macs", 0.3 * full)],
                            samples=12, population=12, generations=2)
    assert len(res.samples) == 12 and len({s["top1"] for s in res.samples}) > 1
    assert res.rank_correlation == pytest.approx(_out_of_fold_rho(space, res.samples, "mlp"), abs=1e-9)
    assert res.samples[0]["top1"] == 100.0 and res.samples[0]["macs"] == full   # the largest agrees with itself
    assert [c.method for c in res.candidates] == ["elastic"] * 2
    for c, budget in zip(res.candidates, (0.6 * full, 0.3 * full)):
        assert c.status == "measured" and c.macs <= budget and c.source == "deit_tiny_patch16_224"
        cfg = SubnetConfig.from_dict(c.config["subnet"])
        sub = el.build_subnet(anchor, cfg)
        assert model_cost(sub, space.input_size).macs == c.macs and sum(p.numel() for p in sub.parameters()) == c.params
        assert el.top1(sub, eval_batches) == pytest.approx(c.top1)
        # kept as the best measured on the search images of the predicted-best few
        assert el.top1(sub, batches) == pytest.approx(c.config["search_top1"]) and c.config["checked"] == 3
        json.dumps(c.to_dict())
    with pytest.raises(el.ElasticError, match="below the smallest"):
        el.search_elastic(anchor, batches, budgets=[("macs", 1000)], samples=4)


@pytest.mark.slow   # torch.export of a sub-network: ~5 s
def test_export_subnet_loads_back_equal_with_its_costs(vit_anchor, tmp_path):
    cfg = SubnetConfig([2], {"blocks.0.heads": 1, "blocks.1.hidden": 200})
    out = el.export_subnet(vit_anchor, cfg, tmp_path / "sub", top1=12.5)
    meta = json.loads((out / "config.json").read_text())
    assert meta["program"]["file"] == "model.pt2" and meta["top1"] == 12.5
    loaded = el.load_subnet(out)
    want = el.build_subnet(vit_anchor, cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), want(x))
        program = torch.export.load(out / "model.pt2").module()
        assert torch.allclose(program(x), want(x), atol=1e-5)
    assert meta["cost"] == model_cost(loaded, (3, 32, 32)).to_dict() == subnet_cost(vit_anchor.space, cfg).to_dict()
    (out / "config.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(el.ElasticError, match="not a zoo-composer-subnet"):
        el.load_subnet(out)


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModel):
        el.prepare_anchor(nn.Sequential(nn.Conv2d(3, 4, 3)))


# --- the CLI ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A run of one random-init starter ViT (16x16 inputs) and a 10-class folder of tiny images."""
    from PIL import Image

    from composer.cli import main as cli_main
    root = tmp_path_factory.mktemp("elastic")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"c{c}" / f"{i}.png")
    assert cli_main(["fit", "starter_vit_tiny", "--data", str(root / "images"), "--calib", "4", "--out",
                     str(root / "run"), "--batch-size", "4"]) == 0
    return root / "run", root / "images"


@pytest.mark.slow   # ~10 s
def test_cli_elastic_adds_measured_candidates(vit_run, main):
    run, images = vit_run
    torch.manual_seed(0)   # the run's anchor is a random-init timm name: each load draws its weights anew
    r = main("elastic", run, "--anchor", 0, "--data", images, "--budget-macs", "0.15M", "--budget-activations", "6k",
             "--samples", 9, "--eval-limit", 20, "--population", 8, "--generations", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cands = read_candidates(run)
    assert [c.name for c in cands] == [c["name"] for c in out["candidates"]] and len(cands) >= 1
    assert cands[0].macs <= 150_000 and cands[-1].activations <= 6000
    assert all(c.method == "elastic" and c.status == "measured" and c.config["images"] == 20 for c in cands)
    # random weights on random images: accuracies may all be equal, leaving the correlation undefined (None)
    assert len(out["samples"]) == 9 and out["predictor"] == "mlp"
    if len({s["top1"] for s in out["samples"]}) == 1:
        assert out["rank_correlation"] is None
    else:
        space = el.anchor_of_run(run, 0).space
        assert out["rank_correlation"] == pytest.approx(_out_of_fold_rho(space, out["samples"], "mlp"), abs=1e-9)
    # a candidate exports from the run alone and measures the same again (images: after the 20 for BN)
    torch.manual_seed(0)
    out_dir = el.export_candidate(run, cands[0].name, run.parent / "exported", program=False)
    net = el.load_subnet(out_dir)
    assert model_cost(net).macs == cands[0].macs and cands[0].config["bn"]["data"] == str(images)
    _, same_images = el.image_batches(str(images), net, 20, bn_images=cands[0].config["bn"]["images"])
    assert el.top1(net, same_images) == pytest.approx(cands[0].top1)
    with pytest.raises(CandidateError, match="no candidate 'nope'"):
        el.export_candidate(run, "nope", run.parent / "x")
    r = main("elastic", run, "--anchor", 0, "--data", images, "--budget-macs", "0.2M", "--samples", 8,
             "--eval-limit", 10, "--population", 8, "--generations", 1, "--predictor", "ridge")
    assert r.returncode == 0, r.stderr
    assert "rank correlation" in r.stdout and "MACs (M)" in r.stdout and "elastic' candidates added" in r.stdout


@pytest.mark.slow   # ~4 s
def test_cli_exports_a_candidate_equal_to_it_run_in_the_anchor(vit_run, main, tmp_path):
    """`export RUN --candidate METHOD:NAME` writes the sub-network; its logits equal the run's anchor
    computing the same configuration with masks (no extraction), and an unknown name is one line."""
    run, images = vit_run
    r = main("elastic", run, "--anchor", 0, "--data", images, "--budget-macs", "0.1M", "--samples", 4,
             "--eval-limit", 10, "--population", 8, "--generations", 1, "--check", 1, "--json")
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["candidates"][0]["name"]
    torch.manual_seed(0)   # a random-init anchor: the same draws for the export and for the check below
    r = main("export", run, "--candidate", f"elastic:{name}", "--out", tmp_path / "sub", "--json")
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "model.pt2"} <= set(json.loads(r.stdout)["files"])
    exported = el.load_subnet(tmp_path / "sub")
    torch.manual_seed(0)
    anchor = el.anchor_of_run(run, 0)
    [cand] = [c for c in read_candidates(run) if c.name == name]
    config = SubnetConfig.from_dict(cand.config["subnet"])
    assert config != anchor.space.full_config()   # 0.1M MACs is well under the anchor's: something is cut
    x = torch.randn(4, *anchor.space.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked(anchor.model, anchor.space, *config_masks(anchor.space, config)):
        want = anchor.model(x)
    with torch.no_grad():
        assert not torch.allclose(anchor.model(x), want, atol=1e-4)
        torch.testing.assert_close(exported(x), want, atol=1e-5, rtol=1e-4)
    assert model_cost(exported).macs == cand.macs <= 100_000
    program = torch.export.load(tmp_path / "sub" / "model.pt2").module()
    torch.testing.assert_close(program(x), want, atol=1e-5, rtol=1e-4)

    r = main("export", run, "--candidate", "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.startswith("error: no candidate 'nope'") and r.stderr.count("\n") == 1
    assert f"'elastic:{name}'" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--anchor", 3, "--budget-macs", "0.2M"], "anchor 3 does not exist"),
    (["--anchor", 0, "--budget-macs", "1k"], "below the smallest"),
    (["--anchor", 0, "--budget-activations", "10"], "below the smallest"),
    (["--anchor", 0, "--budget-macs", "nan"], "macs budget must be a finite number, not 'nan'"),
    (["--anchor", 0, "--budget-macs", "1e30"], "macs budget must be at most 1e+15"),
    (["--anchor", 0, "--budget-latency", "inf"], "latency budget (ms) must be a finite number"),
])
def test_cli_elastic_bad_input_is_one_line(vit_run, main, args, message):
    run, images = vit_run
    r = main("elastic", run, "--data", images, "--samples", 4, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


@pytest.mark.slow   # ~7 s
def test_elastic_build_re_estimates_batchnorm_and_keeps_activation_budgets(tiny_run, tmp_path):
    """The elastic builder as the app runs it, on a CNN: budgets as % of the anchor's activations,
    every sub-network's BatchNorm statistics re-estimated on the asked number of images (a CIFAR
    ResNet cut to a few channels is useless with the full network's statistics)."""
    import shutil

    from composer.builders import build
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    images = str(tiny_run[1])
    events = []
    result = build("elastic", run, anchor=0, events=events.append, data=images, eval_data=images,
                   budgets=[("activations", 50), ("activations", 80)], relative=True, samples=8, eval_limit=6,
                   bn_images=10)
    assert result.summary.startswith("elastic: ") and result.details.has_bn and result.details.bn_images == 10
    assert result.candidates == result.details.candidates
    space = el.anchor_of_run(run, 0).space
    full = el.arch_cost(space, el.largest_arch(space))
    cands = [c for c in read_candidates(run) if c.method == "elastic"]
    assert cands and {c.config["bn"]["images"] for c in cands} == {10}
    for c in cands:
        assert c.config["budget"]["metric"] == "activations"
        assert c.activations <= c.config["budget"]["value"] <= 0.8 * full.activations + 1e-6
    assert {e["phase"] for e in events} >= {"measure", "verify"}
