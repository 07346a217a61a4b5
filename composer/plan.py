"""Which stitches exist: SN-Net's default enumeration, options, and user-chosen stitch points.

A stitch is a route through anchors: run anchor f's stem and units 0..j, map the activation with
a stitching layer, then run anchor b's units k..end and b's head (final norm included). Anchors
themselves are one-segment routes. Anchors are ordered by MACs and stitching goes small -> large.

SN-Net's defaults (arXiv 2302.06586 and its code), reproduced here:
- nearest stitching: only anchors adjacent in MACs are stitched (all pairs on request);
- plain models of equal depth (DeiT): a sliding window (kernel 2, stride 1) over block ids; every
  (j, k) pair inside a window is a stitch, and the window's stitches share one stitching layer;
- hierarchical models (Swin, ResNet, ...): stitching inside a stage only, never in the last stage;
  equal stage depths use the same windows but only j < k (front block j feeds back block k);
  unequal depths use the unpaired nearest-index mapping, one layer per stitch.
With these, DeiT-Ti/S/B gives 3 + 34 + 34 = 71 stitches and Swin-Ti/S/B 3 + 2 + 2 + 34 = 41.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from composer.costs import AnchorInfo, Cost, channels, positions, stitch_layer_cost
from composer.errors import UserError
from zoo.sources import short_name


class PlanError(UserError):
    """An impossible stitch or plan; the message says which and why."""


@dataclass(frozen=True)
class Segment:
    anchor: int          # index into StitchPlan.anchors
    first: int           # first unit run (inclusive)
    last: int            # last unit run (inclusive)


@dataclass(frozen=True)
class LayerSpec:
    """One stitching layer: maps anchor `front`'s activations into anchor `back`'s."""
    key: str
    front: int
    back: int
    in_channels: int
    out_channels: int
    in_layout: str
    out_layout: str


@dataclass(frozen=True)
class Stitch:
    id: int
    route: tuple[Segment, ...]
    layers: tuple[str, ...] = ()        # layer key between consecutive segments

    @property
    def is_anchor(self) -> bool:
        return len(self.route) == 1

    def to_json(self) -> dict:
        return {"id": self.id, "route": [{"anchor": s.anchor, "blocks": [s.first, s.last]} for s in self.route],
                "layers": list(self.layers)}


@dataclass
class StitchPlan:
    anchors: list[str]
    infos: list[AnchorInfo]
    stitches: list[Stitch]
    layers: dict[str, LayerSpec]
    options: dict = field(default_factory=dict)

    def cost(self, stitch: Stitch | int) -> Cost:
        """MACs / params / activations of running exactly this route (per image)."""
        s = self.stitches[stitch] if isinstance(stitch, int) else stitch
        first, last = self.infos[s.route[0].anchor], self.infos[s.route[-1].anchor]
        total = first.stem + last.head
        for seg in s.route:
            for u in range(seg.first, seg.last + 1):
                total = total + self.infos[seg.anchor].units[u]
        for key, seg in zip(s.layers, s.route[:-1]):
            spec = self.layers[key]
            info = self.infos[seg.anchor]
            total = total + stitch_layer_cost(spec.in_channels, spec.out_channels,
                                              positions(info.out_shapes[seg.last], info.layout))
        return total

    @property
    def native_resolution(self) -> bool:
        """Anchors run at their own input sizes (`fit --resolution native`; composer.run.load_anchors
        refuses different sizes otherwise): images are resized to a route's first anchor's size and
        stitching layers resample onto the next anchor's grid (composer.snnet)."""
        return len({tuple(i.input_size) for i in self.infos}) > 1

    def describe_route(self, stitch: Stitch | int) -> str:
        s = self.stitches[stitch] if isinstance(stitch, int) else stitch
        return " -> ".join(f"{short_name(self.anchors[g.anchor])}[{g.first}..{g.last}]" for g in s.route)

    def to_json(self) -> dict:
        """The CLI's `plan --json` shape, plus what is needed to rebuild the plan."""
        stitches = []
        for s in self.stitches:
            d = s.to_json()
            d.update(self.cost(s).to_dict())
            stitches.append(d)
        return {"anchors": list(self.anchors), "options": self.options,
                "layers": {k: asdict(v) for k, v in self.layers.items()}, "stitches": stitches}

    def save(self, path) -> None:
        from composer.io import write_text_atomic
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))


def load_plan(data: dict, infos: list[AnchorInfo]) -> StitchPlan:
    """Rebuild a plan saved by `to_json` (infos are re-measured from the anchors), checked against
    those anchors: a hand-edited or foreign plan.json is refused in one line, never half-used."""
    try:
        layers = {str(k): LayerSpec(**v) for k, v in data["layers"].items()}
        stitches = [Stitch(int(d["id"]), tuple(Segment(int(r["anchor"]), *map(int, r["blocks"])) for r in d["route"]),
                           tuple(d["layers"])) for d in data["stitches"]]
        anchors = [str(a) for a in data["anchors"]]
        options = dict(data.get("options", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlanError(f"plan.json is not a stitch plan ({type(e).__name__}: {e})") from None
    _check_plan(anchors, infos, stitches, layers)
    return StitchPlan(anchors, infos, stitches, layers, options)


def _check_plan(anchors: list[str], infos: list[AnchorInfo], stitches: list[Stitch], layers: dict[str, LayerSpec]):
    if [i.name for i in infos] != anchors:
        raise PlanError(f"plan.json names the anchors {anchors} but the run's manifest has "
                        f"{[i.name for i in infos]}: the run's files do not belong together")
    if [s.id for s in stitches] != list(range(len(stitches))):
        raise PlanError("plan.json: stitch ids must be 0, 1, 2, ... in order, each once")
    for s in stitches:
        if not s.route or len(s.layers) != len(s.route) - 1:
            raise PlanError(f"plan.json: stitch {s.id} needs one stitching layer between consecutive segments")
        for seg in s.route:
            if not 0 <= seg.anchor < len(infos):
                raise PlanError(f"plan.json: stitch {s.id} uses anchor {seg.anchor}, the run has {len(infos)}")
            if not 0 <= seg.first <= seg.last < infos[seg.anchor].depth:
                raise PlanError(f"plan.json: stitch {s.id} runs blocks {seg.first}..{seg.last} of anchor "
                                f"{seg.anchor}, which has blocks 0..{infos[seg.anchor].depth - 1}")
        for key in s.layers:
            if key not in layers:
                raise PlanError(f"plan.json: stitch {s.id} uses stitching layer '{key}', which the plan does not define")
        ran = [(seg.anchor, u) for seg in s.route for u in range(seg.first, seg.last + 1)]
        if len(set(ran)) != len(ran):
            raise PlanError(f"plan.json: stitch {s.id} runs a block twice; a route runs each block at most once")
    seen = {}
    for s in stitches:
        route = tuple(s.route)
        if route in seen:
            raise PlanError(f"plan.json: stitches {seen[route]} and {s.id} are the same route")
        seen[route] = s.id


# --- SN-Net's enumeration ------------------------------------------------------------------------

def paired_positions(depth: int, kernel: int, stride: int, strict: bool) -> list[tuple[int, int, int]]:
    """(j, k, window) for equal depths: every pair inside a sliding window, new pairs only.
    strict keeps only j < k (hierarchical models, where the back anchor must not repeat j)."""
    seen, out, window = set(), [], -1
    for start in range(0, depth, stride):
        ids = range(start, min(start + kernel, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen and (j < k or not strict)]
        if new:
            window += 1
            for jk in new:
                seen.add(jk)
                out.append((*jk, window))
    return out


def unpaired_positions(front_depth: int, back_depth: int) -> list[tuple[int, int]]:
    """SN-Net's mapping for unequal depths: back block i takes front block idx when
    nearest-interpolating front ids to back_depth gives idx, and idx < i."""
    ids = torch.arange(front_depth, dtype=torch.float32)[None, None]
    mapping = torch.nn.functional.interpolate(ids, back_depth).long().flatten().tolist()
    return [(idx, i) for idx in range(front_depth) for i, e in enumerate(mapping) if e == idx and idx < i]


def _layout_ok(front: AnchorInfo, back: AnchorInfo, j: int, k: int) -> str | None:
    """None if front unit j's output can feed back unit k's input through a stitching layer."""
    # The layer maps each position (pixel or token) independently, so positions must match one to
    # one; this also refuses a class-token ViT fed from a CNN (197 tokens vs 196 pixels).
    out_shape, in_shape = front.out_shapes[j], back.in_shapes[k]
    if front.input_size != back.input_size and front.layout == back.layout == "nchw":
        return None   # anchors at their own resolutions: the stitching layer resamples onto the back's grid
    if positions(out_shape, front.layout) != positions(in_shape, back.layout):
        return (f"{front.name} block {j} outputs {out_shape} ({front.layout}) but {back.name} block {k} "
                f"takes {in_shape} ({back.layout}): spatial sizes / token counts differ")
    return None


def _layer(plan_layers: dict, key: str, fi: int, bi: int, front: AnchorInfo, back: AnchorInfo,
           j: int, k: int) -> str:
    if key not in plan_layers:
        plan_layers[key] = LayerSpec(key, fi, bi, channels(front.out_shapes[j], front.layout),
                                     channels(back.in_shapes[k], back.layout), front.layout, back.layout)
    return key


def build_plan(infos: list[AnchorInfo], kernel: int = 2, stride: int = 1, all_pairs: bool = False,
               points: list[tuple[tuple[int, int], tuple[int, int]]] | None = None,
               two_way: bool = False) -> StitchPlan:
    """SN-Net's stitches between anchors (sorted by MACs here), or exactly the given points, or
    with two_way SN-Netv2's routes between two anchors (see `two_way_plan`).

    points: ((front anchor, front block), (back anchor, back block)) pairs, anchor indices in
    MACs order; a point equal to a default stitch keeps its (possibly shared) default layer.
    """
    if len(infos) < 1:
        raise PlanError("a plan needs at least one anchor")
    if kernel < 1 or stride < 1:
        raise PlanError(f"kernel and stride must be >= 1 (got kernel={kernel}, stride={stride})")
    infos = sorted(infos, key=lambda a: a.total.macs)
    if two_way:
        if points is not None:
            raise PlanError("two-way plans enumerate SN-Netv2's routes: give either --two-way or --points")
        return two_way_plan(infos)
    layers: dict[str, LayerSpec] = {}
    stitches = [Stitch(i, (Segment(i, 0, a.depth - 1),)) for i, a in enumerate(infos)]
    defaults: dict[tuple[int, int, int, int], str] = {}   # (f, j, b, k) -> layer key
    pairs = [(f, b) for f in range(len(infos)) for b in range(f + 1, len(infos))
             if all_pairs or b == f + 1]
    for f, b in pairs:
        for (j, k, key) in _default_positions(infos, f, b, kernel, stride):
            defaults[(f, j, b, k)] = key
    if points is None:
        wanted = list(defaults)
    else:
        wanted = [_check_point(infos, p) for p in points]
    for (f, j, b, k) in wanted:
        front, back = infos[f], infos[b]
        if (err := _layout_ok(front, back, j, k)) is not None:
            raise PlanError(err)
        key = defaults.get((f, j, b, k)) or f"a{f}_a{b}_p{j}_{k}"
        _layer(layers, key, f, b, front, back, j, k)
        stitches.append(Stitch(len(stitches), (Segment(f, 0, j), Segment(b, k, back.depth - 1)), (key,)))
    _check_layers(layers, stitches, infos)
    options = {"kernel": kernel, "stride": stride, "all_pairs": all_pairs, "custom_points": points is not None}
    return StitchPlan([a.name for a in infos], infos, stitches, layers, options)


# --- SN-Netv2's two-way routes ---------------------------------------------------------------------

def two_way_points(small: int, large: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """SN-Netv2's stitch points for a stage of `small` and `large` blocks (its
    `get_stitch_configs_bidirection`): small->large (j, k) with k = (j + 1) * (large // small), and
    large->small (j, k) with k = nearest(j) + 1 for every odd j < large - 1 (every j < large - 1 when
    the depths are equal). Front block j's output feeds back block k. Points whose back block is
    past the stage are left out (the last small->large point of a plain model runs no block)."""
    ratio = max(large // small, 1)
    sl = [(j, (j + 1) * ratio) for j in range(small) if (j + 1) * ratio < large]
    nearest = torch.nn.functional.interpolate(torch.arange(small, dtype=torch.float32)[None, None], large)
    nearest = nearest.long().flatten().tolist()
    ls = [(j, nearest[j] + 1) for j in range(large - 1)
          if (small == large or j % 2 == 1) and nearest[j] + 1 < small]
    return sl, ls


def two_way_plan(infos: list[AnchorInfo]) -> StitchPlan:
    """SN-Netv2's routes between two anchors (small = 0, large = 1 by MACs): the anchors, then
    small->large, large->small, large->small->large and small->large->small, in its order. One
    stitching layer per direction and position, shared by every route through that point. For
    DeiT3-S + DeiT3-L this gives its 134 routes. Hierarchical models stitch inside a stage (not the
    last, as SN-Net), each stage's blocks mapped as a plain model's."""
    if len(infos) != 2:
        raise PlanError(f"two-way stitching (SN-Netv2) joins exactly two anchors, got {len(infos)}")
    small, large = infos
    if small.num_stages != large.num_stages:
        raise PlanError(f"{small.name} has {small.num_stages} stages and {large.name} {large.num_stages}: "
                        "two-way stitching needs the same structure")
    stages = [0] if small.num_stages == 1 else range(small.num_stages - 1)
    sl, ls = [], []   # global (front block, back block)
    for s in stages:
        su, lu = small.stage_units(s), large.stage_units(s)
        a, b = two_way_points(len(su), len(lu))
        sl += [(su[j], lu[k]) for j, k in a]
        ls += [(lu[j], su[k]) for j, k in b]
    layers: dict[str, LayerSpec] = {}

    def layer(f: int, j: int, b: int, k: int) -> str:
        front, back = infos[f], infos[b]
        if (err := _layout_ok(front, back, j, k)) is not None:
            raise PlanError(err)
        return _layer(layers, f"a{f}_a{b}_v2_{j}_{k}", f, b, front, back, j, k)

    routes = [((Segment(0, 0, small.depth - 1),), ()), ((Segment(1, 0, large.depth - 1),), ())]
    routes += [((Segment(0, 0, j), Segment(1, k, large.depth - 1)), (layer(0, j, 1, k),)) for j, k in sl]
    routes += [((Segment(1, 0, j), Segment(0, k, small.depth - 1)), (layer(1, j, 0, k),)) for j, k in ls]
    # There and back, never running a block twice (k2 > j1): with stage depths that are not multiples
    # (3 and 5 blocks, say) SN-Netv2's rule would return into blocks the route already ran, one module
    # in two places, whose BatchNorms cannot be both the anchor's and the stitch's. For its 12 / 24
    # blocks, and any multiple, no route is left out.
    routes += [((Segment(1, 0, j1), Segment(0, k1, j2), Segment(1, k2, large.depth - 1)),
                (layer(1, j1, 0, k1), layer(0, j2, 1, k2))) for j1, k1 in ls for j2, k2 in sl if j2 >= k1 and k2 > j1]
    routes += [((Segment(0, 0, j1), Segment(1, k1, j2), Segment(0, k2, small.depth - 1)),
                (layer(0, j1, 1, k1), layer(1, j2, 0, k2))) for j1, k1 in sl for j2, k2 in ls if j2 >= k1 and k2 > j1]
    stitches = [Stitch(i, route, keys) for i, (route, keys) in enumerate(routes)]
    _check_layers(layers, stitches, infos)
    return StitchPlan([a.name for a in infos], list(infos), stitches, layers, {"two_way": True})


def macs_step_groups(macs: list[float], step: float) -> list[list[int]]:
    """SN-Netv2's FLOPs groups (its `group_subnets_by_flops`): walk the stitches in increasing MACs;
    a stitch more than `step` MACs above the first of the current group starts a new group.
    Returns groups of indices into `macs`, cheapest group first; training samples a group, then a
    stitch in it, so sparse ends of the curve get as many steps as its crowded middle."""
    if not step > 0:
        raise PlanError(f"the MACs step between groups must be positive, got {step}")
    groups: list[list[int]] = []
    start = None
    for i in sorted(range(len(macs)), key=lambda i: (macs[i], i)):
        if start is None or macs[i] - start > step:
            groups.append([])
            start = macs[i]
        groups[-1].append(i)
    return groups


def _default_positions(infos, f, b, kernel, stride):
    """(front unit, back unit, layer key) of SN-Net's default stitches between anchors f and b."""
    front, back = infos[f], infos[b]
    if front.num_stages != back.num_stages:
        raise PlanError(f"{front.name} has {front.num_stages} stages and {back.name} {back.num_stages}: "
                        "give stitch points explicitly to stitch models of different structure")
    plain = front.num_stages == 1
    stages = [0] if plain else range(front.num_stages - 1)   # SN-Net skips the last stage
    for s in stages:
        fu, bu = front.stage_units(s), back.stage_units(s)
        if len(fu) == len(bu):
            for j, k, w in paired_positions(len(fu), kernel, stride, strict=not plain):
                yield fu[j], bu[k], f"a{f}_a{b}_s{s}_w{w}"
        else:
            for j, k in unpaired_positions(len(fu), len(bu)):
                yield fu[j], bu[k], f"a{f}_a{b}_s{s}_u{j}_{k}"


def _check_point(infos: list[AnchorInfo], point) -> tuple[int, int, int, int]:
    try:
        (f, j), (b, k) = point
        f, j, b, k = int(f), int(j), int(b), int(k)
    except (TypeError, ValueError):
        raise PlanError(f"a stitch point is ((anchor, block), (anchor, block)), got {point!r}") from None
    n = len(infos)
    for a, blk in ((f, j), (b, k)):
        if not 0 <= a < n:
            raise PlanError(f"anchor {a} does not exist (there are {n} anchors, 0..{n - 1})")
        if not 0 <= blk < infos[a].depth:
            raise PlanError(f"{infos[a].name} has blocks 0..{infos[a].depth - 1}, not {blk}")
    if f >= b:
        raise PlanError(f"stitches go from a smaller to a larger anchor (by MACs): anchor {f} "
                        f"({infos[f].name}) -> anchor {b} ({infos[b].name}) goes the wrong way")
    front, back = infos[f], infos[b]
    if front.num_stages > 1 and front.num_stages == back.num_stages and front.stages[j] != back.stages[k]:
        raise PlanError(f"{front.name} block {j} is in stage {front.stages[j]} but {back.name} block {k} "
                        f"is in stage {back.stages[k]}: stitch within one stage")
    return f, j, b, k


def _check_layers(layers, stitches, infos):
    """Stitches sharing a layer must agree on its input and output widths."""
    for s in stitches:
        for key, seg, nxt in zip(s.layers, s.route[:-1], s.route[1:]):
            spec = layers[key]
            fi, bi = infos[seg.anchor], infos[nxt.anchor]
            cin, cout = channels(fi.out_shapes[seg.last], fi.layout), channels(bi.in_shapes[nxt.first], bi.layout)
            if (cin, cout) != (spec.in_channels, spec.out_channels):
                raise PlanError(f"stitch {s.id} needs a {cin}->{cout} layer but shares {key} "
                                f"({spec.in_channels}->{spec.out_channels}); use a larger stride or kernel 1")
