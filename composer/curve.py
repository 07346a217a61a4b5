"""The MACs/accuracy curve of an SN-Net: one point per stitch, anchors marked, Pareto front drawn,
and beside them the run's candidates from the other curve builders (composer/candidates.py).

`curve_figure` builds the plotly figure that both the CLI (`python -m composer curve RUN`) and the
app show. Costs come from the plan (MACs with 1 multiply-add = 1, params, activations, all per
image); accuracy from RUN/evaluation.json (written by `evaluate`) or the latest "eval" line of
RUN/metrics.jsonl (written by training), whichever is newer. Latency, when chosen as the x axis,
comes from RUN/latency.json (see composer.evaluate.stitch_latencies).

Candidates (elastic / shrink / fold / scale) are one trace per method, marker by status: measured
filled, predicted open, quoted a cross. Their customdata is the string "METHOD:NAME", never an int,
so a click on one cannot be taken for a stitch id. Only points with a top-1 are drawn; only
measured points (stitches and measured candidates) can be on the Pareto front.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence


from composer.candidates import Candidate
from composer.errors import UserError
from zoo.sources import short_name
from composer.io import write_json_atomic, write_text_atomic
from composer.plan import StitchPlan

if TYPE_CHECKING:  # plotly is imported when a figure is drawn, keeping the CLI quick to start
    import plotly.graph_objects as go

# x axis name -> (axis title, divisor turning the raw count into the unit shown)
AXES = {
    "macs": ("MACs (M) per image · 1 multiply-add = 1", 1e6),
    "params": ("params (M)", 1e6),
    "activations": ("activations (M) per image", 1e6),
    "latency": ("latency (ms) per image, batch 1", 1.0),
}
ANCHOR_COLOUR, STITCH_COLOUR, FRONT_COLOUR, HIGHLIGHT_COLOUR = "#1f3b73", "#7aa6d8", "#e4572e", "#f2a900"
REFERENCE_COLOUR = "#6c757d"   # the original anchors' line (before any fine-tune)
METHOD_COLOURS = {"snnet": "#e76f51", "elastic": "#2a9d8f", "shrink": "#8e44ad", "fold": "#6b705c", "scale": "#d62d7a"}
STATUS_SYMBOLS = {"measured": "circle", "predicted": "circle-open", "quoted": "x-thin-open"}


class CurveError(UserError):
    """A curve that cannot be drawn or written; the message says why."""


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x and higher y are better.

    Returned in increasing x (and so increasing y). Of points with equal x only the best y can
    be on the front; a point equal to an earlier one is dropped (the first of equals is kept).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def best_under(points: Sequence[tuple[float, float]], budget: float) -> int | None:
    """Index of the most accurate point whose x is within the budget (cheapest among equals)."""
    fits = [i for i, (x, _) in enumerate(points) if x <= budget]
    if not fits:
        return None
    return max(fits, key=lambda i: (points[i][1], -points[i][0]))


@dataclass
class CurvePoint:
    id: int
    route: str
    x: float          # in the axis unit (M or ms)
    top1: float
    is_anchor: bool


def curve_points(plan: StitchPlan, top1: dict[int, float], x: str = "macs",
                 latency: dict[int, float] | None = None) -> list[CurvePoint]:
    """The stitches that have an accuracy, with their x value in the axis unit."""
    if x not in AXES:
        raise CurveError(f"x must be one of {', '.join(AXES)}, not '{x}'")
    if x == "latency" and not latency:
        raise CurveError("no latency measured for this run yet (measure it first)")
    _, scale = AXES[x]
    out = []
    for s in plan.stitches:
        if s.id not in top1:
            continue
        if x == "latency":
            if s.id not in latency:
                continue
            value = latency[s.id]
        else:
            value = getattr(plan.cost(s), x) / scale
        out.append(CurvePoint(s.id, plan.describe_route(s), float(value), float(top1[s.id]), s.is_anchor))
    return out


@dataclass
class CandidatePoint:
    candidate: Candidate
    x: float | None   # in the axis unit; None when the candidate lacks this axis (latency)

    @property
    def top1(self) -> float | None:
        return self.candidate.top1

    @property
    def key(self) -> str:
        """What customdata and the JSON's "pareto" list carry for a candidate (a stitch: its int id)."""
        return f"{self.candidate.method}:{self.candidate.name}"

    @property
    def drawn(self) -> bool:
        return self.x is not None and self.candidate.top1 is not None

    @property
    def on_front(self) -> bool:
        """May join the Pareto front: only accuracies measured here (never predicted or quoted)."""
        return self.drawn and self.candidate.status == "measured"


def candidate_points(candidates: Sequence[Candidate], x: str = "macs") -> list[CandidatePoint]:
    """Every candidate with its x value in the axis unit (None where it has no latency)."""
    if x not in AXES:
        raise CurveError(f"x must be one of {', '.join(AXES)}, not '{x}'")
    _, scale = AXES[x]
    out = []
    for c in candidates:
        value = c.latency_ms if x == "latency" else getattr(c, x) / scale
        out.append(CandidatePoint(c, None if value is None else float(value)))
    return out


def _front(pts: list[CurvePoint], cands: list[CandidatePoint]) -> list[CurvePoint | CandidatePoint]:
    """The Pareto front over stitches and measured candidates, in increasing x."""
    members: list[CurvePoint | CandidatePoint] = [*pts, *(c for c in cands if c.on_front)]
    return [members[i] for i in pareto_front([(p.x, p.top1) for p in members])]


def curve_figure(plan: StitchPlan, top1: dict[int, float], x: str = "macs", highlight: int | None = None,
                 latency: dict[int, float] | None = None, title: str | None = None,
                 candidates: Sequence[Candidate] = (), reference: dict[int, float] | None = None) -> "go.Figure":
    """One point per evaluated stitch; anchors as diamonds; the Pareto front as a line; the
    candidates that have a top-1, one trace per method.

    reference: stitch id -> top-1 measured before any fine-tune on the same images (an earlier
    evaluation of the same plan; only the anchors' entries are read, see composer.judge): the
    original anchors' points joined by a dashed line in x order, the line composer.judge.line_gaps
    judges the stitches against (on the MACs axis; on another axis the same anchors joined).

    Every stitch point carries its stitch id as customdata (the app selects a stitch by clicking
    it) and names its route in the hover text; a candidate carries "METHOD:NAME".
    """
    import plotly.graph_objects as go
    pts = curve_points(plan, top1, x, latency)
    cands = [c for c in candidate_points(candidates, x) if c.drawn]
    axis_title, _ = AXES[x]
    if x != "params":   # per-image counts depend on the image size each route runs at
        axis_title += f" at {input_sizes_text(plan)}"
    unit = "ms" if x == "latency" else "M"
    fig = go.Figure()

    def trace(sel: list[CurvePoint], name: str, **style) -> None:
        fig.add_trace(go.Scatter(
            x=[p.x for p in sel], y=[p.top1 for p in sel], customdata=[p.id for p in sel], name=name,
            text=[f"stitch {p.id}: {p.route}" for p in sel],
            hovertemplate=f"%{{text}}<br>%{{x:.3g}} {unit} · top-1 %{{y:.2f}}%<extra></extra>", **style))

    ref = reference_points(plan, pts, reference)
    if ref:
        fig.add_trace(go.Scatter(
            x=[p.x for p in ref], y=[p.top1 for p in ref],   # no customdata: a click on it selects nothing
            name="original anchors (before fine-tuning)", mode="lines+markers",
            text=[f"{short_name(plan.anchors[plan.stitches[p.id].route[0].anchor])} before fine-tuning" for p in ref],
            hovertemplate=f"%{{text}}<br>%{{x:.3g}} {unit} · top-1 %{{y:.2f}}%<extra></extra>",
            line=dict(color=REFERENCE_COLOUR, width=1.5, dash="dash"),
            marker=dict(color=REFERENCE_COLOUR, size=9, symbol="diamond-open")))
    front = _front(pts, cands)
    if len(front) > 1:
        fig.add_trace(go.Scatter(
            x=[p.x for p in front], y=[p.top1 for p in front],
            name="Pareto front (measured)" if cands else "Pareto front", mode="lines",
            line=dict(color=FRONT_COLOUR, width=2, shape="hv"), hoverinfo="skip"))
    trace([p for p in pts if not p.is_anchor], "stitches", mode="markers",
          marker=dict(color=STITCH_COLOUR, size=9, line=dict(color="white", width=1)))
    anchors = [p for p in pts if p.is_anchor]
    trace(anchors, "anchors", mode="markers+text", textposition=_label_positions(anchors, pts),
          marker=dict(color=ANCHOR_COLOUR, size=13, symbol="diamond", line=dict(color="white", width=1)))
    fig.data[-1].update(text=[f"stitch {p.id}: {p.route}" for p in anchors],
                        texttemplate=[short_name(plan.anchors[p.id]) for p in anchors])
    for method, colour in METHOD_COLOURS.items():
        mine = [c for c in cands if c.candidate.method == method]
        if not mine:
            continue
        fig.add_trace(go.Scatter(
            x=[c.x for c in mine], y=[c.top1 for c in mine], customdata=[c.key for c in mine],
            name=method, mode="markers", text=[_candidate_hover(c.candidate) for c in mine],
            hovertemplate=f"%{{text}}<br>%{{x:.3g}} {unit} · top-1 %{{y:.2f}}%<extra></extra>",
            marker=dict(color=colour, size=10, symbol=[STATUS_SYMBOLS[c.candidate.status] for c in mine],
                        line=dict(color=colour, width=2))))
    chosen = [p for p in pts if p.id == highlight]
    if chosen:
        trace(chosen, "selected", mode="markers",
              marker=dict(color="rgba(0,0,0,0)", size=20, line=dict(color=HIGHLIGHT_COLOUR, width=3)))
    fig.update_layout(
        template="plotly_white", title=title, margin=dict(l=60, r=20, t=40 if title else 20, b=50),
        xaxis_title=axis_title, yaxis_title="top-1 (%)", legend=dict(orientation="h", y=-0.2),
        hovermode="closest", clickmode="event", uirevision=x)
    return fig


def input_sizes_text(plan: StitchPlan) -> str:
    """The image size(s) the routes run at: "32x32 px", or with anchors at their own sizes
    (`--resolution native`) "each route at its first anchor's size (224x224, 240x240 px)"."""
    sizes = ["x".join(map(str, i.input_size[1:])) for i in plan.infos]
    if plan.native_resolution:
        return f"each route at its first anchor's size ({', '.join(dict.fromkeys(sizes))} px)"
    return f"{sizes[0]} px"


def reference_points(plan: StitchPlan, pts: list[CurvePoint], reference: dict[int, float] | None) -> list[CurvePoint]:
    """The original anchors' points (x of the anchors drawn, top-1 from `reference`), in x order;
    empty without a reference. An anchor not drawn (no x on this axis) or not in the reference is left out."""
    if not reference:
        return []
    out = [CurvePoint(p.id, p.route, p.x, float(reference[p.id]), True)
           for p in pts if p.is_anchor and reference.get(p.id) is not None]
    return sorted(out, key=lambda p: (p.x, p.id))


def _label_positions(anchors: list[CurvePoint], pts: list[CurvePoint]) -> list[str]:
    """Where each anchor's name goes: above it, unless an anchor close by on the x axis (latency
    often puts them within a few percent of the range) already has that place; then below it,
    then beside it, so that names never print over each other."""
    span = (max(p.x for p in pts) - min(p.x for p in pts)) if pts else 0.0
    places = ["top center", "bottom center", "middle right", "middle left"]
    out: dict[int, str] = {}
    last_x, used = None, 0
    for p in sorted(anchors, key=lambda p: p.x):
        close = last_x is not None and span > 0 and (p.x - last_x) < 0.15 * span
        used = (used + 1) % len(places) if close else 0
        out[p.id] = places[used]
        last_x = p.x
    return [out[p.id] for p in anchors]


def _candidate_hover(c: Candidate) -> str:
    return (f"{c.method} · {c.name}<br>{c.status} · MACs {c.macs / 1e6:.3g} M · "
            f"activations {c.activations / 1e6:.3g} M")


def curve_rows(plan: StitchPlan, top1: dict[int, float], x: str = "macs",
               latency: dict[int, float] | None = None, candidates: Sequence[Candidate] = (),
               reference: dict[int, float] | None = None) -> dict:
    """The curve as data (what `--out FILE.json` writes). Every candidate is listed, drawn or not
    (top1 null: no accuracy; x null: not on this axis); "pareto" names the front's points in
    increasing x: a stitch by its int id, a candidate by "METHOD:NAME". With a `reference` (see
    curve_figure), "reference" lists the original anchors' points in x order."""
    pts = curve_points(plan, top1, x, latency)
    cands = candidate_points(candidates, x)
    front = [p.id if isinstance(p, CurvePoint) else p.key for p in _front(pts, cands)]
    return {"x": x, "x_title": AXES[x][0],
            "stitches": [{"id": p.id, "route": p.route, "x": p.x, "top1": p.top1, "anchor": p.is_anchor,
                          "pareto": p.id in front} for p in pts],
            "candidates": [{"key": c.key, "method": c.candidate.method, "name": c.candidate.name,
                            "status": c.candidate.status, "source": c.candidate.source, "x": c.x,
                            "top1": c.top1, "macs": c.candidate.macs, "params": c.candidate.params,
                            "activations": c.candidate.activations, "latency_ms": c.candidate.latency_ms,
                            "pareto": c.key in front} for c in cands],
            "pareto": front,
            **({"reference": [{"id": p.id, "x": p.x, "top1": p.top1} for p in reference_points(plan, pts, reference)]}
               if reference else {})}


def check_curve_out(out: Path) -> Path:
    """The file a curve may be written to, refused before anything is drawn."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".json", ".png"):
        raise CurveError(f"--out must end in .html, .png or .json, not '{out.name}'")
    if out.is_dir():
        raise CurveError(f"cannot write {out}: it is a folder")
    return out


def write_curve(fig: "go.Figure", rows: dict, out: Path) -> None:
    """Write .html (plotly.js inline: works offline), .json (the data) or .png (needs kaleido)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".html":
        write_text_atomic(out, fig.to_html(include_plotlyjs=True, full_html=True))
    elif suffix == ".json":
        write_json_atomic(out, rows)
    elif suffix == ".png":
        try:
            import kaleido  # noqa: F401  (plotly's static image export backend)
        except ImportError:
            raise CurveError("writing .png needs the 'kaleido' package (which also needs a Chrome "
                             "browser); it is not installed: write .html or .json instead") from None
        try:
            png = fig.to_image(format="png", width=900, height=560, scale=2)
        except Exception as e:  # kaleido fails in many ways without a usable browser
            raise CurveError(f"writing .png failed ({str(e).splitlines()[0][:200]}): write .html or .json instead") from None
        from composer.io import _atomic
        _atomic(out, lambda f: f.write(png))
    else:
        raise CurveError(f"--out must end in .html, .png or .json, not '{out.name}'")
