"""composer.builders.subnet: importance sorting is a pure permutation, extracted sub-networks equal the full
model with the dropped units / blocks removed by hand, and their costs are known exactly."""
import copy
import random

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets)
from composer.costs import model_cost
from composer.io import save_safetensors_atomic
from composer.builders.subnet import (SubnetConfig, SubnetError, elastic_space, extract, importance, masked, permute_,
                             soft_cost, sort_by_importance_, subnet_cost)
from zoo.adapters import UnsupportedModel, adapt

VIT_INPUT = (3, 32, 32)
# timm's own ResNet classes (Basic / Bottleneck blocks) at tiny widths: the same code paths as
# resnet18 / resnet50, a fraction of the time
SMALL_RESNET = {"layers": (2, 2, 2, 2), "channels": (8, 16, 32, 64), "stem_width": 8, "num_classes": 10}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that a wrong permutation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    return _randomise(timm.create_model("cifar_resnet20", pretrained=False))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return _randomise(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=3))


_SPACES = {}


def _space(model: nn.Module, size=None):
    """Spaces of the module's fixture models, counted once (a copy has its original's space)."""
    if id(model) not in _SPACES:
        _SPACES[id(model)] = (model, elastic_space(model, size))   # the model is kept: ids stay unique
    return _SPACES[id(model)][1]


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _random_config(space, rnd: random.Random) -> SubnetConfig:
    depth = [rnd.randint(1, len(space.stage_blocks(s))) for s in range(space.num_stages)]
    return SubnetConfig(depth, {d.key: rnd.randint(1, d.size) for d in space.dims() if rnd.random() < 0.7})


def test_spaces_list_blocks_stages_and_widths(cifar, vit):
    s = _space(cifar)
    assert [b.module for b in s.blocks][:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [len(s.stage_blocks(i)) for i in range(3)] == [3, 3, 3]
    assert [d.size for d in s.dims()] == [16] * 3 + [32] * 3 + [64] * 3
    # the first blocks of stages 2 and 3 downsample (pad shortcut): they cannot be dropped
    assert [b.skippable for b in s.blocks] == [True, True, True, False, True, True, False, True, True]
    v = _space(vit, VIT_INPUT)
    assert [(d.key, d.kind, d.size) for d in v.blocks[1].widths] == [("blocks.1.hidden", "hidden", 768),
                                                                     ("blocks.1.heads", "heads", 3)]
    r50 = elastic_space(timm.create_model("resnet50", pretrained=False, layers=(3, 4, 6, 3), channels=(8, 16, 32, 64),
                                          stem_width=8), (3, 32, 32))
    assert [d.key for d in r50.blocks[0].widths] == ["layer1.0.mid1", "layer1.0.mid2"]
    assert [len(r50.stage_blocks(i)) for i in range(4)] == [3, 4, 6, 3]


@pytest.mark.parametrize("name", ["cifar", "vit", "resnet50"])
def test_sorting_by_importance_does_not_change_outputs(name, cifar, vit):
    if name == "resnet50":
        torch.manual_seed(0)
        model, size = _randomise(timm.create_model("resnet50", pretrained=False, **SMALL_RESNET)), (3, 32, 32)
    else:
        model, size = ({"cifar": cifar, "vit": vit}[name], None if name == "cifar" else VIT_INPUT)
    space = _space(model, size)
    model = copy.deepcopy(model)
    x = torch.randn(4, *space.input_size)
    with torch.no_grad():
        before = model(x)
        scores = importance(model, space)
        assert any(not torch.equal(torch.argsort(s, descending=True, stable=True), torch.arange(len(s)))
                   for s in scores.values()), "the test needs a model whose units are not already sorted"
        sort_by_importance_(model, space)
        after = model(x)
    assert _close(after, before) < 1e-5
    for key, s in importance(model, space).items():   # now most important first
        # (a Bottleneck's mid2 permutation reorders the sums behind mid1's scores: rounding ties)
        assert torch.all(s[:-1] >= s[1:] * (1 - 1e-5)), key
        assert torch.allclose(s.sort().values, scores[key].sort().values)


def test_permute_refuses_what_is_not_a_permutation(cifar):
    space = _space(cifar)
    with pytest.raises(SubnetError, match="not a permutation"):
        permute_(copy.deepcopy(cifar), space, {"layer1.0.mid": torch.zeros(16, dtype=torch.long)})


@pytest.mark.parametrize("name", ["cifar", "vit"])
def test_extract_full_config_is_the_original(name, cifar, vit):
    model, size = (cifar, None) if name == "cifar" else (vit, VIT_INPUT)
    space = _space(model, size)
    sub = extract(model, space, space.full_config())
    x = torch.randn(2, *space.input_size)
    with torch.no_grad():
        assert torch.equal(sub(x), model(x))
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in sub.state_dict().items()) and sub.state_dict().keys() == want.keys()
    assert sub is not model and next(sub.parameters()) is not next(model.parameters())


def _zero_inputs_(model: nn.Module, space, keep: dict[str, torch.Tensor]) -> None:
    """The independent reference: zero the next layer's input weights of every dropped unit."""
    with torch.no_grad():
        for key, kept in keep.items():
            d = space.dim(key)
            blk = model.get_submodule(space.blocks[d.block].module)
            if d.name == "hidden":
                layer, per = blk.mlp.fc2, 1
            elif d.name == "heads":
                layer, per = blk.attn.proj, blk.attn.head_dim
            else:
                layer, per = (blk.conv3 if d.name == "mid2" else blk.conv2), 1
            dropped = torch.ones(d.size, dtype=torch.bool)
            dropped[kept] = False
            layer.weight[:, dropped.repeat_interleave(per)] = 0


@pytest.mark.parametrize("name", ["cifar", "vit"])
def test_extracted_widths_equal_the_model_with_dropped_units_zeroed(name, cifar, vit):
    model, size = (cifar, None) if name == "cifar" else (vit, VIT_INPUT)
    space = _space(model, size)
    rnd = random.Random(1)
    widths = {d.key: rnd.randint(1, d.size - 1) for d in space.dims()}
    sub = extract(model, space, SubnetConfig(space.full_config().depth, widths))
    zeroed = copy.deepcopy(model)
    _zero_inputs_(zeroed, space, {k: torch.arange(v) for k, v in widths.items()})
    x = torch.randn(3, *space.input_size)
    with torch.no_grad():
        want = zeroed(x)
        assert _close(sub(x), want) < 1e-5
        assert _close(model(x), want) > 1e-3      # the cut really changed the function
        masks = {k: (torch.arange(space.dim(k).size) < v).float() for k, v in widths.items()}
        with masked(model, space, masks.get):
            assert _close(model(x), want) < 1e-5
    # physically smaller: fewer parameters, and the attention module really runs fewer heads
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    if name == "vit":
        assert sub.blocks[0].attn.num_heads == widths["blocks.0.heads"]
        assert sub.blocks[0].attn.qkv.out_features == 3 * sub.blocks[0].attn.attn_dim


def test_masks_on_any_units_and_fractional_masks_match_scaled_weights(vit):
    """`masked` checked on its own: arbitrary (non-prefix) 0/1 masks equal zeroed weights, a mask of
    ones changes nothing, and a fractional mask equals scaling the next layer's input weights."""
    space = _space(vit, VIT_INPUT)
    x = torch.randn(2, *VIT_INPUT)
    g = torch.Generator().manual_seed(3)
    keep = {d.key: torch.randperm(d.size, generator=g)[: max(1, d.size // 2)] for d in space.dims()}
    masks = {}
    for k, kept in keep.items():
        masks[k] = torch.zeros(space.dim(k).size)
        masks[k][kept] = 1.0
    zeroed = copy.deepcopy(vit)
    _zero_inputs_(zeroed, space, keep)
    with torch.no_grad():
        with masked(vit, space, masks.get):
            got = vit(x)
        assert _close(got, zeroed(x)) < 1e-5
        with masked(vit, space, lambda k: torch.ones(space.dim(k).size), lambda b: torch.tensor(1.0)):
            assert torch.equal(vit(x), vit(x).clone())
        half = copy.deepcopy(vit)
        half.blocks[1].mlp.fc2.weight[:, :10] *= 0.5
        frac = torch.ones(768)
        frac[:10] = 0.5
        with masked(vit, space, lambda k: frac if k == "blocks.1.hidden" else None):
            assert _close(vit(x), half(x)) < 1e-5
    with torch.no_grad():    # and the hooks are gone afterwards
        assert _close(vit(x), zeroed(x)) > 1e-3


@pytest.mark.parametrize("name", ["cifar", "vit"])
def test_dropped_blocks_equal_running_the_remaining_blocks_by_hand(name, cifar, vit):
    model, size = (cifar, None) if name == "cifar" else (vit, VIT_INPUT)
    space = _space(model, size)
    depth = [2, 1, 3] if name == "cifar" else [2]
    config = SubnetConfig(depth, skip=[1] if name == "cifar" else [])
    kept = [True, False, False, True, False, False, True, True, True] if name == "cifar" else [True, True, False]
    assert space.kept_blocks(config) == kept
    sub = extract(model, space, config)
    a = adapt(model)                      # stem -> the kept blocks -> head, run by hand
    x = torch.randn(2, *space.input_size)
    with torch.no_grad():
        h = a.stem(x)
        for i, k in enumerate(kept):
            if k:
                h = a.unit(i, h)
        want = a.head(h)
        assert _close(sub(x), want) < 1e-6
        assert _close(model(x), want) > 1e-3
        with masked(model, space, lambda k: None, lambda b: None if kept[b] else torch.tensor(0.0)):
            assert _close(model(x), want) < 1e-6
    assert model_cost(sub, space.input_size).macs < model_cost(model, space.input_size).macs


@pytest.mark.parametrize("arch,kwargs,size", [("cifar_resnet20", {}, None),
                                              ("deit_tiny_patch16_224", {"img_size": 32, "depth": 3}, VIT_INPUT),
                                              ("resnet18", SMALL_RESNET, (3, 32, 32)),
                                              ("resnet50", SMALL_RESNET, (3, 32, 32))])
def test_subnet_cost_equals_the_counted_cost_of_the_extracted_model(arch, kwargs, size):
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    space = _space(model, size)
    assert subnet_cost(space, space.full_config()) == model_cost(model, space.input_size)
    rnd = random.Random(arch)
    for _ in range(3):
        config = _random_config(space, rnd)
        assert subnet_cost(space, config) == model_cost(extract(model, space, config), space.input_size), config


def test_soft_cost_is_differentiable_and_linear_in_a_basic_width(cifar):
    space = _space(cifar)
    k = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)   # MACs beyond float32's 2^24
    macs = soft_cost(space, {"layer2.1.mid": k})["macs"]
    macs.backward()
    full = space.full_config()
    exact = [subnet_cost(space, SubnetConfig(full.depth, {"layer2.1.mid": n})).macs for n in (9, 10)]
    assert float(macs.detach()) == exact[1]
    assert float(k.grad) == exact[1] - exact[0] > 0
    dropped = soft_cost(space, keep={4: 0.0})["macs"]
    assert dropped == subnet_cost(space, SubnetConfig(full.depth, skip=[4])).macs


def test_extracted_model_saves_and_loads_with_safetensors(vit, tmp_path):
    space = _space(vit, VIT_INPUT)
    config = SubnetConfig([2], {"blocks.0.heads": 1, "blocks.1.heads": 2, "blocks.0.hidden": 100})
    sub = extract(vit, space, config)
    save_safetensors_atomic(tmp_path / "model.safetensors", sub.state_dict())
    fresh = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=3)
    rebuilt = extract(fresh, elastic_space(fresh, VIT_INPUT), config)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = torch.randn(2, *VIT_INPUT)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), sub(x))
    program = torch.export.export(sub, (x,))     # a plain module: torch.export traces it
    with torch.no_grad():
        assert _close(program.module()(x), sub(x)) < 1e-5


def test_bad_configurations_and_models_are_refused_with_reasons(cifar):
    space = _space(cifar)
    for config, match in [(SubnetConfig([3, 3]), "3 stages"), (SubnetConfig([0, 3, 3]), "not in 1..3"),
                          (SubnetConfig([3, 3, 3], {"layer1.0.mid": 17}), "not in 1..16"),
                          (SubnetConfig([3, 3, 3], {"layer9.0.mid": 2}), "no width"),
                          (SubnetConfig([3, 3, 3], skip=[3]), "cannot be dropped"),
                          (SubnetConfig([3, 3, 3], skip=[0]), "first block")]:
        with pytest.raises(SubnetError, match=match):
            extract(cifar, space, config)
    with pytest.raises(SubnetError):
        SubnetConfig.from_dict({"widths": {}})
    assert SubnetConfig.from_dict(SubnetConfig([1, 2, 3], {"layer1.0.mid": 4}).to_dict()) == \
        SubnetConfig([1, 2, 3], {"layer1.0.mid": 4})
    with pytest.raises(UnsupportedModel, match="not supported for ConvNeXt"):
        elastic_space(timm.create_model("convnext_atto", pretrained=False))
