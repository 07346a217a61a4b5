"""Elastic sub-networks of a stitch (not only of an anchor): the stitch's route as its own module
(composer.export.route_of) seen by composer.builders.subnet as stages of its anchors' blocks. Sorting by
importance leaves the stitch's logits (the SN-Net's route, `net.select(id)`) unchanged; an
extracted sub-network equals the full route run with the configuration's masks; its counted cost
equals the analytic one; the `elastic --stitch` CLI adds candidates that export and load."""
import json
import random

import pytest
import torch
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets)
from composer.builders import elastic as el
from composer.run import read_candidates
from composer.costs import model_cost
from composer.export import route_of
from composer.builders.subnet import SubnetConfig, config_masks, extract, importance, masked, subnet_cost
from tests.engine_models import cifar, network, vit
from tests.test_subnet import _randomise as _randomise_modules

SIZE = (3, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)   # tiny models: a second thread only adds synchronisation
    yield


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """The anchors' BN terms and biases (test_subnet's), plus stitching layers and each stitch's own
    BN statistics, far from their defaults (a wrong permutation or the anchor's statistics used
    behind the stitch point would show)."""
    _randomise_modules(net, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in net.stitch_layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.weight.shape[1] ** 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        for name, t in net.route_stats.named_buffers():   # each stitch's own BN statistics
            t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.5 if "var" in name else -0.1))
    return net.eval()


@pytest.fixture(scope="module")
def nets():
    torch.set_num_threads(1)
    return {"cifar": _randomise(network([cifar(20, 1), cifar(32, 2)], SIZE)),
            "vit": _randomise(network([vit(32, 2, seed=1), vit(48, 3, seed=2), vit(64, 4, seed=3)], SIZE))}


# (family, stitch): both stitch inside a stage, so one stage of the route mixes both anchors' blocks
CASES = [("cifar", 3), ("vit", 6)]   # cifar: r20[0..1] -> r32[2..14]; vit: m0[0..1] -> m1[1..3]


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("family, sid", CASES)
def test_stitch_space_is_the_route_in_stages_and_sorting_keeps_its_logits(nets, family, sid):
    net = nets[family]
    x = _x()
    with torch.no_grad():
        want = net.select(sid)(x)
    stitch = el.prepare_stitch(net, sid)
    space = stitch.space
    route = [(f"anchors.{seg.anchor}.", u) for seg in net.plan.stitches[sid].route for u in range(seg.first, seg.last + 1)]
    assert len(space.blocks) == len(route) and all(b.module.startswith(p) for b, (p, _) in zip(space.blocks, route))
    stages = [b.stage for b in space.blocks]
    assert stages == sorted(stages) and space.num_stages == net.adapters[0].num_stages
    first_stage = {b.module.split(".")[1] for b in space.blocks if b.stage == 0}
    assert first_stage == {"0", "1"}   # the stitch sits in the first stage: front and back blocks
    # sorting is a real permutation (scores now descending) and leaves the stitch's logits unchanged
    assert all(bool((s[:-1] >= s[1:]).all()) for s in importance(stitch.model, space).values())
    assert any(not torch.equal(a, b) for a, b in zip(route_of(net, sid)[0].state_dict().values(),
                                                      stitch.model.state_dict().values()))
    with torch.no_grad():
        _close(stitch.model(x), want)
    assert subnet_cost(space, space.full_config()) == net.plan.cost(sid)
    assert stitch.stitch == sid and stitch.short_name == f"stitch {sid}"


@pytest.mark.parametrize("family, sid", CASES)
def test_extracted_stitch_subnets_equal_masked_route_and_counted_cost(nets, family, sid):
    net = nets[family]
    stitch = el.prepare_stitch(net, sid)
    space, x = stitch.space, _x(3, seed=2)
    rnd = random.Random(0)
    configs = [el.smallest_arch(space).config(space)]
    configs += [SubnetConfig([rnd.randint(1, len(space.stage_blocks(s))) for s in range(space.num_stages)],
                             {d.key: rnd.randint(1, d.size) for d in space.dims() if rnd.random() < 0.7})
                for _ in range(3)]
    for config in configs:
        sub = extract(stitch.model, space, config)
        with torch.no_grad(), masked(stitch.model, space, *config_masks(space, config)):
            want = stitch.model(x)
        with torch.no_grad():
            _close(sub(x), want)
        assert model_cost(sub, SIZE) == subnet_cost(space, config)
        assert sum(p.numel() for p in sub.parameters()) == subnet_cost(space, config).params
    # dropping a stage's last blocks drops back blocks: the stitching layer still runs (it is counted)
    small = configs[0]
    assert subnet_cost(space, small).macs < net.plan.cost(sid).macs


def test_latency_table_of_a_stitch_times_its_stitching_layer(nets):
    stitch = el.prepare_stitch(nets["vit"], 6)
    table = el.latency_table(stitch, choices=(0.5, 1.0), repeats=1)
    assert len(table.blocks) == len(stitch.space.blocks) * 4 and table.rest_ms > 0
    assert table.predict(stitch.space, el.largest_arch(stitch.space)) > table.rest_ms


def test_a_stitch_that_does_not_exist_is_refused(nets):
    with pytest.raises(el.ElasticError, match=r"stitch 99 does not exist \(this run has 0\.\.9\)"):
        el.prepare_stitch(nets["cifar"], 99)


# --- the CLI on a fitted CIFAR ResNet-20/32 run -------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    from timm.models import save_for_hf

    from tests.test_train import image_folder, make_run
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("elastic_stitch")
    specs = []
    for i, depth in enumerate((20, 32)):
        save_for_hf(cifar(depth, seed=i), str(tmp / f"r{depth}"), safe_serialization=True)
        specs.append(f"local-dir:{tmp / f'r{depth}'}")
    val = image_folder(tmp / "val", 16, 32, seed=1)
    return make_run(tmp, (specs, image_folder(tmp / "train", 16, 32), val)), val


@pytest.mark.slow   # ~12 s
def test_cli_elastic_from_a_stitch_adds_candidates_that_export(cifar_run, main, tmp_path):
    run, images = cifar_run
    from composer.run import load_run
    net = load_run(run).net
    full = net.plan.cost(3).macs
    r = main("elastic", run, "--stitch", 3, "--data", images, "--budget-macs", f"{int(0.6 * full)}", "--samples", 4,
             "--eval-limit", 8, "--bn-images", 0, "--population", 8, "--generations", 1, "--check", 1, "--json")
    assert r.returncode == 0, r.stderr
    [out] = json.loads(r.stdout)["candidates"]
    [cand] = [c for c in read_candidates(run) if c.method == "elastic"]
    assert cand.name == out["name"] and cand.name.startswith("stitch 3 ") and cand.source.startswith("stitch 3: ")
    assert cand.config["stitch"] == 3 and cand.config["anchor"] is None and cand.macs <= 0.6 * full
    # it joins the curve next to the stitches
    assert main("evaluate", run, "--data", images, "--limit", 8).returncode == 0
    r = main("curve", run, "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    curve = json.loads((tmp_path / "c.json").read_text())
    [point] = curve["candidates"]
    assert point["key"] == f"elastic:{cand.name}" and point["macs"] == cand.macs and point["top1"] == cand.top1
    # export: the sub-network equals the run's stitch computing the same configuration with masks
    r = main("export", run, "--candidate", f"elastic:{cand.name}", "--out", tmp_path / "sub", "--json")
    assert r.returncode == 0, r.stderr
    exported = el.load_subnet(tmp_path / "sub")
    stitch = el.stitch_of_run(run, 3)
    config = SubnetConfig.from_dict(cand.config["subnet"])
    x = _x(4)
    with torch.no_grad(), masked(stitch.model, stitch.space, *config_masks(stitch.space, config)):
        want = stitch.model(x)
    with torch.no_grad():
        assert not torch.allclose(stitch.model(x), want, atol=1e-4)   # something is cut
        _close(exported(x), want)
    assert model_cost(exported, SIZE).macs == cand.macs
    program = torch.export.load(tmp_path / "sub" / "model.pt2").module()
    _close(program(x), want)


@pytest.mark.slow   # ~6 s
def test_cli_shrink_from_a_stitch_exports_equal_to_the_masked_route(cifar_run, main, tmp_path):
    """DMS on a stitch: the exported network equals the run's stitch route with the candidate's
    permutation and masks, and costs what the candidate says (at most the target)."""
    from composer.run import load_run
    from composer.builders.subnet import elastic_space, permute_
    run, images = cifar_run
    net = load_run(run).net
    target = int(0.6 * net.plan.cost(3).macs)
    r = main("shrink", run, "--stitch", 3, "--data", images, "--target-macs", target, "--steps", 2,
             "--eval-limit", 6, "--batch-size", 6, "--bn-images", 0, "--json")
    assert r.returncode == 0, r.stderr
    cand = json.loads(r.stdout)["candidate"]
    assert cand["name"].startswith("stitch 3 DMS") and cand["source"].startswith("stitch 3: ")
    assert cand["config"]["stitch"] == 3 and cand["config"]["folder"].endswith(f"stitch3-{target}")
    r = main("export", run, "--candidate", f"shrink:{cand['name']}", "--out", tmp_path / "sub")
    assert r.returncode == 0, r.stderr
    exported = el.load_subnet(tmp_path / "sub")
    route = route_of(net, 3)[0]
    space = elastic_space(route, SIZE)
    permute_(route, space, cand["config"]["order"])
    config = SubnetConfig.from_dict(cand["config"]["subnet"])
    x = _x(4)
    with torch.no_grad(), masked(route, space, *config_masks(space, config)):
        want = route(x)
    with torch.no_grad():
        assert not torch.allclose(route(x), want, atol=1e-4)
        _close(exported(x), want)
    assert model_cost(exported, SIZE).macs == cand["macs"] <= target
    r = main("shrink", run, "--stitch", 10, "--data", images, "--target-macs", target)
    assert r.returncode == 2 and r.stderr == "error: stitch 10 does not exist (this run has 0..9)\n"


@pytest.mark.parametrize("args, message", [
    (["--stitch", 10], "stitch 10 does not exist (this run has 0..9)"),
    (["--stitch", 3, "--finetune-steps", 5], "not on a stitch"),
])
def test_cli_elastic_bad_stitch_is_one_line(cifar_run, main, args, message):
    run, images = cifar_run
    r = main("elastic", run, "--data", images, "--samples", 4, *args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


@pytest.mark.slow   # ~15 s
def test_export_refuses_a_stitch_candidate_measured_with_other_weights(cifar_run, main, tmp_path):
    """A stitch's elastic candidate records the digest of the route's weights it was measured with:
    after the run's weights change on the route (as a fine-tune does, through checkpoint/), export
    refuses it in one line; a change off the route, or the weights put back, exports fine."""
    from composer.io import save_safetensors_atomic
    from composer.run import CHECKPOINT, TRAINED, load_run
    run, images = cifar_run
    full = load_run(run).net.plan.cost(3).macs
    r = main("elastic", run, "--stitch", 3, "--data", images, "--budget-macs", f"{int(0.7 * full)}", "--samples", 4,
             "--eval-limit", 8, "--bn-images", 0, "--population", 8, "--generations", 1, "--check", 1, "--json")
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["candidates"][0]["name"]
    [cand] = [c for c in read_candidates(run) if c.name == name]
    assert cand.config["weights"] == el.weights_digest(route_of(load_run(run).net, 3)[0])   # the unsorted route's

    def export(out):
        return main("export", run, "--candidate", f"elastic:{name}", "--out", tmp_path / out)

    def checkpoint(key, delta):   # the run's weights as a fine-tune would leave them (load_run reads them)
        state = load_run(run).net.state_dict()
        state[key] = state[key] + delta
        save_safetensors_atomic(run / CHECKPOINT / TRAINED, state)

    trained = run / CHECKPOINT / TRAINED
    assert not trained.exists()
    try:
        assert export("before").returncode == 0
        checkpoint("anchors.0.linear.weight", 0.5)        # ResNet-20's head: not on stitch 3's route
        r = export("off-route")
        assert r.returncode == 0, r.stderr
        checkpoint("anchors.1.layer3.0.conv1.weight", 1e-3)   # on the route (ResNet-32's back blocks)
        r = export("stale")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "stale").exists()
        assert r.stderr == (f"error: '{name}' was measured with other weights of stitch 3 than the run has now (it was "
                            "fine-tuned since): search again, then export\n")
    finally:
        trained.unlink(missing_ok=True)
    r = export("after")
    assert r.returncode == 0, r.stderr
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(el.load_subnet(tmp_path / "after")(x), el.load_subnet(tmp_path / "before")(x))


def test_progressive_shrinking_refuses_a_stitch(nets):
    stitch = el.prepare_stitch(nets["cifar"], 3)
    before = {k: v.clone() for k, v in stitch.model.state_dict().items()}
    with pytest.raises(el.ElasticError, match=r"^progressive shrinking works on an anchor, not on a stitch yet \(stitch 3\)$"):
        from composer.builders.progressive import progressive_shrink
        progressive_shrink(stitch, [(_x(2), torch.tensor([0, 1]))], 2)
    assert all(torch.equal(v, stitch.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow   # ~7 s, and the stitch case covers the same check
def test_export_refuses_an_anchor_candidate_measured_with_other_weights(cifar_run, main, tmp_path):
    """An anchor's elastic candidate records the digest of the weights it was measured with, as a
    stitch's does: after a fine-tune of the run changes the anchor (checkpoint/), or progressive
    shrinking gives it other weights, export refuses it in one line; the weights put back, it exports."""
    import shutil

    from composer.builders.progressive import progressive_shrink, save_finetuned
    from composer.io import save_safetensors_atomic
    from composer.run import CHECKPOINT, TRAINED, load_run
    src, images = cifar_run
    run = shutil.copytree(src, tmp_path / "run")   # progressive weights and candidates stay out of the shared run
    full = load_run(run).net.plan.infos[1].total.macs
    r = main("elastic", run, "--anchor", 1, "--data", images, "--budget-macs", f"{int(0.7 * full)}", "--samples", 4,
             "--eval-limit", 8, "--bn-images", 0, "--population", 8, "--generations", 1, "--check", 1, "--json")
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["candidates"][0]["name"]
    [cand] = [c for c in read_candidates(run) if c.name == name]
    assert cand.config["anchor"] == 1 and cand.config["finetuned"] is None
    assert cand.config["weights"] == el.weights_digest(load_run(run).net.anchors[1])   # the run's, unsorted
    assert el.export_candidate(run, name, tmp_path / "before", program=False).is_dir()

    state = load_run(run).net.state_dict()   # the run's weights as a fine-tune would leave them
    state["anchors.1.layer1.0.conv1.weight"] = state["anchors.1.layer1.0.conv1.weight"] + 1e-3
    save_safetensors_atomic(run / CHECKPOINT / TRAINED, state)
    r = main("export", run, "--candidate", f"elastic:{name}", "--out", tmp_path / "stale")
    assert r.returncode == 2 and not (tmp_path / "stale").exists()
    assert r.stderr == (f"error: '{name}' was measured with other weights of anchor 1 than the run has now (it was "
                        "fine-tuned since): search again, then export\n")
    (run / CHECKPOINT / TRAINED).unlink()
    assert el.export_candidate(run, name, tmp_path / "again", program=False).is_dir()

    anchor = el.anchor_of_run(run, 1)   # progressive shrinking since: the run's anchor 1 runs other weights
    progressive_shrink(anchor, [(_x(4), torch.tensor([0, 1, 2, 3]))], 1, lr=0.5)
    save_finetuned(run, anchor)
    with pytest.raises(el.ElasticError, match=r"other weights of anchor 1 .*\(progressive shrinking ran since\)"):
        el.export_candidate(run, name, tmp_path / "after-ps", program=False)
