"""Activations counted as pycls's complexity counter counts them, checked against pycls's rules
applied by hand (no forward pass, no hooks): conv2d_cx and linear_cx add their output elements,
pool2d_cx adds the pooled output (a ResNet stem's max-pool), gap2d_cx (the global average pool)
adds nothing; norms and activations add nothing."""
from __future__ import annotations

import timm
import torch

from composer.costs import describe, model_cost
from zoo.adapters import adapt


def pycls_resnet50_activations(size: int = 224) -> tuple[int, int]:
    """(stem, whole model) activations of timm's ResNet-50 (stride on the 3x3 conv of a
    bottleneck, projection shortcut in each stage's first block) by pycls's rules."""
    out = lambda r, stride: (r - 1) // stride + 1            # pycls's spatial size after a strided op
    r = out(size, 2)
    stem = 64 * r * r                                        # 7x7 conv, stride 2: 64 x 112 x 112
    r = out(r, 2)
    stem += 64 * r * r                                       # 3x3 max-pool, stride 2: 64 x 56 x 56
    acts = stem
    for width, out_width, depth, stride in ((64, 256, 3, 1), (128, 512, 4, 2), (256, 1024, 6, 2), (512, 2048, 3, 2)):
        for i in range(depth):
            r_in, s = r, (stride if i == 0 else 1)
            r = out(r_in, s)
            acts += width * r_in * r_in                      # 1x1 reduce, at the block's input size
            acts += width * r * r                            # 3x3, strided
            acts += out_width * r * r                        # 1x1 expand
            if i == 0:
                acts += out_width * r * r                    # 1x1 projection shortcut
    return stem, acts + 1000                                 # global pool: nothing; fc: 1000 outputs


def test_resnet50_activations_count_the_stem_max_pool():
    stem, total = pycls_resnet50_activations()
    assert (stem, total) == (1_003_520, 11_315_688)          # the numbers the rules give, written out
    with torch.device("meta"):                               # shapes only: instant, no weights
        model = timm.create_model("resnet50")
    assert model_cost(model, (3, 224, 224)).activations == total
    info = describe("resnet50", adapt(model), (3, 224, 224))
    assert info.stem.activations == stem                     # the pool is in the stem part
    assert info.total.activations == total


def test_global_pool_adds_nothing():
    """A model whose only pooling is the global one: conv + fc outputs, nothing for the pool."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 5))
    assert model_cost(model, (3, 16, 16)).activations == 8 * 16 * 16 + 5
    pooled = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(3, 2, 1),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    assert model_cost(pooled, (3, 16, 16)).activations == 8 * 16 * 16 + 8 * 8 * 8 + 5
