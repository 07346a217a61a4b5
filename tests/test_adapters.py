"""Block adapters: running stem -> units -> head must be exactly the timm model's forward."""
import pytest
import timm
import torch

from tests.engine_models import FAMILIES, tiny
from zoo.adapters import UnsupportedModel, adapt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_reproduces_forward(family):
    model, size = tiny(family)
    a = adapt(model)
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(a.forward(x), model(x))
    # stages are contiguous and start at 0; every unit after a stage's first keeps its shape
    stages = [u.stage for u in a.units]
    assert stages == sorted(stages) and stages[0] == 0
    with torch.no_grad():
        h = a.stem(x)
        for i, u in enumerate(a.units):
            y = a.unit(i, h)
            if i > 0 and a.units[i - 1].stage == u.stage:
                assert y.shape == h.shape, f"unit {i} changes shape inside stage {u.stage}"
            h = y


@pytest.mark.parametrize("family", ["resnet", "convnext", "swin", "cifar_resnet"])
def test_stage_ends_match_timm_feature_maps(family):
    """Independent check against timm's own forward_intermediates / feature stages."""
    model, size = tiny(family)
    a = adapt(model)
    x = torch.randn(1, *size)
    with torch.no_grad():
        if family == "cifar_resnet":
            ref = [model.layer1(torch.relu(model.bn1(model.conv1(x))))]
            ref.append(model.layer2(ref[0]))
            ref.append(model.layer3(ref[1]))
        else:
            ref = model.forward_intermediates(x, intermediates_only=True)
        h, ends = a.stem(x), []
        for i, u in enumerate(a.units):
            h = a.unit(i, h)
            if i == len(a.units) - 1 or a.units[i + 1].stage != u.stage:
                ends.append(h.permute(0, 3, 1, 2) if a.layout == "nhwc" else h)
    ref = ref[len(ref) - len(ends):]   # timm's ResNet also returns the stem's map first
    assert len(ends) == len(ref) >= 3
    for got, want in zip(ends, ref):
        torch.testing.assert_close(got, want)


def test_parameters_partitioned_exactly():
    model, _ = tiny("vit")
    a = adapt(model)
    parts = ["stem", "head"] + list(range(len(a.units)))
    ids = [id(p) for part in parts for p in a.part_parameters(part)]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_unsupported_model_names_what_is_missing():
    with torch.device("meta"):
        model = timm.create_model("mixer_s16_224", pretrained=False)
    with pytest.raises(UnsupportedModel, match="no block adapter for MlpMixer.*supported: .*VisionTransformer"):
        adapt(model)
