"""Device and precision: the words the fronts pass (`resolve_device`, `resolve_precision`), and
bf16 evaluation against fp32, on a tiny model and (slow, with ../shared) on the real CIFAR stitches."""
from __future__ import annotations

import pytest
import torch

from composer.device import DeviceError, autocast, resolve_device, resolve_precision
from composer.errors import UserError
from composer.evaluate import evaluate_all
from composer.fit import fit_stitches
from tests.conftest import need_shared
from tests.engine_models import vit_family


def test_resolve_device():
    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu") == resolve_device(None)
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    for bad, words in (("gpu", "not one of auto, cpu, cuda"), ("cuda:x", "cuda:N")):
        with pytest.raises(DeviceError, match=words):
            resolve_device(bad)
    assert issubclass(DeviceError, UserError)
    if not cuda:
        for spec in ("cuda", "cuda:0"):
            with pytest.raises(DeviceError, match="CUDA is not available here"):
                resolve_device(spec)
    else:
        with pytest.raises(DeviceError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == resolve_precision(None, cpu) == "fp32"   # CPU default
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "bfloat16", "fp16", "half")] == \
        ["fp32", "bf16", "bf16", "fp16", "fp16"]
    with pytest.raises(DeviceError, match="not one of auto, fp32, bf16, fp16"):
        resolve_precision("int8", cpu)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_bf16_evaluation_agrees_with_fp32_on_a_tiny_model():
    net = vit_family()
    torch.manual_seed(0)
    fit_stitches(net, [torch.randn(6, 3, 32, 32)])
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    fp32 = evaluate_all(net, [(x, y)], precision="fp32")
    bf16 = evaluate_all(net, [(x, y)], precision="bf16")
    assert fp32.images == bf16.images == 24
    for s in net.plan.stitches:
        with torch.no_grad():
            ref = net.select(s.id)(x)
            with autocast("bf16", "cpu"):
                low = net.select(s.id)(x).float()
        err = (low - ref).abs().max()
        assert err <= 0.05 * ref.abs().max(), (s.id, float(err))     # bf16: 8-bit mantissa, a few blocks deep
        # predictions may differ only where fp32's top-two logits are closer than bf16's error
        top2 = ref.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * err
        assert torch.equal(bf16.predictions[s.id][sure], fp32.predictions[s.id][sure]), s.id
        assert torch.equal(fp32.predictions[s.id], ref.argmax(-1))


@pytest.mark.slow   # fits 40 CIFAR networks and evaluates 10 of them twice on 846 images: a minute on 2 cores
def test_bf16_top1_of_real_cifar_stitches_within_half_a_point(tmp_path):
    """On the 846 exact CIFAR-10 test images (../shared/data/README.md: the first 846 of the official
    test batch with their exact pixels), bf16 autocast changes no network's top-1 by more than 0.5
    point. Skipped without ../shared (the team's weights and images; absent on a fresh machine)."""
    need_shared()
    from bench.cifar10 import cifar10_splits, cifar_anchor_specs
    from composer import data
    from composer.fit import calibrate_route_stats
    from composer.run import build_network
    torch.set_num_threads(1)
    splits, specs = cifar10_splits(tmp_path), cifar_anchor_specs(tmp_path)
    net = build_network(specs)
    cfg = data.data_config(net.anchors[0])
    calib = [x for x, _ in data.loader(data.subset(data.open_dataset(str(splits.calib), cfg), 64, seed=0), 64)]
    fit_stitches(net, calib)
    calibrate_route_stats(net, calib)
    batches = list(data.loader(data.open_dataset(str(splits.exact846), cfg), 256))
    assert sum(len(y) for _, y in batches) == 846
    n_anchors = len(net.plan.anchors)
    # anchors + every 6th stitch (both stages, every anchor pair): bf16 runs 2-4x slower than fp32 on this CPU
    ids = list(range(n_anchors)) + list(range(n_anchors, len(net.plan.stitches), 6))
    fp32 = evaluate_all(net, batches, stitch_ids=ids, precision="fp32")
    bf16 = evaluate_all(net, batches, stitch_ids=ids, precision="bf16")
    gaps = {i: abs(bf16.top1[i] - fp32.top1[i]) for i in ids}
    print(f"bf16 vs fp32 top-1 on 846 exact images, {len(ids)} networks: largest gap {max(gaps.values()):.3f} points, "
          f"{sum(g > 0 for g in gaps.values())} networks changed; fp32 anchors {[fp32.top1[i] for i in range(n_anchors)]}")
    assert max(gaps.values()) <= 0.5, gaps
    assert all(fp32.top1[i] > 85 for i in range(n_anchors)), fp32.top1        # the real anchors (~92 %)
