"""Every cost in one place: MACs, params, activations per part of an anchor, per stitch.

Conventions (say them wherever a number is shown):
- MACs: one multiply-add = 1. torch's FlopCounterMode counts 2 per multiply-add, so we halve it.
  "FLOPs" means 2 x MACs and is only ever derived from MACs.
- Attention matmuls are counted even when timm runs fused `scaled_dot_product_attention`:
  on CPU that op is `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode (and
  fvcore) silently skip, so we map it to torch's own SDPA formula.
- Biases of conv/linear layers add one MAC per output element, as pycls counts them (this is
  what makes timm's regnetx_002 come to pycls's published 199,040,872 exactly).
- Activations: number of output elements of every Conv/Linear layer and of every (non-global)
  pooling layer, as pycls's complexity counter counts them (`conv2d_cx`, `linear_cx`, `pool2d_cx`:
  a ResNet's stem max-pool counts, the global average pool before the head does not), stitching
  layers included (Fast Scaling's activations).
- Params: only the parameters a route runs (its anchors' parts plus its stitching layers).
All counts are per image (batch 1).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from zoo.adapters import BlockAdapter

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# Ops that FlopCounterMode's registry misses; the formula is torch's own (FlopCounterMode
# wraps custom entries to pass shapes).
_EXTRA_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@dataclass
class Cost:
    macs: int = 0
    params: int = 0
    activations: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.macs + other.macs, self.params + other.params, self.activations + other.activations)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnchorInfo:
    """What planning and costing need to know about one anchor, measured once."""
    name: str
    layout: str
    input_size: tuple[int, int, int]
    stages: list[int]                      # stage of each unit
    in_shapes: list[tuple[int, ...]]       # per unit, without batch
    out_shapes: list[tuple[int, ...]]
    stem: Cost
    units: list[Cost]
    head: Cost
    total: Cost = field(init=False)

    def __post_init__(self):
        total = self.stem + self.head
        for c in self.units:
            total = total + c
        self.total = total

    @property
    def depth(self) -> int:
        return len(self.units)

    def stage_units(self, stage: int) -> list[int]:
        return [i for i, s in enumerate(self.stages) if s == stage]

    @property
    def num_stages(self) -> int:
        return max(self.stages) + 1


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


class _Meter:
    """Counts conv/linear output elements (activations) and bias additions while active."""

    def __init__(self, model: nn.Module):
        self.activations = 0
        self.bias_macs = 0
        # SN-Net's stitching layers (composer.snnet.StitchLayer, named here: snnet imports this
        # module) are a 1x1 conv / Linear with bias too, as `stitch_layer_cost` counts them.
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                         or type(m).__name__ == "StitchLayer"]
        # pycls's pool2d_cx: a pooling layer's output counts (timm's ResNet stem max-pool: 64 x 56 x 56
        # at 224); adaptive (global) pools are pycls's gap2d_cx, which counts nothing
        self._handles += [m.register_forward_hook(self._pool_hook) for m in model.modules()
                          if isinstance(m, _POOLS)]

    def _hook(self, module, args, out):
        n = out[0].numel() if out.dim() > 1 else out.numel()  # per image (batch 1)
        self.activations += n
        if module.bias is not None:
            self.bias_macs += n

    def _pool_hook(self, module, args, out):
        out = out[0] if isinstance(out, tuple) else out   # max-pool with return_indices
        self.activations += out[0].numel() if out.dim() > 1 else out.numel()

    def reset(self):
        self.activations = self.bias_macs = 0

    def close(self):
        for h in self._handles:
            h.remove()


def _count(meter: _Meter, fn, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    meter.reset()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        y = fn(x)
    return y, counter.get_total_flops() // 2 + meter.bias_macs


def model_cost(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> Cost:
    """MACs, params and activations of a whole model for one image."""
    input_size = input_size or tuple(model.pretrained_cfg["input_size"])
    meter = _Meter(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, macs = _count(meter, model, torch.zeros(1, *input_size, device=_device(model)))
    finally:
        meter.close()
        model.train(was_training)
    return Cost(macs, sum(p.numel() for p in model.parameters()), meter.activations)


def describe(name: str, adapter: BlockAdapter, input_size: tuple[int, int, int] | None = None) -> AnchorInfo:
    """Run one image through the anchor part by part, recording shapes and costs."""
    model = adapter.model
    input_size = tuple(input_size or model.pretrained_cfg["input_size"])
    meter = _Meter(model)
    was_training = model.training
    model.eval()

    def measure(part, fn, x):
        y, macs = _count(meter, fn, x)
        params = sum(p.numel() for p in adapter.part_parameters(part))
        return y, Cost(macs, params, meter.activations)

    try:
        with torch.no_grad():
            x, stem = measure("stem", adapter.stem, torch.zeros(1, *input_size, device=_device(model)))
            in_shapes, out_shapes, units = [], [], []
            for i in range(len(adapter.units)):
                in_shapes.append(tuple(x.shape[1:]))
                x, c = measure(i, lambda t: adapter.unit(i, t), x)
                out_shapes.append(tuple(x.shape[1:]))
                units.append(c)
            _, head = measure("head", adapter.head, x)
    finally:
        meter.close()
        model.train(was_training)
    return AnchorInfo(name, adapter.layout, input_size, [u.stage for u in adapter.units],
                      in_shapes, out_shapes, stem, units, head)


def _device(model: nn.Module) -> torch.device:
    """Counting also works on the meta device: shapes and MACs without computing anything."""
    return next(model.parameters()).device


def channels(shape: tuple[int, ...], layout: str) -> int:
    return shape[0] if layout == "nchw" else shape[-1]


def positions(shape: tuple[int, ...], layout: str) -> int:
    """Number of spatial positions / tokens a per-position stitching layer is applied to."""
    n = 1
    for d in (shape[1:] if layout == "nchw" else shape[:-1]):
        n *= d
    return n


def stitch_layer_cost(in_ch: int, out_ch: int, n_positions: int) -> Cost:
    """A Linear / 1x1 conv with bias applied at every position (bias counted as above)."""
    return Cost((in_ch + 1) * out_ch * n_positions, in_ch * out_ch + out_ch, out_ch * n_positions)


def measure_latency(fn, x: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn(x) in milliseconds, on whatever device x lives (synchronised on GPU).
    Latency is the user's own device's property: measure it there, never trust a table from elsewhere."""
    import time
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=512)
def architecture_macs(name: str) -> int:
    """MACs of a timm architecture by name (tag and hf-hub:timm/ prefix ignored), counted on the
    meta device: instant and offline, which is what sorting a Hub family needs."""
    import timm
    arch = name.removeprefix("hf-hub:").removeprefix("timm/").split(".")[0]
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return model_cost(model).macs
