"""Fast Scaling (Dollar, Singh, Girshick, CVPR 2021): the dWr rule, predicted costs of a scaled
model, where a missing anchor size would fill a gap in the curve, and how well MACs and activations
each predict latency on this device.

dWr scales a model by a factor s in MACs: depth by d = s^((1-alpha)/2), width by w = s^(alpha/2),
resolution by r = s^((1-alpha)/4), so that d * w^2 * r^2 = s (alpha = 0.8 by default, the paper's
"fast compound scaling": mostly width, which grows activations only as s^(1 - alpha/2)).
Rounding as pycls does it: widths to multiples of 8, depths to integers >= 1, resolution to
multiples of 4 (ViTs: of lcm(4, patch size), so that patches tile the image).

A scaled config is never trained here: its costs are *predicted* by building it on the meta
device (no memory, no weights) and counting it with `composer.costs.model_cost`. Families whose
depth, width and resolution can be set when they are built: the CIFAR ResNets (zoo/cifar_resnet),
timm ResNets (`layers`, `channels`), timm ViTs (`depth`, `embed_dim`, `num_heads`, `img_size`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets and starter ViTs with timm)
from composer.costs import Cost, model_cost
from composer.errors import UserError
from zoo.sources import short_name

FAMILIES = ("cifar_resnet", "resnet", "vit")


class ScaleError(UserError):
    """A scaling request that cannot be met; the message says why."""


@dataclass(frozen=True)
class ScaleConfig:
    """What dWr changes in a model, plus what it needs to rebuild it (frozen: hashable, cached)."""
    family: str                    # one of FAMILIES
    arch: str                      # timm architecture name, e.g. "cifar_resnet20", "resnet50"
    depths: tuple[int, ...]        # blocks per stage (a ViT is one stage)
    widths: tuple[int, ...]        # per stage: CIFAR ResNet channels, timm ResNet `channels`
                                   # (planes; Bottleneck outputs 4x), ViT embed_dim
    resolution: int                # input side in pixels
    num_classes: int = 1000
    in_chans: int = 3
    head_dim: int | None = None    # ViT: kept while the width grows (heads = width / head_dim)
    patch: int = 1                 # ViT patch size: the resolution stays a multiple of it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["widths"] = list(self.depths), list(self.widths)
        if self.family == "vit":
            d["heads"] = vit_heads(self.widths[0], self.head_dim)
        return d

    def describe(self) -> str:
        heads = f" heads={vit_heads(self.widths[0], self.head_dim)}" if self.family == "vit" else ""
        return (f"{self.arch} d={','.join(map(str, self.depths))} w={','.join(map(str, self.widths))}"
                f"{heads} r={self.resolution}")


def dwr_factors(s: float, alpha: float = 0.8) -> tuple[float, float, float]:
    """(d, w, r) multipliers with d * w^2 * r^2 = s."""
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
        raise ScaleError(f"the scale factor must be a positive number, not {s}")
    if not 0.0 <= alpha <= 1.0:
        raise ScaleError(f"alpha must be in [0, 1] (share of the scaling given to width), not {alpha}")
    return s ** ((1 - alpha) / 2), s ** (alpha / 2), s ** ((1 - alpha) / 4)


def dwr_scale(base: ScaleConfig, s: float, alpha: float = 0.8) -> ScaleConfig:
    """The dWr rule: scale `base` by s in MACs, rounded as pycls's scaler rounds."""
    d, w, r = dwr_factors(s, alpha)
    step = math.lcm(4, base.patch)
    return replace(base,
                   depths=tuple(max(1, round(x * d)) for x in base.depths),
                   widths=tuple(max(1, round(x * w / 8)) * 8 for x in base.widths),
                   resolution=max(1, round(base.resolution * r / step)) * step)


def vit_heads(width: int, head_dim: int | None) -> int:
    """Heads for a ViT width: the divisor of `width` nearest width / head_dim (the base head size)."""
    want = width / (head_dim or width)
    return min((h for h in range(1, width + 1) if width % h == 0), key=lambda h: (abs(h - want), h))


# --- a config from a model, a model from a config -------------------------------------------------

def base_config(model: nn.Module) -> ScaleConfig:
    """The ScaleConfig a built model (any device, meta included) has."""
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    from zoo.cifar_resnet import CifarResNet
    arch = model.pretrained_cfg.get("architecture") if hasattr(model, "pretrained_cfg") else None
    resolution = int(model.pretrained_cfg["input_size"][-1]) if arch else 0
    if isinstance(model, CifarResNet):
        stages = [model.layer1, model.layer2, model.layer3]
        return ScaleConfig("cifar_resnet", arch, tuple(len(s) for s in stages),
                           tuple(s[0].conv1.out_channels for s in stages), resolution,
                           model.num_classes, model.conv1.in_channels)
    if isinstance(model, ResNet):
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        # `channels` are the planes; a block's output has planes * expansion channels
        widths = tuple(info["num_chs"] // type(s[0]).expansion for info, s in zip(model.feature_info[1:], stages))
        return ScaleConfig("resnet", arch, tuple(len(s) for s in stages), widths, resolution,
                           model.num_classes, model.conv1.in_channels if isinstance(model.conv1, nn.Conv2d)
                           else model.conv1[0].in_channels)
    if isinstance(model, VisionTransformer):
        pe = model.patch_embed
        return ScaleConfig("vit", arch, (len(model.blocks),), (model.embed_dim,), int(pe.img_size[0]),
                           model.num_classes, pe.proj.in_channels, model.blocks[0].attn.head_dim,
                           int(pe.patch_size[0]))
    raise ScaleError(f"{arch or type(model).__name__}: dWr scaling needs a family whose depth, width and "
                     f"resolution can be set when it is built (CIFAR ResNets, timm ResNets, timm ViTs); "
                     f"{type(model).__name__} is not one")


def anchor_config(spec: str) -> ScaleConfig:
    """The ScaleConfig of an anchor spec (timm name, hf-hub:, local-dir:), read on the meta device."""
    from zoo.sources import create_anchor
    return base_config(create_anchor(spec, pretrained=False, device="meta"))


def build(config: ScaleConfig, device: str = "meta") -> nn.Module:
    """The model a config describes, untrained (meta device by default: shapes and costs only)."""
    _check(config)
    c = config
    with torch.device(device):
        if c.family == "vit":
            return timm.create_model(c.arch, pretrained=False, num_classes=c.num_classes, in_chans=c.in_chans,
                                     depth=c.depths[0], embed_dim=c.widths[0], img_size=c.resolution,
                                     num_heads=vit_heads(c.widths[0], c.head_dim)).eval()
        if c.family == "resnet":
            return timm.create_model(c.arch, pretrained=False, num_classes=c.num_classes, in_chans=c.in_chans,
                                     layers=c.depths, channels=c.widths).eval()
        return _cifar_resnet(c).eval()


def _check(c: ScaleConfig) -> None:
    stages = {"cifar_resnet": 3, "resnet": 4, "vit": 1}.get(c.family)
    if stages is None:
        raise ScaleError(f"unknown family '{c.family}' (one of {', '.join(FAMILIES)})")
    if len(c.depths) != stages or len(c.widths) != stages:
        raise ScaleError(f"{c.arch}: a {c.family} config has {stages} stage(s), got depths {list(c.depths)} "
                         f"and widths {list(c.widths)}")
    if min(c.depths) < 1 or min(c.widths) < 1 or c.resolution < 1:
        raise ScaleError(f"{c.arch}: depths, widths and resolution must be at least 1 ({c.describe()})")
    if c.resolution % c.patch:
        raise ScaleError(f"{c.arch}: resolution {c.resolution} is not a multiple of the patch size {c.patch}")
    if c.family == "cifar_resnet" and list(c.widths) != sorted(c.widths):
        raise ScaleError(f"{c.arch}: the zero-padding shortcut needs widths that do not shrink ({list(c.widths)})")


class _PadShortcut(nn.Module):
    """zoo.cifar_resnet.PadShortcut (subsample by 2, zero-pad the channels, no parameters) for any
    width increase: rounded widths do not always double from stage to stage as 16/32/64 do."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.before, self.after = (planes - in_planes) // 2, planes - in_planes - (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.before, self.after))


def _cifar_resnet(c: ScaleConfig) -> nn.Module:
    """CifarResNet's constructor only takes a depth (6n+2, widths 16/32/64): build the timm model,
    then give it the config's stem and stages, made by the model's own `_make_layer`."""
    from zoo.cifar_resnet import CifarResNet, PadShortcut
    model = timm.create_model(c.arch, pretrained=False, num_classes=c.num_classes, in_chans=c.in_chans)
    # the first stage keeps the stem's width (identity shortcut), as in He et al.
    model.conv1 = nn.Conv2d(c.in_chans, c.widths[0], 3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(c.widths[0])
    in_planes = c.widths[0]
    for i, (depth, planes) in enumerate(zip(c.depths, c.widths)):
        stage = CifarResNet._make_layer(in_planes, planes, depth, stride=1 if i == 0 else 2)
        if isinstance(stage[0].shortcut, PadShortcut) and planes != 2 * in_planes:
            stage[0].shortcut = _PadShortcut(in_planes, planes)
        setattr(model, f"layer{i + 1}", stage)
        in_planes = planes
    model.num_features = model.head_hidden_size = in_planes
    model.linear = nn.Linear(in_planes, c.num_classes) if c.num_classes > 0 else nn.Identity()
    return model


@functools.lru_cache(maxsize=256)
def predict(config: ScaleConfig) -> Cost:
    """Predicted MACs, params, activations per image of a config (built on the meta device)."""
    return model_cost(build(config), (config.in_chans, config.resolution, config.resolution))


# --- filling a gap in the curve ---------------------------------------------------------------

@dataclass
class Fill:
    """A scaled config whose predicted MACs land inside the biggest MACs gap between anchors."""
    base: int              # index (into the anchors given) of the anchor it is scaled from
    s: float               # scale factor applied to that anchor
    alpha: float
    config: ScaleConfig
    cost: Cost             # predicted
    gap: tuple[int, int]   # indices of the two anchors around the gap (lower MACs first)
    target_macs: float     # the gap's middle (geometric mean of the two anchors' MACs)

    def to_dict(self) -> dict:
        return {"base": self.base, "s": self.s, "alpha": self.alpha, "config": self.config.to_dict(),
                "cost": self.cost.to_dict(), "gap": list(self.gap), "target_macs": self.target_macs}


def scale_to(base: ScaleConfig, target_macs: float, alpha: float = 0.8, base_macs: float | None = None,
             steps: int = 12) -> tuple[float, ScaleConfig, Cost]:
    """The s (and its config, cost) whose predicted MACs come closest to target_macs.

    MACs grow ~ s under dWr (d w^2 r^2 = s) and never shrink as s grows (rounding is monotone), so:
    start at s = target / MACs, widen until the target is bracketed, then bisect (in log s) to the
    last config under the target and the first over it; the nearer one (in ratio) wins."""
    def at(s: float) -> Cost:
        return predict(dwr_scale(base, s, alpha))

    lo = hi = s0 = target_macs / (base_macs or predict(base).macs)
    for _ in range(40):                 # 1.25^40 ~ 7500x: beyond that the target is out of reach
        if at(lo).macs <= target_macs:
            break
        lo /= 1.25
    for _ in range(40):
        if at(hi).macs >= target_macs:
            break
        hi *= 1.25
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if at(mid).macs < target_macs:
            lo = mid
        else:
            hi = mid
    s = min((lo, hi), key=lambda v: (abs(math.log(at(v).macs / target_macs)), v))
    if dwr_scale(base, s0, alpha) == dwr_scale(base, s, alpha):
        s = s0   # the same config: report the plain ratio rather than the edge bisection found
    return s, dwr_scale(base, s, alpha), at(s)


def suggest_fill(bases: Sequence[ScaleConfig], alpha: float = 0.8,
                 macs: Sequence[float] | None = None) -> Fill:
    """Where a missing anchor size would fill the curve's biggest gap.

    The gap is the largest MACs *ratio* between anchors adjacent in MACs (dWr scales
    multiplicatively); its middle is their geometric mean. Both anchors around the gap are scaled
    toward it (one up, one down) and the config landing nearer the middle wins (ties: scaled up).
    `macs`: the anchors' MACs as the curve has them (default: predicted from the configs)."""
    if len(bases) < 2:
        raise ScaleError("filling a gap needs at least two anchors")
    macs = [float(m) for m in (macs if macs is not None else [predict(b).macs for b in bases])]
    if len(macs) != len(bases):
        raise ScaleError(f"got {len(macs)} MACs for {len(bases)} anchors")
    order = sorted(range(len(bases)), key=lambda i: macs[i])
    lo, hi = max(zip(order, order[1:]), key=lambda p: macs[p[1]] / macs[p[0]])
    if macs[hi] <= macs[lo]:
        raise ScaleError("the anchors all have the same MACs: there is no gap to fill")
    target = math.sqrt(macs[lo] * macs[hi])
    fills = []
    for i in (lo, hi):
        s, cfg, cost = scale_to(bases[i], target, alpha, macs[i])
        fills.append(Fill(i, s, alpha, cfg, cost, (lo, hi), target))
    return min(fills, key=lambda f: abs(math.log(f.cost.macs / target)))


# --- which cost predicts latency --------------------------------------------------------------

@dataclass
class LatencyPoint:
    label: str           # "stitch 3" or "elastic:NAME"
    macs: int
    activations: int
    latency_ms: float


@dataclass
class LatencyFit:
    n: int
    r2_macs: float          # R^2 of the least-squares line latency ~ MACs
    r2_activations: float   # ... latency ~ activations
    line_macs: tuple[float, float]          # (ms per MAC, ms at 0)
    line_activations: tuple[float, float]   # (ms per activation, ms at 0)

    @property
    def better(self) -> str:
        """Which cost explains more of the latency here ("activations" or "MACs")."""
        return "activations" if self.r2_activations > self.r2_macs else "MACs"

    def to_dict(self) -> dict:
        return {**asdict(self), "better": self.better}


def r2_linear(x: Sequence[float], y: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """R^2 of the least-squares line y ~ a x + b, and (a, b)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    a, b = np.polyfit(x, y, 1)
    ss_res = float(np.sum((y - (a * x + b)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot, (float(a), float(b))


def latency_fit(points: Sequence[LatencyPoint]) -> LatencyFit:
    """How well MACs and activations (each alone, in a straight line) predict measured latency."""
    if len(points) < 3:
        raise ScaleError(f"a latency fit needs at least 3 points with measured latency, got {len(points)}")
    lat = [p.latency_ms for p in points]
    if max(lat) == min(lat):
        raise ScaleError("every point has the same latency: nothing to explain")
    fits = {}
    for what in ("macs", "activations"):
        xs = [getattr(p, what) for p in points]
        if max(xs) == min(xs):
            raise ScaleError(f"every point has the same {what}: a line through them is undefined")
        fits[what] = r2_linear(xs, lat)
    return LatencyFit(len(points), fits["macs"][0], fits["activations"][0], fits["macs"][1], fits["activations"][1])


def latency_points(plan, latency: dict[int, float] | None, candidates: Sequence = ()) -> list[LatencyPoint]:
    """The curve's points with a measured latency: stitches (plan costs) and candidates."""
    out = []
    for sid, ms in sorted((latency or {}).items()):
        if 0 <= sid < len(plan.stitches):
            c = plan.cost(plan.stitches[sid])
            out.append(LatencyPoint(f"stitch {sid}", c.macs, c.activations, ms))
    out += [LatencyPoint(f"{c.method}:{c.name}", c.macs, c.activations, c.latency_ms)
            for c in candidates if c.latency_ms is not None]
    return out


def scale_candidate(source: str, base: ScaleConfig, s: float, alpha: float, config: ScaleConfig, cost: Cost):
    """A "scale" curve candidate: predicted costs, no accuracy (it is not trained here)."""
    from composer.candidates import Candidate
    short = short_name(source)
    return Candidate("scale", f"{short} dWr x{s:.3g} (alpha {alpha:g})", source, cost.macs, cost.params,
                     cost.activations, top1=None, status="predicted",
                     config={"base": base.to_dict(), "s": s, "alpha": alpha, "scaled": config.to_dict()})


# --- the builder on a run (composer.builders.build("scale", ...)) -----------------------------------------

@dataclass
class ScaleResult:
    anchor: int              # the anchor scaled (with fill: the one nearer the gap's middle)
    spec: str                # its spec
    s: float
    alpha: float
    base: ScaleConfig
    config: ScaleConfig      # the scaled configuration
    base_cost: Cost          # the anchor's, predicted as `predict` counts configs
    cost: Cost               # the scaled one's (predicted)
    candidate: object        # the "scale" Candidate added to the run
    fill: Fill | None = None
    note: str | None = None  # with fill: where the biggest MACs gap is


def build_scale(run_dir, *, anchor: int | None = None, stitch: int | None = None, events=None, cancel=None,
                factor: float | None = None, alpha: float = 0.8, fill: bool = False):
    """dWr-scale anchor `anchor` of a run by `factor` in MACs (0.01 to 100), or with `fill` the anchor
    size that fills the biggest MACs gap between the run's anchors; adds a "scale" candidate with
    predicted costs (nothing is built with weights, nothing trained). Returns a BuildResult whose
    details are a ScaleResult."""
    from composer import checks
    from composer.builders.source import BuildResult, check_anchor
    from composer.run import add_candidates, load_plan_of_run
    alpha = checks.number(alpha, "alpha", 0, 1)
    if not fill:
        if stitch is not None or anchor is None:
            raise ScaleError("scaling works from an anchor's configuration: choose an anchor, not a stitch")
        dwr_factors(checks.number(factor, "the scale factor"), alpha)   # finite, then positive
        factor = checks.number(factor, "the scale factor", 0.01, 100)
    plan = load_plan_of_run(run_dir)
    note, gap = None, None
    if fill:
        anchor_macs = [info.total.macs for info in plan.infos]
        gap = suggest_fill([anchor_config(spec) for spec in plan.anchors], alpha, anchor_macs)
        i, s, config, cost = gap.base, gap.s, gap.config, gap.cost
        lo, hi = (short_name(plan.anchors[j]) for j in gap.gap)
        note = (f"biggest MACs gap: {lo} -> {hi} ({anchor_macs[gap.gap[0]] / 1e6:.2f} -> "
                f"{anchor_macs[gap.gap[1]] / 1e6:.2f} M), middle {gap.target_macs / 1e6:.2f} M")
    else:
        i, s = check_anchor(plan.anchors, anchor), factor
        config = dwr_scale(anchor_config(plan.anchors[i]), s, alpha)
        cost = predict(config)
    base = anchor_config(plan.anchors[i])
    candidate = scale_candidate(plan.anchors[i], base, s, alpha, config, cost)
    add_candidates(run_dir, [candidate])
    result = ScaleResult(i, plan.anchors[i], s, alpha, base, config, predict(base), cost, candidate, gap, note)
    return BuildResult("scale", [candidate], f"scale: {candidate.name} added (predicted costs)", result)
