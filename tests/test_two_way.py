"""SN-Netv2's two-way plan: its enumeration, its costs, and routes that go there and back run
exactly as the blocks run by hand."""
import torch

from composer.plan import build_plan, two_way_points
from composer.run import load_anchors
from tests.engine_models import cifar, network, vit


def snnetv2_configs(small: int, large: int) -> list[tuple]:
    """SN-Netv2's `get_stitch_configs_bidirection` (ziplab/SN-Netv2, classification/snnet.py), written
    out again as it reads there: comb ids and stitch configs, before its sampled-id filter."""
    ratio = large // small
    sl = [((0, 1), ((i, (i + 1) * ratio),), i) for i in range(small)]
    mapping = torch.nn.functional.interpolate(torch.arange(small).float()[None, None], large).squeeze().long().tolist()
    ls = [((1, 0), ((i, mapping[i] + 1),), i // ratio) for i in range(large)
          if i < large - 1 and (small == large or i % 2 == 1)]
    lsl = [((1, 0, 1), (a[1][0], b[1][0])) for a in ls for b in sl if b[2] != small - 1 and b[1][0][0] >= a[1][0][1]]
    sls = [((0, 1, 0), (b[1][0], a[1][0])) for b in sl for a in ls if a[1][0][0] >= b[1][0][1]]
    # the ids it samples from: the anchors, small->large except the one whose front is the last
    # small block, and all the rest. We also leave out what runs no block of its back anchor
    # (large->small points past the small anchor's end: none for DeiT's 12/24, some for 3/9)
    depth = {0: small, 1: large}
    runs_blocks = lambda c, s: all(k < depth[b] for (j, k), b in zip(s, c[1:]))
    return ([((0,), ()), ((1,), ())] + [(c, s) for c, s, _ in sl if s[0][0] != small - 1]
            + [(c, s) for c, s, _ in ls if runs_blocks(c, s)] + [(c, s) for c, s in lsl + sls if runs_blocks(c, s)])


def as_configs(plan) -> list[tuple]:
    """Our routes in SN-Netv2's terms: anchor order and (front block, first back block) per junction."""
    out = []
    for s in plan.stitches:
        comb = tuple(seg.anchor for seg in s.route)
        out.append((comb, tuple((a.last, b.first) for a, b in zip(s.route, s.route[1:]))))
    return out


def test_points_match_snnetv2_for_equal_and_double_depth():
    for small, large in ((12, 24), (12, 12), (3, 9)):
        sl, ls = two_way_points(small, large)
        expected = snnetv2_configs(small, large)
        assert [s[0] for c, s in expected if c == (0, 1)] == sl
        assert [s[0] for c, s in expected if c == (1, 0)] == ls


def test_deit3_small_large_gives_snnetv2s_134_routes_offline():
    _, infos = load_anchors(["deit3_small_patch16_224", "deit3_large_patch16_224"], False, "meta")
    plan = build_plan(infos, two_way=True)
    assert as_configs(plan) == snnetv2_configs(12, 24)
    assert len(plan.stitches) == 134
    # one stitching layer per direction and position: 11 small->large, 11 large->small
    assert len(plan.layers) == 22
    # costs: stem of the first anchor, each segment's blocks, one 384<->1024 layer per junction on
    # 197 tokens (bias included), the last anchor's head
    s = plan.stitches[25]    # large[0..1] -> small[1..2] -> large[6..23]
    small, large = plan.infos
    expected = (large.stem.macs + sum(large.units[u].macs for u in (0, 1)) + sum(small.units[u].macs for u in (1, 2))
                + sum(large.units[u].macs for u in range(6, 24)) + large.head.macs
                + 197 * (1024 * 384 + 384) + 197 * (384 * 1024 + 1024))
    assert plan.cost(s).macs == expected


def _by_hand_vit(net, sid, x):
    s = net.stitches[sid]
    first = net.anchors[s.route[0].anchor]
    h = first.norm_pre(first.patch_drop(first._pos_embed(first.patch_embed(x))))
    for i, seg in enumerate(s.route):
        m = net.anchors[seg.anchor]
        for b in range(seg.first, seg.last + 1):
            h = m.blocks[b](h)
        if i < len(s.layers):
            layer = net.stitch_layers[s.layers[i]]
            h = h @ layer.weight.T + layer.bias
    last = net.anchors[s.route[-1].anchor]
    return last.forward_head(last.norm(h))


def test_there_and_back_routes_equal_blocks_run_by_hand():
    net = network([vit(32, 2, depth=3, seed=1), vit(48, 3, depth=6, seed=2)], (3, 32, 32), two_way=True)
    torch.manual_seed(7)
    for layer in net.stitch_layers.values():
        torch.nn.init.normal_(layer.weight, std=0.2)
        torch.nn.init.normal_(layer.bias, std=0.2)
    three = [s.id for s in net.stitches if len(s.route) == 3]
    assert three, "a 3- and a 6-block anchor have routes there and back"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for sid in [three[0], three[-1], 2, len(net.stitches) - 1]:
            torch.testing.assert_close(net.select(sid)(x), _by_hand_vit(net, sid, x), rtol=1e-5, atol=1e-5)


def test_cifar_resnets_two_way_stitch_inside_stages_only():
    net = network([cifar(20, 1), cifar(32, 2)], (3, 32, 32), two_way=True)
    small, large = net.plan.infos
    for s in net.stitches:
        for a, b in zip(s.route, s.route[1:]):
            fa, fb = net.plan.infos[a.anchor], net.plan.infos[b.anchor]
            assert fa.stages[a.last] == fb.stages[b.first] < small.num_stages - 1
    kinds = {tuple(seg.anchor for seg in s.route) for s in net.stitches}
    assert kinds == {(0,), (1,), (0, 1), (1, 0), (0, 1, 0), (1, 0, 1)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for s in net.stitches:   # every route runs and keeps the batch and class shape
            assert net.select(s.id)(x).shape == (2, 10)


def test_macs_step_groups_match_snnetv2s_grouping():
    from composer.plan import macs_step_groups

    def snnetv2(flops: dict, step: float):   # its group_subnets_by_flops, as it reads
        groups, current, last = [], [], 0
        for cfg, f in sorted(flops.items(), key=lambda kv: kv[1]):
            if abs(last - f) > step:
                if current:
                    groups.append(current)
                current, last = [cfg], f
            else:
                current.append(cfg)
        return groups + ([current] if current else [])

    rng = torch.Generator().manual_seed(3)
    macs = (torch.rand(60, generator=rng) * 100).tolist()
    for step in (5.0, 10.0, 33.0):
        # SN-Netv2 starts its walk from 0: the first group holds what lies within `step` of 0 or of
        # the cheapest stitch; ours starts at the cheapest stitch. Shifted so the cheapest is 0, the two agree.
        low = min(macs)
        shifted = [m - low for m in macs]
        assert macs_step_groups(macs, step) == snnetv2(dict(enumerate(shifted)), step)
    assert macs_step_groups([5, 1, 3], 100) == [[1, 2, 0]]
    assert macs_step_groups([1, 2, 30, 31, 90], 10) == [[0, 1], [2, 3], [4]]
