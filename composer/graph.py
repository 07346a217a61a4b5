"""Block graphs (networkx) of anchors and of a stitch plan: what the UI draws.

Nodes are (anchor index, part) with part "stem", a unit index, or "head"; attributes carry the
shape, stage, MACs and params of that part. Stitch edges run from a front unit to the back unit
that receives its output and list the stitches (ids) and layer that use them.
"""
from __future__ import annotations

import networkx as nx

from composer.costs import AnchorInfo
from composer.plan import StitchPlan


def block_graph(info: AnchorInfo, anchor: int = 0) -> nx.DiGraph:
    g = nx.DiGraph(name=info.name)
    g.add_node((anchor, "stem"), kind="stem", label="stem", anchor=anchor, stage=-1,
               out_shape=info.in_shapes[0], **info.stem.to_dict())
    prev = (anchor, "stem")
    for u in range(info.depth):
        g.add_node((anchor, u), kind="block", label=f"block {u}", anchor=anchor, stage=info.stages[u],
                   in_shape=info.in_shapes[u], out_shape=info.out_shapes[u], **info.units[u].to_dict())
        g.add_edge(prev, (anchor, u), kind="flow")
        prev = (anchor, u)
    g.add_node((anchor, "head"), kind="head", label="head", anchor=anchor, stage=-1,
               in_shape=info.out_shapes[-1], **info.head.to_dict())
    g.add_edge(prev, (anchor, "head"), kind="flow")
    return g


def plan_graph(plan: StitchPlan) -> nx.DiGraph:
    """All anchors' block graphs plus one edge per (front unit -> back unit) stitch position."""
    g = nx.DiGraph()
    for i, info in enumerate(plan.infos):
        g.update(block_graph(info, i))
    for s in plan.stitches:
        for key, seg, nxt in zip(s.layers, s.route[:-1], s.route[1:]):
            u, v = (seg.anchor, seg.last), (nxt.anchor, nxt.first)
            if g.has_edge(u, v):
                g.edges[u, v]["stitches"].append(s.id)
            else:
                g.add_edge(u, v, kind="stitch", layer=key, stitches=[s.id])
    return g
