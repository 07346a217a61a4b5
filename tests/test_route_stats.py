"""Per-stitch BatchNorm statistics (switchable BN): a stitch's BatchNorms behind its stitch point
run on its own statistics, re-estimated by calibrate_route_stats, while the anchors and every
route's front keep theirs; each checked against the blocks run by hand."""
import copy

import torch

from composer.evaluate import evaluate_all, evaluate_naive
from composer.fit import calibrate_route_stats
from composer.run import load_run, save_fitted
from tests.engine_models import cifar_family, vit_family


def _blocks(m):
    return [blk for layer in (m.layer1, m.layer2, m.layer3) for blk in layer]


def _by_hand(net, sid, x, back_train=False):
    """The stitch computed from copies of its anchors' modules; back_train: BatchNorms behind
    the stitch point in train mode with momentum 1 (their running statistics become the batch's)."""
    s = net.stitches[sid]
    f, b = s.route
    front, back = net.anchors[f.anchor], copy.deepcopy(net.anchors[b.anchor])
    names = [n.split(".", 2)[2] for n in net.route_bn_names(s)]   # anchors.<i>.<name in the anchor>
    stats = net.route_stats[str(sid)]
    for i, n in enumerate(names):
        bn = back.get_submodule(n)
        bn.running_mean.copy_(stats.mean(i))
        bn.running_var.copy_(stats.var(i))
        with torch.no_grad():
            bn.weight.copy_(stats.weight(i))
            bn.bias.copy_(stats.bias(i))
        if back_train:
            bn.train()
            bn.momentum = 1.0
    h = torch.relu(front.bn1(front.conv1(x)))
    for blk in _blocks(front)[:f.last + 1]:
        h = blk(h)
    layer = net.stitch_layers[s.layers[0]]
    h = torch.einsum("oc,bchw->bohw", layer.weight, h) + layer.bias[None, :, None, None]
    for blk in _blocks(back)[b.first:]:
        h = blk(h)
    return back.linear(h.mean((2, 3))), back, names


def _random_layers(net, seed):
    """Stitching layers far from least squares and identity, so that features behind a stitch
    point differ from the back anchor's own."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in net.stitch_layers.values():
            torch.nn.init.normal_(layer.weight, std=0.3)
    return net


@torch.no_grad()
def _random_stats(net, seed=0):
    """Every stitch's own statistics and affine parameters, random (and so unlike its anchor's)."""
    g = torch.Generator().manual_seed(seed)
    for stats in net.route_stats.values():
        for name, buf in [*stats.named_buffers(), *stats.named_parameters()]:
            buf.copy_(torch.rand(buf.shape, generator=g) * (1.5 if name.startswith("var") else 1.0) + 0.2)


def test_stitches_own_the_batchnorms_behind_their_stitch_point_only():
    net = cifar_family()
    for s in net.stitches:
        names = net.route_bn_names(s)
        if s.is_anchor:
            assert not names and str(s.id) not in net.route_stats
            continue
        back = s.route[1].anchor
        assert names and all(n.startswith(f"anchors.{back}.") for n in names)
        # the stem and first blocks of the back anchor are not on the route: not among them
        assert f"anchors.{back}.bn1" not in names
    assert len(vit_family().route_stats) == 0     # LayerNorm: nothing per route


@torch.no_grad()
def test_a_stitch_runs_on_its_own_statistics_and_the_anchors_on_theirs():
    net = _random_layers(cifar_family().eval(), seed=0)
    x = torch.randn(3, 3, 32, 32)
    anchors_before = [net.select(s.id)(x) for s in net.stitches if s.is_anchor]
    _random_stats(net)
    sid = next(s.id for s in net.stitches if not s.is_anchor and s.route[1].first > 3)
    want, _, _ = _by_hand(net, sid, x)
    # the stitching layer by einsum here, as a 1x1 conv in the library: float32 sums in another order,
    # grown through the back blocks (as in test_stitching's CNN check), so not assert_close's 1.3e-6 default
    torch.testing.assert_close(net.select(sid)(x), want, rtol=5e-5, atol=5e-4)
    # the anchors' outputs did not move, and statistics are back in place after the forward
    for got, s in zip(anchors_before, [s for s in net.stitches if s.is_anchor]):
        assert torch.equal(net.select(s.id)(x), got)
    # shared-prefix evaluation still equals one forward per stitch
    batches = [(torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))) for _ in range(2)]
    fast, slow = evaluate_all(net, batches), evaluate_naive(net, batches)
    assert all(torch.equal(fast.predictions[i], slow.predictions[i]) for i in fast.predictions)


def _anchor_batch_stats(net, sid, x):
    """The back anchor run alone on x, with the BatchNorms behind the stitch's point in train mode
    (momentum 1: their running statistics become the batch's), the rest as at inference."""
    s = net.stitches[sid]
    b = s.route[1]
    anchor = copy.deepcopy(net.anchors[b.anchor]).eval()
    names = [n.split(".", 2)[2] for n in net.route_bn_names(s)]
    for n in names:
        anchor.get_submodule(n).train()
        anchor.get_submodule(n).momentum = 1.0
    anchor(x)
    return [(anchor.get_submodule(n).running_mean, anchor.get_submodule(n).running_var) for n in names]


@torch.no_grad()
def test_calibration_gives_each_stitch_its_anchors_statistics_moved_by_its_own_features():
    net = _random_layers(cifar_family().eval(), seed=1)
    anchors_state = {k: v.clone() for k, v in net.anchors.state_dict().items()}
    x = torch.randn(16, 3, 32, 32)
    assert calibrate_route_stats(net, [x]) == 16
    assert all(torch.equal(v, net.anchors.state_dict()[k]) for k, v in anchors_state.items())
    for s in [s for s in net.stitches if not s.is_anchor]:
        # by hand: the stitch's and the anchor's batch statistics on the same images, and the
        # anchor's own running statistics r: mean r + (stitch - anchor) x sqrt(r_var / anchor_var),
        # variance r_var x stitch_var / anchor_var
        _, back, names = _by_hand(net, s.id, x, back_train=True)
        here = _anchor_batch_stats(net, s.id, x)
        stats = net.route_stats[str(s.id)]
        for i, n in enumerate(names):
            bn = net.get_submodule(net.route_bn_names(s)[i])
            mu_s, var_s = back.get_submodule(n).running_mean, back.get_submodule(n).running_var
            mu_a, var_a = here[i]
            want_mean = bn.running_mean + (mu_s - mu_a) * (bn.running_var / var_a).sqrt()
            torch.testing.assert_close(stats.mean(i), want_mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(stats.var(i), var_s * bn.running_var / var_a, rtol=1e-3, atol=1e-5)


@torch.no_grad()
def test_a_stitch_whose_features_equal_its_anchors_gets_exactly_the_anchors_statistics():
    """Two copies of one anchor stitched with identity layers: every stitch computes the anchor's
    features, so calibration on any images (here far from the anchor's data) leaves it the anchor."""
    from tests.engine_models import cifar, network
    twin = network([cifar(20, 1), cifar(20, 1)], (3, 32, 32))
    twin.anchors[1].load_state_dict(twin.anchors[0].state_dict())
    for layer in twin.stitch_layers.values():
        layer.weight.copy_(torch.eye(layer.weight.shape[0], layer.weight.shape[1]))
        layer.bias.zero_()
    assert sum(not s.is_anchor for s in twin.stitches) >= 3
    calibrate_route_stats(twin.eval(), [torch.randn(8, 3, 32, 32) * 3 + 1])
    x = torch.randn(2, 3, 32, 32)
    for s in twin.stitches:
        if not s.is_anchor:
            stats = twin.route_stats[str(s.id)]
            for i, n in enumerate(twin.route_bn_names(s)):
                torch.testing.assert_close(stats.mean(i), twin.get_submodule(n).running_mean, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(stats.var(i), twin.get_submodule(n).running_var, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(twin.select(s.id)(x), twin.select(0)(x), rtol=1e-4, atol=1e-4)


def test_fitted_runs_keep_route_statistics_and_old_weights_load_on_anchor_statistics(tmp_path):
    import zoo  # noqa: F401  (registers the CIFAR ResNets with timm)
    from composer.run import build_network
    net = build_network(["cifar_resnet20", "cifar_resnet32"], pretrained=False)
    _random_stats(net, seed=3)
    save_fitted(tmp_path / "run", net, {"pretrained": False})
    loaded = load_run(tmp_path / "run").net
    assert loaded.route_stats.state_dict().keys() == net.route_stats.state_dict().keys()
    assert all(torch.equal(v, loaded.route_stats.state_dict()[k]) for k, v in net.route_stats.state_dict().items())
    # a state dict from before route statistics existed: every stitch gets its anchor's
    old = {k: v for k, v in net.state_dict().items() if not k.startswith("route_stats.")}
    _random_stats(loaded, seed=4)
    loaded.load_state_dict(old)
    s = next(s for s in loaded.stitches if not s.is_anchor)
    for i, n in enumerate(loaded.route_bn_names(s)):
        assert torch.equal(loaded.route_stats[str(s.id)].mean(i), old[f"{n}.running_mean"])


def test_in_train_mode_a_stitch_updates_its_own_statistics_not_its_anchors():
    net = cifar_family()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = next(s for s in net.stitches if not s.is_anchor)
    net.train().select(s.id)(torch.randn(4, 3, 32, 32))
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    mine = {k for k in changed if k.startswith(f"route_stats.{s.id}.")}
    assert mine and all(k.split(".")[-1].startswith(("mean", "var")) for k in mine)
    back = f"anchors.{s.route[1].anchor}."
    moved_back = {k for k in changed if k.startswith(back) and k.endswith(("running_mean", "running_var"))}
    assert not moved_back                                   # the back anchor's own statistics stay
    front = f"anchors.{s.route[0].anchor}."
    assert any(k.startswith(front) and k.endswith("running_mean") for k in changed)   # the front is the anchor's
    assert not any(k.startswith("route_stats.") and not k.startswith(f"route_stats.{s.id}.") for k in changed)


def test_a_stitch_learns_its_own_batchnorm_scale_and_shift_and_the_anchors_keep_theirs():
    net = _random_layers(cifar_family(), seed=5)
    s = next(s for s in net.stitches if not s.is_anchor)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(net.train().select(s.id)(x), y).backward()
    grads = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    mine = {n for n in grads if n.startswith("route_stats.")}
    assert mine and all(n.startswith(f"route_stats.{s.id}.") for n in mine)
    assert len(mine) == 2 * len(net.route_bn_names(s))             # a scale and a shift per BatchNorm
    # the back anchor's own BatchNorms behind the stitch point get no gradient from the stitch
    assert not any(n.removesuffix(".weight").removesuffix(".bias") in net.route_bn_names(s) for n in grads)
    # the anchor's route learns the anchor's own scale and shift, never a stitch's
    net.zero_grad(set_to_none=True)
    anchor = next(a for a in net.stitches if a.is_anchor and a.route[0].anchor == s.route[1].anchor)
    torch.nn.functional.cross_entropy(net.select(anchor.id)(x), y).backward()
    assert not any(p.grad is not None for n, p in net.named_parameters() if n.startswith("route_stats."))
    assert all(net.get_submodule(n).weight.grad is not None for n in net.route_bn_names(s))


@torch.no_grad()
def test_runs_keep_private_scale_and_shift_and_older_layers_files_load_with_the_anchors(tmp_path):
    import zoo  # noqa: F401  (registers the CIFAR ResNets with timm)
    from safetensors.torch import load_file, save_file
    from composer.run import LAYERS, build_network
    net = build_network(["cifar_resnet20", "cifar_resnet32"], pretrained=False).eval()
    _random_stats(net, seed=6)
    save_fitted(tmp_path / "run", net, {"pretrained": False})
    loaded = load_run(tmp_path / "run").net.eval()
    saved, back = net.route_stats.state_dict(), loaded.route_stats.state_dict()
    assert saved.keys() == back.keys() and any(k.split(".")[-1].startswith("weight") for k in saved)
    assert all(torch.equal(v, back[k]) for k, v in saved.items())
    s = next(s for s in net.stitches if not s.is_anchor)
    # a stitch_layers file from before private affine parameters: the stitches take the anchors'
    layers = load_file(tmp_path / "run" / LAYERS)
    save_file({k: v for k, v in layers.items() if not k.split(".")[-1].startswith(("weight", "bias"))
               or k.startswith("stitch_layers.") or not k.startswith("route_stats.")}, tmp_path / "run" / LAYERS)
    old = load_run(tmp_path / "run").net
    for i, n in enumerate(old.route_bn_names(s)):
        assert torch.equal(old.route_stats[str(s.id)].weight(i), old.get_submodule(n).weight)
        assert torch.equal(old.route_stats[str(s.id)].mean(i), net.route_stats[str(s.id)].mean(i))
