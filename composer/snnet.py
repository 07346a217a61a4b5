"""The stitched network (SN-Net): anchors + stitching layers, one route selected at a time.

`StitchedNetwork.select(i)` switches instantly: it only changes which route `forward` runs.
A route runs the first anchor's stem, its units, a stitching layer, the next anchor's units, and
the last anchor's head (its final norm included).

BatchNorm statistics are per route (switchable BN, as slimmable networks keep them per width):
behind a stitching layer the features are the stitch's, not the anchor's, so every BatchNorm
after the stitch point has running statistics of its own for that stitch (`route_stats`; weights
and affine parameters stay shared). A route's front runs exactly as its first anchor does, so it
uses that anchor's statistics and shared-prefix evaluation stays exact. Measured on the CIFAR
ResNets: re-estimating these statistics after least squares more than halves the median gap to the anchor
line (-10.3 -> -4.2 points on 5,000 images, composer.fit.calibrate_route_stats). LayerNorm families have none.
Those BatchNorms' affine scale and shift are the stitch's own too (as in slimmable networks'
switchable BN): they start as the anchor's, and a fine-tune can adapt what lies behind a stitch point
without moving the anchors, which keep exactly what they knew (bench/RESULTS.md, issue 15).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from composer.plan import LayerSpec, Stitch, StitchPlan
from zoo.adapters import BlockAdapter, adapt


def resample(x: torch.Tensor, size) -> torch.Tensor:
    """Channels-first maps or images onto another grid (bilinear; antialiased when shrinking)."""
    size = tuple(int(v) for v in size)
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class StitchLayer(nn.Module):
    """A per-position affine map between two anchors' widths.

    Stored as a Linear (weight out x in, bias); applied as a 1x1 conv on channels-first maps
    (SN-Net's CNN stitching layer) and as a Linear on tokens / channels-last maps. Between
    layouts (a CNN into Swin, say) it also reshapes, which is all cross-family stitching needs.

    With `rank` R (SN-Netv2's low-rank stitching layers): the weight (least squares) is frozen and
    training learns an update B A (B: out x R, zero at the start, so the fitted layer is unchanged;
    A: R x in, small random) and the bias: R (in + out) + out trained numbers instead of
    out (in + 1). `merged_weight()` is W + B A, what an export stores as one matrix.
    """

    def __init__(self, spec: LayerSpec, rank: int | None = None):
        super().__init__()
        self.in_layout, self.out_layout = spec.in_layout, spec.out_layout
        self.rank = rank
        self.weight = nn.Parameter(torch.zeros(spec.out_channels, spec.in_channels), requires_grad=rank is None)
        self.bias = nn.Parameter(torch.zeros(spec.out_channels))
        with torch.no_grad():  # identity where widths allow: a harmless start before fitting
            n = min(spec.in_channels, spec.out_channels)
            self.weight[:n, :n] = torch.eye(n)
        if rank is not None:
            # LoRA's start (A as nn.Linear's default init, B zero), from a fixed generator: building
            # a network must not move the global random stream that training's seeds rely on
            bound = 1 / spec.in_channels ** 0.5
            g = torch.Generator().manual_seed(zlib.crc32(spec.key.encode()))
            self.lora_a = nn.Parameter((torch.rand(rank, spec.in_channels, generator=g) * 2 - 1) * bound)
            self.lora_b = nn.Parameter(torch.zeros(spec.out_channels, rank))

    def merged_weight(self) -> torch.Tensor:
        """The layer's weight as one matrix (W + B A for a low-rank layer)."""
        return self.weight if self.rank is None else self.weight + self.lora_b @ self.lora_a

    def forward(self, x: torch.Tensor, out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        weight = self.merged_weight()
        if self.in_layout == self.out_layout == "nchw":
            y = F.conv2d(x, weight[:, :, None, None], self.bias)
            # anchors run at their own resolutions (`fit --resolution native`): onto the next anchor's grid.
            # Bilinear weights sum to 1, so resampling after the map equals mapping resampled features
            # (what least squares fits, composer.fit) and the map runs on the front's grid (its cost).
            return y if out_shape is None or y.shape[-2:] == tuple(out_shape[-2:]) else resample(y, out_shape[-2:])
        rows = x.flatten(2).transpose(1, 2) if self.in_layout == "nchw" else x   # (B, ..., C)
        y = F.linear(rows, weight, self.bias)
        if self.out_layout == self.in_layout:
            return y
        b = x.shape[0]
        if self.out_layout == "nchw":      # (B, P, C) or (B, H, W, C) -> (B, C, H, W)
            return y.reshape(b, -1, y.shape[-1]).transpose(1, 2).reshape(b, -1, *out_shape[1:])
        if self.out_layout == "nhwc":
            return y.reshape(b, *out_shape)
        return y.reshape(b, -1, y.shape[-1])  # tokens


class StitchedNetwork(nn.Module):
    """All stitches of a plan in one module; `select` picks the route `forward` runs."""

    def __init__(self, anchors: list[nn.Module], plan: StitchPlan, stitch_rank: int | None = None):
        """stitch_rank: low-rank stitching layers (see StitchLayer); None: full ones."""
        super().__init__()
        if len(anchors) != len(plan.anchors):
            raise ValueError(f"plan has {len(plan.anchors)} anchors, got {len(anchors)} models")
        self.plan = plan
        self.stitch_rank = stitch_rank
        self.anchors = nn.ModuleList(anchors)
        self.adapters: list[BlockAdapter] = [adapt(m) for m in anchors]
        self.stitch_layers = nn.ModuleDict({k: StitchLayer(s, stitch_rank) for k, s in plan.layers.items()})
        self.stitch_id = 0
        # Training only what lies behind a stitch point (`TrainConfig.frozen_fronts`): a stitch's route
        # runs its first anchor's blocks without gradient, so they learn only from that anchor's own route.
        self.frozen_fronts = False
        # stitch id -> names of the BatchNorms behind its stitch point; their private statistics
        all_bns = {n: m for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self._route_bns: dict[int, list[str]] = {}
        self.route_stats = nn.ModuleDict()
        for s in plan.stitches:
            back = tuple(self.back_prefixes(s))
            names = [n for n in all_bns if _owned(n, back)]
            if names:
                self._route_bns[s.id] = names
                self.route_stats[str(s.id)] = RouteStats([all_bns[n] for n in names])

    @property
    def stitches(self) -> list[Stitch]:
        return self.plan.stitches

    def select(self, stitch_id: int) -> "StitchedNetwork":
        if not 0 <= stitch_id < len(self.plan.stitches):
            raise IndexError(f"stitch {stitch_id} does not exist (0..{len(self.plan.stitches) - 1})")
        self.stitch_id = stitch_id
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.plan.stitches[self.stitch_id], x)

    @property
    def input_anchor(self) -> int:
        """The anchor whose preprocessing the data follows: the first, or with native resolutions the
        one with the largest input size (the others take their images from it, resized)."""
        sizes = [info.input_size[1] * info.input_size[2] for info in self.plan.infos]
        return sizes.index(max(sizes)) if self.plan.native_resolution else 0

    def stem(self, anchor: int, x: torch.Tensor) -> torch.Tensor:
        """Anchor `anchor`'s stem on images (resized to its input size when anchors run at their own)."""
        size = self.plan.infos[anchor].input_size[1:]
        if self.plan.native_resolution and tuple(x.shape[-2:]) != tuple(size):
            x = resample(x, size)
        return self.adapters[anchor].stem(x)

    def run(self, stitch: Stitch, x: torch.Tensor) -> torch.Tensor:
        """Logits of one route from images."""
        first = stitch.route[0]
        if not (self.frozen_fronts and stitch.layers and torch.is_grad_enabled()):
            return self.run_from(stitch, self.stem(first.anchor, x), start=first.first)
        with torch.no_grad():
            x = self.stem(first.anchor, x)
            for u in range(first.first, first.last + 1):
                x = self.adapters[first.anchor].unit(u, x)
        return self.run_from(stitch, x, start=first.last + 1)

    def run_from(self, stitch: Stitch, x: torch.Tensor, start: int) -> torch.Tensor:
        """Finish a route from the input of unit `start` of its first segment (shared prefixes)."""
        with self.route_statistics(stitch):
            return self._run_from(stitch, x, start)

    @contextmanager
    def route_statistics(self, stitch: Stitch):
        """Point the BatchNorms behind the stitch point at the stitch's own running statistics and
        affine parameters (no copy: in train mode updates and gradients land there). Front BatchNorms
        belong to the first anchor, never to a back segment, so they are untouched."""
        bns = self._route_bns.get(stitch.id)
        if not bns:
            yield
            return
        stats = self.route_stats[str(stitch.id)]
        bns = [self.get_submodule(n) for n in bns]
        saved = [(m.running_mean, m.running_var, m.weight, m.bias) for m in bns]
        for i, m in enumerate(bns):
            m._buffers["running_mean"], m._buffers["running_var"] = stats.mean(i), stats.var(i)
            if m.affine:
                m._parameters["weight"], m._parameters["bias"] = stats.weight(i), stats.bias(i)
        try:
            yield
        finally:
            for m, (mean, var, weight, bias) in zip(bns, saved):
                m._buffers["running_mean"], m._buffers["running_var"] = mean, var
                if m.affine:
                    m._parameters["weight"], m._parameters["bias"] = weight, bias

    def _run_from(self, stitch: Stitch, x: torch.Tensor, start: int) -> torch.Tensor:
        for i, seg in enumerate(stitch.route):
            a = self.adapters[seg.anchor]
            for u in range(start if i == 0 else seg.first, seg.last + 1):
                x = a.unit(u, x)
            if i < len(stitch.layers):
                nxt = stitch.route[i + 1]
                x = self.stitch_layers[stitch.layers[i]](x, self.plan.infos[nxt.anchor].in_shapes[nxt.first])
        return self.adapters[stitch.route[-1].anchor].head(x)

    def route_prefixes(self, stitch: Stitch) -> list[str]:
        """State-dict prefixes of everything a route runs (to count, train or export exactly it)."""
        first, last = stitch.route[0], stitch.route[-1]
        prefixes = [f"anchors.{first.anchor}.{n}" for n in self.adapters[first.anchor].stem_modules]
        for seg in stitch.route:
            units = self.adapters[seg.anchor].units[seg.first:seg.last + 1]
            prefixes += [f"anchors.{seg.anchor}.{n}" for u in units for n in u.modules]
        prefixes += [f"stitch_layers.{k}" for k in stitch.layers]
        prefixes += [f"anchors.{last.anchor}.{n}" for n in self.adapters[last.anchor].head_modules]
        return prefixes

    def route_bn_names(self, stitch: Stitch) -> list[str]:
        """Module names of the BatchNorms that run on the stitch's own statistics (in `route_stats`)."""
        return list(self._route_bns.get(stitch.id, []))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; weights saved before route statistics existed (no `route_stats.` keys)
        load with every route on its anchors' statistics, which is what those runs computed."""
        state_dict = dict(state_dict)
        has_stats = any(k.startswith("route_stats.") for k in state_dict)
        for sid, names in self._route_bns.items():
            for i, n in enumerate(names):
                # weights saved before route statistics: the anchors' statistics; before private
                # affine parameters: the anchors' scale and shift (what those runs computed)
                own = (("weight", "weight"), ("bias", "bias")) + (() if has_stats else
                                                                  (("mean", "running_mean"), ("var", "running_var")))
                for stat, key in own:
                    if f"route_stats.{sid}.{stat}{i}" not in state_dict and f"{n}.{key}" in state_dict:
                        state_dict[f"route_stats.{sid}.{stat}{i}"] = state_dict[f"{n}.{key}"].clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict() with every low-rank stitching layer as one plain weight (W + B A) and no
        A / B: what a network with full stitching layers loads (exports are plain)."""
        state = self.state_dict()
        for key, layer in self.stitch_layers.items():
            if layer.rank is not None:
                state[f"stitch_layers.{key}.weight"] = layer.merged_weight().detach()
                del state[f"stitch_layers.{key}.lora_a"], state[f"stitch_layers.{key}.lora_b"]
        return state

    def back_prefixes(self, stitch: Stitch) -> list[str]:
        """State-dict prefixes of what a route runs behind its first stitch point (empty for an anchor)."""
        if len(stitch.route) == 1:
            return []
        last = stitch.route[-1]
        prefixes = [f"anchors.{seg.anchor}.{n}" for seg in stitch.route[1:]
                    for u in self.adapters[seg.anchor].units[seg.first:seg.last + 1] for n in u.modules]
        return prefixes + [f"anchors.{last.anchor}.{n}" for n in self.adapters[last.anchor].head_modules]

    def route_parameters(self, stitch: Stitch) -> list[nn.Parameter]:
        prefixes = tuple(self.route_prefixes(stitch))
        return [p for n, p in self.named_parameters() if _owned(n, prefixes)]


class RouteStats(nn.Module):
    """One stitch's running mean and variance, and affine scale and shift, for each BatchNorm behind
    its stitch point; they start as the anchor's (so a new SN-Net computes what the anchors give)."""

    def __init__(self, bns: list[nn.modules.batchnorm._BatchNorm]):
        super().__init__()
        for i, m in enumerate(bns):
            self.register_buffer(f"mean{i}", m.running_mean.detach().clone())
            self.register_buffer(f"var{i}", m.running_var.detach().clone())
            if m.affine:
                self.register_parameter(f"weight{i}", nn.Parameter(m.weight.detach().clone()))
                self.register_parameter(f"bias{i}", nn.Parameter(m.bias.detach().clone()))

    def weight(self, i: int) -> nn.Parameter:
        return self._parameters[f"weight{i}"]

    def bias(self, i: int) -> nn.Parameter:
        return self._parameters[f"bias{i}"]

    def mean(self, i: int) -> torch.Tensor:
        return self._buffers[f"mean{i}"]

    def var(self, i: int) -> torch.Tensor:
        return self._buffers[f"var{i}"]


def _owned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def prefix_outputs(net: StitchedNetwork, x: torch.Tensor, needed: dict[int, set[int]]) -> dict[tuple[int, int], torch.Tensor]:
    """Run each anchor once, keeping the output of unit j for every j in needed[anchor]
    (j = -1 is the stem's output). Anchors run only as deep as their deepest needed unit."""
    out = {}
    for a, js in needed.items():
        if not js:
            continue
        ad = net.adapters[a]
        h = net.stem(a, x)
        if -1 in js:
            out[(a, -1)] = h
        for u in range(max(js) + 1):
            h = ad.unit(u, h)
            if u in js:
                out[(a, u)] = h
    return out
