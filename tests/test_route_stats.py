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


def _random_stats(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for stats in net.route_stats.values():
        for name, buf in stats.named_buffers():
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


@torch.no_grad()
def test_calibration_gives_each_stitch_the_statistics_of_its_own_features():
    net = _random_layers(cifar_family().eval(), seed=1)
    anchors_state = {k: v.clone() for k, v in net.anchors.state_dict().items()}
    x = torch.randn(16, 3, 32, 32)
    assert calibrate_route_stats(net, [x[:8], x[8:]]) == 16
    assert all(torch.equal(v, net.anchors.state_dict()[k]) for k, v in anchors_state.items())
    for s in net.stitches:
        if s.is_anchor:
            continue
        # over two batches the running mean is the average of the batch means: exact for the first
        # BatchNorm behind the stitch point (its input does not depend on batch statistics)
        _, back, names = _by_hand(net, s.id, x, back_train=True)
        stats = net.route_stats[str(s.id)]
        torch.testing.assert_close(stats.mean(0), back.get_submodule(names[0]).running_mean, rtol=1e-4, atol=1e-5)
        assert all(bool((stats.var(i) > 0).all()) for i in range(len(names)))
    # one batch: every statistic is exactly the batch's, as BatchNorm in train mode computes it
    net2 = cifar_family().eval()
    net2.load_state_dict(net.state_dict())
    calibrate_route_stats(net2, [x])
    for s in [s for s in net2.stitches if not s.is_anchor][:3]:
        _, back, names = _by_hand(net2, s.id, x, back_train=True)
        for i, n in enumerate(names):
            torch.testing.assert_close(net2.route_stats[str(s.id)].mean(i), back.get_submodule(n).running_mean,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(net2.route_stats[str(s.id)].var(i), back.get_submodule(n).running_var,
                                       rtol=1e-4, atol=1e-5)


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
    assert mine and all(k.endswith(("mean", "var")) or k[-1].isdigit() for k in mine)
    back = f"anchors.{s.route[1].anchor}."
    moved_back = {k for k in changed if k.startswith(back) and k.endswith(("running_mean", "running_var"))}
    assert not moved_back                                   # the back anchor's own statistics stay
    front = f"anchors.{s.route[0].anchor}."
    assert any(k.startswith(front) and k.endswith("running_mean") for k in changed)   # the front is the anchor's
    assert not any(k.startswith("route_stats.") and not k.startswith(f"route_stats.{s.id}.") for k in changed)
