"""The stitched network, least-squares fitting and shared-prefix evaluation, each checked
against an independent computation (blocks run by hand, torch.linalg.lstsq, one forward per stitch)."""
import pytest
import torch
import torch.nn.functional as F

from composer.evaluate import evaluate_all, evaluate_naive
from composer.fit import HOLDOUT_EVERY, fit_stitches
from tests.engine_models import cifar_family, network, tiny, vit_family


def _randomise_layers(net):
    torch.manual_seed(7)
    for layer in net.stitch_layers.values():
        torch.nn.init.normal_(layer.weight, std=0.2)
        torch.nn.init.normal_(layer.bias, std=0.2)


def test_vit_stitch_equals_blocks_run_by_hand():
    net = vit_family()
    _randomise_layers(net)
    x = torch.randn(3, 3, 32, 32)
    for sid in (5, 12, len(net.stitches) - 1):
        s = net.stitches[sid]
        (f, b) = s.route
        front, back = net.anchors[f.anchor], net.anchors[b.anchor]
        with torch.no_grad():
            h = front.norm_pre(front.patch_drop(front._pos_embed(front.patch_embed(x))))
            for i in range(f.last + 1):
                h = front.blocks[i](h)
            layer = net.stitch_layers[s.layers[0]]
            h = h @ layer.weight.T + layer.bias
            for i in range(b.first, len(back.blocks)):
                h = back.blocks[i](h)
            expected = back.forward_head(back.norm(h))     # the last anchor's final norm is applied
            assert torch.equal(net.select(sid)(x), expected)


def test_cnn_stitch_equals_blocks_run_by_hand():
    net = cifar_family()
    _randomise_layers(net)
    x = torch.randn(2, 3, 32, 32)
    s = net.stitches[4]
    (f, b) = s.route
    front, back = net.anchors[f.anchor], net.anchors[b.anchor]
    blocks = lambda m: [blk for layer in (m.layer1, m.layer2, m.layer3) for blk in layer]
    with torch.no_grad():
        h = torch.relu(front.bn1(front.conv1(x)))
        for blk in blocks(front)[:f.last + 1]:
            h = blk(h)
        layer = net.stitch_layers[s.layers[0]]
        h = torch.einsum("oc,bchw->bohw", layer.weight, h) + layer.bias[None, :, None, None]
        for blk in blocks(back)[b.first:]:
            h = blk(h)
        expected = back.linear(h.mean((2, 3)))
        # a 1x1 conv and this einsum sum in different orders: float32 rounding grown through ~20 blocks
        # (measured up to 3.6e-6 relative, 4.6e-5 absolute on logits ~10), so 10x that, not the default
        torch.testing.assert_close(net.select(4)(x), expected, rtol=5e-5, atol=5e-4)


def test_anchor_routes_are_the_anchors_and_select_switches():
    net = vit_family()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for i, model in enumerate(net.anchors):
            assert torch.equal(net.select(i)(x), model(x))
        assert not torch.equal(net.select(3)(x), net.select(4)(x))
    with pytest.raises(IndexError, match="does not exist"):
        net.select(len(net.stitches))


def test_cross_family_cnn_into_swin_runs():
    resnet, _ = tiny("resnet")
    swin = __import__("timm").create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4)
    net = network([swin.eval(), resnet], (3, 64, 64))      # SN-Net's resnet18 -> Swin-T, ordered by MACs
    assert net.plan.anchors == ["m1", "m0"]
    assert len(net.stitches) > 2
    assert {net.plan.layers[k].in_layout for k in net.plan.layers} == {"nchw"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for s in net.stitches[2:]:
            assert net.select(s.id)(x).shape == (2, 1000)


def _rows_by_hand(net, images, fkey, bkey, keep):
    """X (front unit output) and Y (back unit input) rows of the images kept by `keep`."""
    xs, ys = [], []
    with torch.no_grad():
        for x in images:
            for anchor, unit, out in ((fkey[0], fkey[1], xs), (bkey[0], bkey[1], ys)):
                a = net.adapters[anchor]
                h = a.stem(x)
                for u in range(unit + 1):
                    h = a.unit(u, h)
                if a.layout == "nchw":
                    h = h.flatten(2).transpose(1, 2)
                out.append(h)
    n = sum(x.shape[0] for x in images)
    mask = keep(torch.arange(n))
    X = torch.cat(xs)[mask].reshape(-1, xs[0].shape[-1]).double()
    Y = torch.cat(ys)[mask].reshape(-1, ys[0].shape[-1]).double()
    return X, Y


@pytest.mark.parametrize("make", [vit_family, cifar_family])
def test_streaming_fit_equals_lstsq_on_stacked_rows(make):
    net = make(kernel=1)           # one layer per position: compare with a plain lstsq per stitch
    images = [torch.randn(6, 3, 32, 32) for _ in range(3)]
    report = fit_stitches(net, images, ridge=1e-9)
    assert report.images == 18 and report.held_out == 3
    fit_rows = lambda i: (i % HOLDOUT_EVERY) != HOLDOUT_EVERY - 1
    for sid in (len(net.plan.anchors), len(net.stitches) - 1):
        s = net.stitches[sid]
        f, b = s.route
        X, Y = _rows_by_hand(net, images, (f.anchor, f.last), (b.anchor, b.first - 1), fit_rows)
        A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        theta = torch.linalg.lstsq(A, Y).solution
        layer = net.stitch_layers[s.layers[0]]
        torch.testing.assert_close(layer.weight.double(), theta[:-1].T, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(layer.bias.double(), theta[-1], atol=2e-3, rtol=2e-3)
        # R^2 on the held-out images, by hand
        Xh, Yh = _rows_by_hand(net, images, (f.anchor, f.last), (b.anchor, b.first - 1), lambda i: ~fit_rows(i))
        pred = Xh @ layer.weight.detach().double().T + layer.bias.detach().double()
        r2 = 1 - ((Yh - pred) ** 2).sum() / ((Yh - Yh.mean(0)) ** 2).sum()
        assert report.r2[sid] == pytest.approx(float(r2), abs=1e-4)


def test_shared_layer_is_one_joint_fit():
    net = vit_family()                  # kernel 2: window 0 serves (0,0), (0,1), (1,0), (1,1)
    images = [torch.randn(5, 3, 32, 32) for _ in range(2)]
    fit_stitches(net, images, ridge=1e-9)
    key = net.stitches[3].layers[0]
    sharing = [s for s in net.stitches if s.layers == (key,)]
    assert len(sharing) == 4
    keep = lambda i: (i % HOLDOUT_EVERY) != HOLDOUT_EVERY - 1
    Xs, Ys = zip(*[_rows_by_hand(net, images, (s.route[0].anchor, s.route[0].last),
                                 (s.route[1].anchor, s.route[1].first - 1), keep) for s in sharing])
    X, Y = torch.cat(Xs), torch.cat(Ys)
    theta = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), Y).solution
    torch.testing.assert_close(net.stitch_layers[key].weight.double(), theta[:-1].T, atol=2e-3, rtol=2e-3)


def test_fit_recovers_an_exact_affine_map():
    """If back's input really is an affine map of front's output, fitting finds it (R^2 = 1)."""
    net = cifar_family(kernel=1)
    s = net.stitches[2]
    f, b = s.route
    front, back = net.adapters[f.anchor], net.adapters[b.anchor]
    # make back's stem output an exact affine image of front's stem output: copy the stem weights
    # and scale; then the stitch (front unit -1 -> back unit 0) is exactly learnable
    torch.manual_seed(0)
    W = torch.randn(16, 16) * 0.3
    net2 = network([net.anchors[0], net.anchors[1]], (3, 32, 32), points=[((0, 0), (1, 1))])
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    # target: front block 0 output -> back block 1 input; replace back block 0 by (affine of) identity
    back_model = net2.anchors[1]
    with torch.no_grad():
        back_model.conv1.load_state_dict(net2.anchors[0].conv1.state_dict())
        back_model.bn1.load_state_dict(net2.anchors[0].bn1.state_dict())
        back_model.layer1[0].load_state_dict(net2.anchors[0].layer1[0].state_dict())
    report = fit_stitches(net2, images, ridge=1e-10)
    layer = net2.stitch_layers[net2.stitches[2].layers[0]]
    torch.testing.assert_close(layer.weight, torch.eye(16), atol=1e-4, rtol=0)
    assert report.r2[2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("make", [vit_family, cifar_family])
def test_shared_prefix_evaluation_equals_one_forward_per_stitch(make):
    net = make()
    _randomise_layers(net)
    torch.manual_seed(3)
    batches = [(torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))) for _ in range(3)]
    fast, slow = evaluate_all(net, batches), evaluate_naive(net, batches)
    assert fast.images == slow.images == 21
    assert fast.top1 == slow.top1
    for sid in fast.predictions:
        assert torch.equal(fast.predictions[sid], slow.predictions[sid])
    # a subset of stitches evaluates only those
    assert set(evaluate_all(net, batches, stitch_ids=[0, 5]).top1) == {0, 5}
