"""DMS shrinking (composer/shrink.py): the differentiable top-k, the cost model, the search and the
export, on tiny models."""
import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets with timm)
from composer.builders import shrink
from composer.run import read_candidates
from composer.costs import model_cost
from composer.builders.elastic import load_subnet, top1
from composer.builders.subnet import SubnetConfig, elastic_space, masked, subnet_cost


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only spins (measured: 30x the CPU time of
    the search test on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the differentiable top-k --------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 16, 64])
def test_hard_mask_is_topk_with_documented_count(n):
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(n, generator=g)
    # random ratios, plus ratios at which aN is a whole number (exact in binary: k/8 with N = 8k)
    ratios = torch.rand(20, generator=g).tolist() + [0.0, 0.25, 0.5, 0.75, 1.0]
    for a in ratios:
        kept = shrink.hard_mask(scores, a)
        k = int(kept.sum())
        if n > 1:
            assert k == shrink.keep_count(n, a) == (n if a == 0 else n - math.ceil(a * n) + 1), (n, a)
        assert k >= 1
        # the kept units are exactly the k most important
        assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.topk(scores, k).indices.tolist())


def test_soft_mask_sum_and_slope():
    n = 64
    scores = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for a0 in (0.2, 0.37, 0.5, 0.8):   # away from 0 and 1, where the sigmoid tails are cut off
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        m = shrink.soft_mask(scores, a, lam=1.0)
        m.sum().backward()
        assert float(m.detach().sum()) == pytest.approx(n * (1 - a0) + 0.5, abs=1e-3)
        assert float(a.grad) == pytest.approx(-n, rel=1e-3)


def test_equal_importances_keep_everything():
    a = torch.tensor(0.7, requires_grad=True)
    m = shrink.soft_mask(torch.full((10,), 3.0), a)
    assert torch.equal(m.detach(), torch.ones(10))
    assert m.requires_grad     # still in the graph: Taylor's dL/dm can be read off it
    assert shrink.hard_mask(torch.zeros(5), 1.0).all()


def test_resource_loss():
    t = 1000.0
    under = torch.tensor(900.0, requires_grad=True)
    loss = shrink.resource_loss(under, t)
    loss.backward()
    assert float(loss.detach()) == 0 and float(under.grad) == 0
    assert float(shrink.resource_loss(torch.tensor(1000.0), t)) == 0
    over = torch.tensor(1500.0, requires_grad=True)
    loss = shrink.resource_loss(over, t)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(1.5))
    assert float(over.grad) == pytest.approx(1 / 1500)


def test_taylor_moving_average():
    t = torch.zeros(3)
    shrink.update_taylor(t, torch.tensor([1.0, 0.5, 1.0]), torch.tensor([2.0, 2.0, 0.0]))
    assert torch.allclose(t, 0.01 * torch.tensor([4.0, 1.0, 0.0]))
    before = t.clone()
    shrink.update_taylor(t, torch.ones(3), torch.zeros(3))     # no ranking in it: skipped
    assert torch.equal(t, before)
    shrink.update_taylor(t, torch.ones(3), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(t, 0.99 * before + 0.01 * torch.tensor([1.0, 0.0, 0.0]))


# --- the cost model and the export, on tiny models ----------------------------------------------

def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and biases far from their defaults, so that a unit cut at the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.05, generator=g)
    return model.eval()


MODELS = {   # name -> (timm name, kwargs, input size)
    "cifar_resnet": ("cifar_resnet20", {}, (3, 16, 16)),
    "vit": ("deit_tiny_patch16_224", dict(img_size=32, depth=3), (3, 32, 32)),
    "bottleneck": ("resnet50", dict(layers=(1, 2, 2, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=10),
                   (3, 32, 32)),
}


def _tiny(name: str, seed: int = 0):
    arch, kwargs, size = MODELS[name]
    torch.manual_seed(seed)
    model = _randomise(timm.create_model(arch, pretrained=False, **kwargs), seed)
    return model, elastic_space(model, size), size


def _random_masks(space, seed: int) -> shrink.Masks:
    """Masks as a search leaves them: distinct Taylor scores, ratios anywhere in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    masks = shrink.Masks(space)
    for t in masks.taylor:
        t.copy_(torch.rand(t.shape, generator=g))
    with torch.no_grad():
        masks.ratio.copy_(torch.rand(masks.ratio.shape, generator=g))
    return masks


@torch.no_grad()
def _zero_by_hand(model: nn.Module, space, masks: shrink.Masks, hard) -> nn.Module:
    """The reference, without composer.builders.subnet: a copy of the model in which every dropped unit's
    weights in the layer that reads it are zero, and every dropped block's residual branch ends in
    zeros (its last BN / projection scaled to 0), so it adds nothing."""
    ref = copy.deepcopy(model)
    for t, m in zip(masks.topks, hard):
        if t.is_depth:
            for b, keep in zip(t.blocks, m.tolist()):
                blk = ref.get_submodule(space.blocks[b].module)
                if not keep:
                    ends = [blk.attn.proj, blk.mlp.fc2] if hasattr(blk, "attn") else \
                        [blk.bn3 if hasattr(blk, "bn3") else blk.bn2]
                    for layer in ends:
                        layer.weight.zero_()
                        layer.bias.zero_()
            continue
        path, name = t.key.rsplit(".", 1)
        blk = ref.get_submodule(path)
        dropped = torch.nonzero(~m).flatten()
        if name == "hidden":
            blk.mlp.fc2.weight[:, dropped] = 0
        elif name == "heads":
            hd = blk.attn.head_dim
            for h in dropped.tolist():
                blk.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
        else:   # conv channels: read by conv2 (mid, mid1) or conv3 (mid2)
            (blk.conv3 if name == "mid2" else blk.conv2).weight[:, dropped] = 0
    return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_export_equals_zeroed_model_and_soft_macs_of_hard_masks_are_counted_macs(name):
    model, space, size = _tiny(name)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    for seed in range(2):
        masks = _random_masks(space, seed)
        hard = masks.hard()
        assert any(not bool(m.all()) for m in hard)   # something is pruned
        pruned, config, order = shrink.export(model, space, masks)
        counted = model_cost(pruned, size).macs
        assert float(masks.soft_macs([m.float() for m in hard])) == counted
        assert subnet_cost(space, config).macs == counted
        assert counted < model_cost(model, size).macs
        with torch.no_grad():
            expected = _zero_by_hand(model, space, masks, hard)(x)
            assert torch.allclose(pruned(x), expected, rtol=1e-4, atol=1e-5)
            # the same with subnet's 0/1 mask hooks on the full model
            width_of, depth_of = masks.lookups([m.float() for m in hard])
            with masked(model, space, width_of, depth_of):
                assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)


def test_search_moves_soft_macs_to_target_and_export_meets_it():
    model, space, size = _tiny("cifar_resnet")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *size, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    full = subnet_cost(space, space.full_config()).macs
    target = 0.6 * full
    seen = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = shrink.search(model, space, batches, target, steps=30, lr=0.05, events=seen.append)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # weights frozen
    assert all(p.requires_grad for p in model.parameters())                       # and given back
    assert [e["step"] for e in seen] == list(range(1, 31))
    assert set(seen[0]) >= {"type", "step", "total_steps", "soft_macs", "target", "keep", "loss"}
    assert set(seen[0]["keep"]) == {t.key for t in res.masks.topks}
    assert seen[0]["soft_macs"] > target          # starts above (every mask near 1)
    assert res.soft_macs <= target                # the resource loss pulled it to the target
    assert res.history[-1]["resource_loss"] == 0
    # export: the hard masks, fitted, cost at most the target, and less than one channel below it
    # (here; in general the gap is below one block, or the channels that cross at the same shift)
    pruned, config, _ = shrink.export(model, space, res.masks, target)
    counted = model_cost(pruned, size).macs
    full_depth = space.full_config().depth
    channel = max(full - subnet_cost(space, SubnetConfig(full_depth, {d.key: d.size - 1})).macs for d in space.dims())
    assert target - channel < counted <= target
    assert counted == subnet_cost(space, config).macs


def test_target_checks():
    _, space, _ = _tiny("cifar_resnet")
    full = subnet_cost(space, space.full_config()).macs
    for bad in (0, -5, full, 2 * full, 0.5 * shrink.smallest_macs(space)):
        with pytest.raises(shrink.ShrinkError):
            shrink.check_target(space, bad)
    shrink.check_target(space, shrink.smallest_macs(space))
    shrink.check_target(space, full - 1)


# --- the CLI on a run ----------------------------------------------------------------------------

def test_cli_shrink_adds_a_measured_candidate(tiny_run, main):
    run, images = tiny_run
    full = 40_551_050    # ResNet-20 at 32x32 (composer.costs)
    target = 30_000_000
    torch.manual_seed(0)   # a random-init anchor: the same draws for the search and for the check below
    r = main("shrink", run, "--anchor", 0, "--data", images, "--target-macs", "30M", "--steps", 6,
             "--eval-limit", 12, "--batch-size", 6, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["full_macs"] == full and out["target_macs"] == target
    assert out["counted_macs"] <= target and out["eval_images"] == 12
    cand = read_candidates(run)
    assert [(c.method, c.status) for c in cand] == [("shrink", "measured")]
    assert cand[0].macs == out["counted_macs"] and cand[0].top1 == out["top1_after"]
    # the saved network rebuilds with plain timm and costs what the candidate says
    net = load_subnet(run / cand[0].config["folder"])
    assert model_cost(net).macs == cand[0].macs
    assert sum(p.numel() for p in net.parameters()) == cand[0].params
    from composer import data
    ds = data.subset(data.open_dataset(str(images), data.data_config(net), split="validation"), 12, seed=0)
    assert top1(net, data.loader(ds, 6)) == pytest.approx(out["top1_after"])
    assert out["bn_images"] == 30
    # top1_exported (before re-estimating BN statistics) by hand: the same anchor, permuted, its cut units
    # and blocks masked, the anchor's own BN statistics, on the same 12 images
    from composer.builders.subnet import config_masks, permute_
    from composer.run import load_run
    torch.manual_seed(0)
    anchor = load_run(run).net.anchors[0].eval()
    space = elastic_space(anchor)
    permute_(anchor, space, cand[0].config["order"])
    with torch.no_grad(), masked(anchor, space, *config_masks(space, SubnetConfig.from_dict(cand[0].config["subnet"]))):
        correct = sum(int((anchor(x).argmax(-1) == y).sum()) for x, y in data.loader(ds, 6))
    assert out["top1_exported"] == pytest.approx(100 * correct / 12)
    assert cand[0].latency_ms is None      # not asked for
    # re-running the same target replaces the candidate; the text output names the stages; --latency
    # times the shrunk network here (batch 1), as fold and elastic candidates are timed
    r = main("shrink", run, "--anchor", 0, "--data", images, "--target-macs", target, "--steps", 1,
             "--eval-limit", 6, "--latency")
    assert r.returncode == 0, r.stderr
    assert "stage 2:" in r.stdout and "top-1 on 6 images" in r.stdout
    [cand] = read_candidates(run)
    assert 0 < cand.latency_ms < 1000 and f"latency (batch 1, this device): {cand.latency_ms:.3f} ms" in r.stdout


@pytest.mark.slow   # ~4 s
def test_cli_exports_the_shrunk_network_equal_to_the_masked_anchor(tiny_run, main, tmp_path):
    """`export RUN --candidate NAME` of a shrink candidate: its logits equal the run's anchor with
    the candidate's permutation applied and its cut units and blocks masked (no extraction)."""
    import shutil

    from composer.run import load_run
    from composer.builders.subnet import config_masks, permute_
    run = shutil.copytree(tiny_run[0], tmp_path / "run")
    torch.manual_seed(0)   # a random-init anchor: the same draws for the search and for the check below
    r = main("shrink", run, "--anchor", 0, "--data", tiny_run[1], "--target-macs", "25M", "--steps", 2,
             "--eval-limit", 6, "--batch-size", 6, "--bn-images", 0, "--json")
    assert r.returncode == 0, r.stderr
    cand = json.loads(r.stdout)["candidate"]
    r = main("export", run, "--candidate", cand["name"], "--out", tmp_path / "sub")
    assert r.returncode == 0 and "model.pt2" in r.stdout, r.stderr
    exported = load_subnet(tmp_path / "sub")

    torch.manual_seed(0)
    anchor = load_run(run).net.anchors[0].eval()
    space = elastic_space(anchor)
    permute_(anchor, space, cand["config"]["order"])
    config = SubnetConfig.from_dict(cand["config"]["subnet"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked(anchor, space, *config_masks(space, config)):
        want = anchor(x)
    with torch.no_grad():
        assert not torch.allclose(anchor(x), want, atol=1e-4)
        torch.testing.assert_close(exported(x), want, atol=1e-5, rtol=1e-4)
    assert model_cost(exported).macs == cand["macs"] <= 25_000_000
    assert json.loads((tmp_path / "sub" / "config.json").read_text())["top1"] == cand["top1"]


@pytest.mark.parametrize("args, message", [
    (["--anchor", 0, "--target-macs", "50M"], "not below the model's own"),
    (["--anchor", 0, "--target-macs", 0], "positive"),
    (["--anchor", 0, "--target-macs=-3M"], "positive"),
    (["--anchor", 0, "--target-macs", "1k"], "smallest network"),
    (["--anchor", 3, "--target-macs", "30M"], "anchor 3 does not exist"),
    (["--anchor", 0, "--target-macs", "30M", "--lr", "nan"], "learning rate must be a finite number, not 'nan'"),
    (["--anchor", 0, "--target-macs", "nan"], "target MACs must be a finite number"),
])
def test_cli_shrink_bad_input_is_one_line(tiny_run, main, args, message):
    run, images = tiny_run
    r = main("shrink", run, "--data", images, "--steps", 2, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
