"""SN-Net's stitch enumeration and the cost counts, checked against published numbers."""
import json

import pytest
import timm
import torch

from composer.costs import describe, model_cost
from composer.plan import PlanError, build_plan, load_plan, paired_positions, unpaired_positions
from composer.run import load_anchors
from tests.engine_models import cifar, network, vit
from zoo.adapters import adapt

DEIT = ["deit_base_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224"]   # shuffled on purpose
SWIN = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"]


@pytest.fixture(scope="module")
def deit_infos():
    return load_anchors(DEIT, pretrained=False, device="meta")[1]


def test_deit_ti_s_b_gives_71_stitches(deit_infos):
    plan = build_plan(deit_infos)
    assert plan.anchors == ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    assert len(plan.stitches) == 71
    pairs = {}
    for s in plan.stitches[3:]:
        pairs.setdefault((s.route[0].anchor, s.route[1].anchor), []).append(s)
    assert {k: len(v) for k, v in pairs.items()} == {(0, 1): 34, (1, 2): 34}   # nearest: no Ti -> B
    assert len({s.layers[0] for s in pairs[(0, 1)]}) == 11                     # windows share layers
    # a stitch runs front blocks 0..j then back blocks k..11 and never an empty segment
    for s in plan.stitches[3:]:
        (f, b) = s.route
        assert f.first == 0 and b.last == 11 and f.last in range(12) and b.first in range(12)


def test_deit_options_change_the_space(deit_infos):
    assert len(build_plan(deit_infos, all_pairs=True).stitches) == 3 + 3 * 34
    assert len(build_plan(deit_infos, kernel=1).stitches) == 3 + 2 * 12       # only (j, j)
    assert len(build_plan(deit_infos, kernel=3, stride=3).stitches) == 3 + 2 * (4 * 9)


def test_swin_ti_s_b_gives_41_stitches():
    plan = build_plan(load_anchors(SWIN, pretrained=False, device="meta")[1])
    assert len(plan.stitches) == 41
    last_stage = [s for s in plan.stitches[3:] if plan.infos[s.route[0].anchor].stages[s.route[0].last] == 3]
    assert last_stage == []                       # SN-Net leaves the last stage alone


def test_window_and_unpaired_rules_match_snnet():
    assert paired_positions(12, 2, 1, strict=False)[:4] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    assert len(paired_positions(12, 2, 1, strict=False)) == 34
    assert [(j, k) for j, k, _ in paired_positions(2, 2, 1, strict=True)] == [(0, 1)]
    assert unpaired_positions(6, 18)[:3] == [(0, 1), (0, 2), (1, 3)] and len(unpaired_positions(6, 18)) == 17
    assert unpaired_positions(3, 5) == [(0, 1), (1, 2), (1, 3), (2, 4)]


def test_user_points_are_validated_with_reasons():
    net = network([cifar(20), cifar(32)], (3, 32, 32))
    infos = net.plan.infos
    with pytest.raises(PlanError, match="wrong way"):
        build_plan(infos, points=[((1, 2), (0, 3))])
    with pytest.raises(PlanError, match="stage 0 .* stage 1"):
        build_plan(infos, points=[((0, 1), (1, 6))])
    with pytest.raises(PlanError, match="blocks 0..8, not 9"):
        build_plan(infos, points=[((0, 9), (1, 3))])
    with pytest.raises(PlanError, match="anchor 2 does not exist"):
        build_plan(infos, points=[((0, 1), (2, 3))])
    with pytest.raises(PlanError, match=r"\(\(anchor, block\), \(anchor, block\)\)"):
        build_plan(infos, points=["nonsense"])
    # a point equal to a default stitch keeps its layer; a new one gets its own
    default = build_plan(infos)
    s = default.stitches[5]
    p = ((s.route[0].anchor, s.route[0].last), (s.route[1].anchor, s.route[1].first))
    custom = build_plan(infos, points=[p, ((0, 0), (1, 3))])
    assert len(custom.stitches) == 4 and custom.stitches[2].layers == s.layers
    assert custom.stitches[3].layers == ("a0_a1_p0_3",)


def test_shape_mismatch_is_refused():
    small = describe("a", adapt(vit(32, 2)), (3, 32, 32))
    other = describe("b", adapt(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48,
                                                  depth=4, num_heads=3)), (3, 32, 32))
    with pytest.raises(PlanError, match="token counts differ"):
        build_plan([small, other])


def test_plan_json_round_trip():
    plan = network([vit(32, 2), vit(48, 3)], (3, 32, 32)).plan
    data = json.loads(json.dumps(plan.to_json()))
    again = load_plan(data, plan.infos)
    assert again.stitches == plan.stitches and again.layers == plan.layers


def test_regnetx_002_matches_pycls_published_complexity():
    with torch.device("meta"):
        model = timm.create_model("regnetx_002")
    cost = model_cost(model)
    assert (cost.macs, cost.activations, cost.params) == (199_040_872, 2_164_056, 2_684_792)
    assert describe("regnetx_002", adapt(model)).total == cost      # parts add up to the whole


def test_attention_macs_counted_even_when_fused():
    """An independent formula for a ViT: linear layers (with bias), patch conv and attention."""
    dim, depth, n = 64, 2, 17          # 32x32 image, 8x8 patches -> 16 + cls tokens
    model = vit(dim, 4, depth=depth)
    fused = model_cost(model, (3, 32, 32))
    for blk in model.blocks:
        blk.attn.fused_attn = False
    assert model_cost(model, (3, 32, 32)) == fused
    linear = lambda i, o, rows: (i + 1) * o * rows
    per_block = (linear(dim, 3 * dim, n) + linear(dim, dim, n) + linear(dim, 4 * dim, n) + linear(4 * dim, dim, n)
                 + 2 * n * n * dim)                                   # q @ k^T and attn @ v
    expected = linear(3 * 8 * 8, dim, 16) + depth * per_block + linear(dim, 10, 1)
    assert fused.macs == expected


def test_route_cost_sums_its_parts():
    net = network([cifar(20), cifar(32)], (3, 32, 32))
    plan = net.plan
    for s in plan.stitches:
        params = sum(p.numel() for p in net.route_parameters(s))
        assert plan.cost(s).params == params          # counted two independent ways
    a0 = plan.stitches[0]
    assert plan.cost(a0) == model_cost(net.anchors[0], (3, 32, 32))


@pytest.mark.parametrize("family", ["cifar", "vit"])
def test_counted_cost_of_a_stitch_as_its_own_module_equals_the_plan(family):
    """composer.costs counts a stitching layer as the plan does (a 1x1 conv / Linear with bias), so a
    stitch's route run as one module (composer.export.route_of) costs exactly its plan cost."""
    from composer.export import route_of
    torch.set_num_threads(1)
    models = [cifar(20), cifar(32)] if family == "cifar" else [vit(32, 2, seed=1), vit(48, 3, seed=2)]
    net = network(models, (3, 32, 32))
    for s in net.plan.stitches[::2]:
        assert model_cost(route_of(net, s.id)[0], (3, 32, 32)) == net.plan.cost(s), net.plan.describe_route(s)


def test_cifar_resnet20_is_about_41m_macs():
    with torch.device("meta"):
        cost = model_cost(timm.create_model("cifar_resnet20"))
    assert cost.macs == pytest.approx(40.55e6, rel=2e-3)
    assert cost.params == 269_722             # the published count (BN running stats are buffers)
