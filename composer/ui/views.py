"""Plain data for the widgets: the block graph as JSON for assets/graph.js, progress and summaries.

Kept free of Gradio so tests can check exactly what the browser is asked to draw.
"""
from __future__ import annotations

import html
import math

from composer.graph import plan_graph
from composer.plan import StitchPlan
from zoo.sources import short_name


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else ""


def r2_colour(r2: float | None) -> str:
    """Edge colour for a fit quality: grey before fitting, red (R^2 <= 0.5) -> amber -> green (1)."""
    if r2 is None or (isinstance(r2, float) and math.isnan(r2)):
        return "#8c96a8"
    t = min(1.0, max(0.0, (r2 - 0.5) / 0.5))
    stops = [(0.0, (214, 69, 65)), (0.5, (240, 173, 40)), (1.0, (46, 160, 67))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            w = (t - t0) / (t1 - t0)
            return "#%02x%02x%02x" % tuple(round(a + (b - a) * w) for a, b in zip(c0, c1))
    return "#2ea043"


def graph_value(plan: StitchPlan | None, r2: dict[int, float] | None = None, highlight: int | None = None,
                message: str = "", error: bool = False, fitted: bool = False) -> dict:
    """Anchors as columns of blocks (ordered by MACs), stitch edges, the highlighted route."""
    if plan is None:
        return {"anchors": [], "edges": [], "message": message or "Choose a family to see its block graphs.",
                "error": error}
    g = plan_graph(plan)
    r2 = r2 or {}
    anchors = []
    for i, info in enumerate(plan.infos):
        blocks = []
        for part in ["stem", *range(info.depth), "head"]:
            d = g.nodes[(i, part)]
            shape = d.get("out_shape") if part != "head" else d.get("in_shape")
            blocks.append({"part": part, "label": d["label"], "stage": d["stage"], "shape": _shape(shape),
                           "macs": d["macs"], "params": d["params"]})
        anchors.append({"index": i, "name": short_name(info.name),
                        "spec": info.name, "macs": info.total.macs, "params": info.total.params,
                        "layout": info.layout, "blocks": blocks})
    edges = []
    for (u, v, d) in g.edges(data=True):
        if d.get("kind") != "stitch":
            continue
        fits = [r2[s] for s in d["stitches"] if s in r2]
        quality = min(fits) if fits else None
        edges.append({"point": [u[0], u[1], v[0], v[1]], "stitches": d["stitches"], "layer": d["layer"],
                      "r2": quality, "colour": r2_colour(quality)})
    route = None
    if highlight is not None and 0 <= highlight < len(plan.stitches):
        s = plan.stitches[highlight]
        nodes = []
        for i, seg in enumerate(s.route):
            if i == 0:
                nodes.append([seg.anchor, "stem"])
            nodes += [[seg.anchor, u] for u in range(seg.first, seg.last + 1)]
        nodes.append([s.route[-1].anchor, "head"])
        links = [[a.anchor, a.last, b.anchor, b.first] for a, b in zip(s.route, s.route[1:])]
        route = {"stitch": highlight, "nodes": nodes, "edges": links, "text": plan.describe_route(highlight)}
    n_stitches = len(plan.stitches) - len(plan.anchors)
    # two_way: links run both ways (drawn with arrows), and a click adds a route of one or two links
    return {"anchors": anchors, "edges": edges, "route": route, "message": message, "error": error,
            "fitted": fitted, "two_way": bool(plan.options.get("two_way")),
            "count": {"stitches": len(plan.stitches), "between_anchors": n_stitches, "layers": len(plan.layers)}}


def plan_count_md(plan: StitchPlan | None) -> str:
    if plan is None:
        return "No plan yet."
    n = len(plan.stitches)
    a = len(plan.anchors)
    if plan.options.get("two_way"):
        back = sum(len(s.route) == 3 for s in plan.stitches)
        return (f"**{n} stitches** ({a} anchors + {n - a - back} one-link routes + {back} there and back) · "
                f"{len(plan.layers)} stitching layers · two-way (SN-Netv2)"
                f"{' · edited by hand' if plan.options.get('custom_routes') else ''}")
    return (f"**{n} stitches** ({a} anchors + {n - a} stitched routes) · {len(plan.layers)} stitching layers · "
            f"kernel {plan.options.get('kernel')}, stride {plan.options.get('stride')}, "
            f"{'all pairs' if plan.options.get('all_pairs') else 'nearest pairs'}"
            f"{' · edited by hand' if plan.options.get('custom_points') else ''}")


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def progress_html(snap: dict | None) -> str:
    """The fine-tune's progress bar with images/s and ETA."""
    if not snap:
        return "<div class='zc-progress idle'><div class='zc-progress-text'>No fine-tune yet.</div></div>"
    step, total = snap.get("step") or 0, snap.get("total_steps")
    frac = (step / total) if total else 0.0
    state = snap.get("state", "")
    bits = [f"step {step}" + (f" / {total}" if total else "")]
    if snap.get("images_per_s"):
        bits.append(f"{snap['images_per_s']:.0f} images/s")
    if state == "running":
        bits.append(f"ETA {_duration(snap.get('eta_s'))}")
    if snap.get("loss") is not None and state != "diverged":
        bits.append(f"loss {snap['loss']:.3f}")
    text = " · ".join(bits)
    msg = html.escape(snap.get("message") or "", quote=False)      # text, never inside an attribute
    recipe = html.escape(snap.get("recipe") or "", quote=False)
    judged = html.escape(snap.get("judged") or "", quote=False)   # "N of M stitches within 1 point of ..."
    return (f"<div class='zc-progress {html.escape(state)}' data-state='{html.escape(state)}' data-step='{step}'>"
            f"<div class='zc-progress-track'><div class='zc-progress-fill' style='width:{100 * min(1.0, frac):.1f}%'></div></div>"
            f"<div class='zc-progress-text'><b>{html.escape(state)}</b> · {html.escape(text, quote=False)}"
            f"{' · ' + msg if msg else ''}</div>"
            f"{f'<div class=zc-progress-judged>{judged}</div>' if judged else ''}"
            f"{f'<div class=zc-progress-recipe>recipe: {recipe}</div>' if recipe else ''}</div>")


def md_safe(text: str | None) -> str:
    """Markdown as Gradio should show it: a '<' outside code (as in 'DMS <=1.79M: ... -> ...') is
    escaped, or the renderer's sanitiser takes '<...>' for a tag and shows the '**' around it literally."""
    if not text:
        return text or ""
    parts = str(text).split("```")
    return "```".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(parts))


def stitch_md(summary: dict | None) -> str:
    if not summary:
        return "Click a point on the curve (or use the budget slider) to pick a stitch."
    top1 = f"{summary['top1']:.2f}%" if summary.get("top1") is not None else "not evaluated"
    r2 = f" · fit R² {summary['r2']:.3f}" if summary.get("r2") is not None else ""
    kind = "anchor" if summary["is_anchor"] else "stitch"
    return (f"**Selected {kind} {summary['id']}**: `{summary['route']}`  \n"
            f"top-1 {top1} · {summary['macs'] / 1e6:.3g} M MACs · {summary['params'] / 1e6:.3g} M params{r2}")


def builder_md(snap: dict | None) -> str:
    """One line on the background builder job: its state, and where a long phase stands."""
    if not snap:
        return ""
    last, state = snap.get("last") or {}, snap.get("state")
    if state in ("done", "error"):
        return ("⚠ " if state == "error" else "✓ ") + snap.get("message", "")
    kind = snap.get("kind", "")
    if last.get("type") == "step" and "soft_macs" in last:
        return (f"{kind}: step {last.get('step')}/{last.get('total_steps')} · soft MACs {last['soft_macs'] / 1e6:.2f} M "
                f"· target {last.get('target', 0) / 1e6:.2f} M · loss {last.get('loss', float('nan')):.3f}")
    if last.get("type") == "progress":
        return f"{kind}: {last.get('phase')} {last.get('done')}/{last.get('total')}"
    if last.get("type") == "evaluate":
        return f"{kind}: evaluating on {last.get('images')} images"
    return f"{kind}: {last.get('type', 'starting')}…"


def shrink_figure(snap: dict | None):
    """DMS live view: soft MACs per step against the target, and the keep ratio of every width."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("soft MACs (M) vs target", "kept fraction per width / block"))
    history = (snap or {}).get("history") or []
    if history:
        steps = [h[0] for h in history]
        fig.add_trace(go.Scatter(x=steps, y=[h[1] / 1e6 for h in history], name="soft MACs", mode="lines"), 1, 1)
        fig.add_trace(go.Scatter(x=steps, y=[(h[2] or 0) / 1e6 for h in history], name="target",
                                 mode="lines", line=dict(dash="dash")), 1, 1)
    keep = ((snap or {}).get("last") or {}).get("keep") or {}
    if keep:
        fig.add_trace(go.Bar(x=list(keep), y=list(keep.values()), name="kept", showlegend=False), 1, 2)
    fig.update_layout(template="plotly_white", height=300, margin=dict(l=40, r=10, t=30, b=80),
                      legend=dict(orientation="h", y=-0.35))
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    return fig
