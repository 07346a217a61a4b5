"""Two-way routes chosen by hand: the blocks a user clicks -> a route, and exactly these routes -> a plan.

SN-Netv2's own enumeration is `composer.plan.two_way_plan`; these are the routes a user keeps of it
or adds to it in the app. A user names a route by its junctions, the blocks where it leaves one
anchor and enters the other (anchors are indices in MACs order, as everywhere in a plan):

    [(A, i), (B, j)]                    A's blocks 0..i, then B's j..end: one link, either way
    [(A, i), (B, j), (B, l), (A, k)]    A's 0..i, B's j..l, then back to A's k..end: there and back

Every junction gets the stitching layer `two_way_plan` gives that direction and position (one per
direction and position, as SN-Netv2 shares them), so a route added by hand shares its layers with
SN-Netv2's routes through the same points.

It shares plan.py's private helpers (`_layer`, `_layout_ok`, `_check_layers`); a later change may
fold it into `build_plan(infos, routes=...)`.
"""
from __future__ import annotations

from composer.checks import whole
from composer.costs import AnchorInfo
from composer.plan import LayerSpec, PlanError, Segment, StitchPlan, Stitch, _check_layers, _layer, _layout_ok
from zoo.sources import short_name

MAX_SEGMENTS = 3    # SN-Netv2's longest routes: small->large->small and large->small->large


def route_from_junctions(infos: list[AnchorInfo], points) -> tuple[Segment, ...]:
    """The route through the clicked junction blocks (see the module docstring), checked; a
    PlanError says what is wrong with the clicks and what to click instead."""
    blocks = [_block(infos, p) for p in _as_list(points, "a route's blocks")]
    names = [short_name(i.name) for i in infos]
    if len(blocks) not in (2, 4):
        raise PlanError(
            f"a route is 2 blocks (where it leaves one anchor, where it enters the other) or 4 (leaves A, enters "
            f"B, leaves B, comes back to A); got {len(blocks)}" +
            (": also click where it comes back to the first anchor" if len(blocks) == 3 else ""))
    (a, i), (b, j) = blocks[:2]
    if a == b:
        raise PlanError(f"{names[a]} block {i} -> {names[b]} block {j} stays in one anchor: a route enters the other one")
    if len(blocks) == 2:
        return check_route(infos, (Segment(a, 0, i), Segment(b, j, infos[b].depth - 1)))
    (c, l), (d, k) = blocks[2:]
    if c != b:
        raise PlanError(f"the route is in {names[b]} after block {j}: the third block, where it leaves, must be in "
                        f"{names[b]} too (it is in {names[c]})")
    if d != a:
        raise PlanError(f"the route comes back to {names[a]}: the fourth block must be in {names[a]} "
                        f"(it is in {names[d]})")
    if l < j:
        raise PlanError(f"the route enters {names[b]} at block {j}, so it leaves at block {j} or later, not {l}")
    return check_route(infos, (Segment(a, 0, i), Segment(b, j, l), Segment(a, k, infos[a].depth - 1)))


def check_route(infos: list[AnchorInfo], route: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """`route` if it runs (each segment within its anchor, the first from block 0, the last to the
    end, each junction within one stage and between matching positions); a PlanError otherwise."""
    names = [short_name(i.name) for i in infos]
    if not 2 <= len(route) <= MAX_SEGMENTS:
        raise PlanError(f"a two-way route has 2 or {MAX_SEGMENTS} segments (one link, or there and back), "
                        f"got {len(route)}")
    for seg in route:
        if not 0 <= seg.anchor < len(infos):
            raise PlanError(f"anchor {seg.anchor} does not exist (there are {len(infos)}, 0..{len(infos) - 1})")
        depth = infos[seg.anchor].depth
        if not 0 <= seg.first <= seg.last < depth:
            raise PlanError(f"{names[seg.anchor]} blocks {seg.first}..{seg.last} are not a run of its blocks "
                            f"0..{depth - 1}")
    if route[0].first != 0 or route[-1].last != infos[route[-1].anchor].depth - 1:
        raise PlanError("a route runs its first anchor from block 0 and its last anchor to its last block")
    # A block run twice would be one module in two places of the route, whose BatchNorm statistics
    # could not be both the anchor's and the route's (composer.plan refuses such plans too).
    for n, seg in enumerate(route):
        for before in route[:n]:
            if before.anchor == seg.anchor and seg.first <= before.last and before.first <= seg.last:
                raise PlanError(f"the route runs {names[seg.anchor]} blocks {before.first}..{before.last} before it "
                                f"leaves, so it comes back at block {before.last + 1} or later, not {seg.first}: a "
                                "route runs each block once")
    for seg, nxt in zip(route, route[1:]):
        front, back = infos[seg.anchor], infos[nxt.anchor]
        j, k = seg.last, nxt.first
        if seg.anchor == nxt.anchor:
            raise PlanError(f"{names[seg.anchor]} block {j} -> block {k} stays in one anchor: each link joins both")
        if front.num_stages > 1 and front.num_stages == back.num_stages and front.stages[j] != back.stages[k]:
            raise PlanError(f"{names[seg.anchor]} block {j} is in stage {front.stages[j]} but {names[nxt.anchor]} "
                            f"block {k} is in stage {back.stages[k]}: a link stays within one stage")
        if (err := _layout_ok(front, back, j, k)) is not None:
            raise PlanError(err.replace(front.name, names[seg.anchor]).replace(back.name, names[nxt.anchor]))
    return tuple(route)


def routes_plan(infos: list[AnchorInfo], routes) -> StitchPlan:
    """The two anchors and exactly `routes` (each a list of [anchor, first block, last block]
    segments, anchors in MACs order), checked as `check_route` does, none twice."""
    if len(infos) != 2:
        raise PlanError(f"two-way stitching (SN-Netv2) joins exactly two anchors, got {len(infos)}")
    infos = sorted(infos, key=lambda a: a.total.macs)
    layers: dict[str, LayerSpec] = {}
    stitches = [Stitch(i, (Segment(i, 0, a.depth - 1),)) for i, a in enumerate(infos)]
    seen: dict[tuple[Segment, ...], int] = {}
    for r in _as_list(routes, "routes"):
        route = check_route(infos, tuple(_segment(s) for s in _as_list(r, "a route")))
        if route in seen:
            raise PlanError(f"route {_text(infos, route)} is in the plan twice")
        seen[route] = len(stitches)
        keys = tuple(_layer(layers, f"a{a.anchor}_a{b.anchor}_v2_{a.last}_{b.first}", a.anchor, b.anchor,
                            infos[a.anchor], infos[b.anchor], a.last, b.first) for a, b in zip(route, route[1:]))
        stitches.append(Stitch(len(stitches), route, keys))
    _check_layers(layers, stitches, infos)
    return StitchPlan([a.name for a in infos], list(infos), stitches, layers, {"two_way": True, "custom_routes": True})


def _text(infos: list[AnchorInfo], route: tuple[Segment, ...]) -> str:
    return " -> ".join(f"{short_name(infos[g.anchor].name)}[{g.first}..{g.last}]" for g in route)


def _as_list(v, what: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise PlanError(f"{what} must be a list, got {str(v)[:40]}")
    return list(v)


def _block(infos: list[AnchorInfo], point) -> tuple[int, int]:
    pair = _as_list(point, "a block ([anchor, block])")
    if len(pair) != 2:
        raise PlanError(f"a block is [anchor, block], got {str(point)[:40]}")
    a = whole(pair[0], "an anchor", 0, len(infos) - 1)
    return a, whole(pair[1], f"a block of {short_name(infos[a].name)}", 0, infos[a].depth - 1)


def _segment(v) -> Segment:
    parts = _as_list(v, "a route segment ([anchor, first block, last block])")
    if len(parts) != 3:
        raise PlanError(f"a route segment is [anchor, first block, last block], got {str(v)[:40]}")
    return Segment(*(whole(x, "a route segment's anchor and blocks") for x in parts))
