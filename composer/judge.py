"""Judging a curve: every stitch against the straight line (in MACs) between the anchors it runs
through, as those anchors were measured before any fine-tune, and each anchor's change.

A fine-tune trains the anchors too, so a line drawn between the anchors *as fine-tuned* moves: a
stitch can sit "on the line" because the line fell. The honest reference is the original anchors
(their top-1 before any fine-tune, on the same images): `line_gaps(plan, top1, reference_top1)`
measures every stitch against their line and reports how far each anchor moved. Without a
reference the line is drawn between the anchors of the same measurement.

The line of a stitch joins the cheapest and the dearest (by MACs) of the distinct anchors its
route runs through: for SN-Net's two-anchor stitches, the two anchors of its route; for SN-Netv2's
routes there and back (small -> large -> small) the two anchors it visits. It is linear in MACs and
extended beyond its ends where a stitch costs more (or less) than both anchors.

`read_reference(path, data=...)` reads an evaluation.json (or a run folder holding one) measured
before fine-tuning, for the CLI's `evaluate RUN --data D --reference FILE`; it refuses one measured
on other images. Nothing here imports torch: the judgement is arithmetic on measured top-1s.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from composer.errors import UserError
from composer.plan import StitchPlan

EVALUATION_FILE = "evaluation.json"   # composer.run.EVALUATION (not imported: run.py pulls in torch)


class JudgeError(UserError):
    """A reference that cannot be used to judge this evaluation; the message says why."""


@dataclass(frozen=True)
class StitchGap:
    id: int
    route: str              # plan.describe_route
    ends: tuple[int, int]   # anchor indices the line joins, cheaper first
    macs: int
    top1: float
    line: float             # the line's top-1 at this stitch's MACs
    gap: float              # top1 - line, in points


@dataclass(frozen=True)
class AnchorChange:
    anchor: int             # index into plan.anchors
    id: int                 # the anchor's own stitch id
    name: str
    reference: float        # its top-1 in the reference (before any fine-tune)
    top1: float             # its top-1 now
    change: float           # top1 - reference, in points


@dataclass(frozen=True)
class Judgement:
    stitches: list[StitchGap]       # every evaluated non-anchor stitch, by id
    anchors: list[AnchorChange]     # every anchor, by index
    tolerance: float                # "within" means gap >= -tolerance
    original: bool                  # the line is the reference's (True) or this measurement's anchors' (False)

    @property
    def total(self) -> int:
        return len(self.stitches)

    @property
    def within(self) -> int:
        """Stitches no more than `tolerance` points below the line."""
        return sum(s.gap >= -self.tolerance for s in self.stitches)

    @property
    def share(self) -> float | None:
        return 100.0 * self.within / self.total if self.stitches else None

    @property
    def median(self) -> float | None:
        return statistics.median(s.gap for s in self.stitches) if self.stitches else None

    @property
    def worst(self) -> StitchGap | None:
        return min(self.stitches, key=lambda s: (s.gap, s.id)) if self.stitches else None

    @property
    def worst_anchor(self) -> AnchorChange | None:
        return min(self.anchors, key=lambda a: (a.change, a.anchor)) if self.anchors else None

    def lines(self) -> list[str]:
        """The judgement in a few lines of text (what `evaluate --reference` prints under its table)."""
        whose = "the original anchors (the reference)" if self.original else "the anchors as measured here"
        out = [f"judged against the line (in MACs) between {whose}:"]
        if self.stitches:
            w = self.worst
            out.append(f"  {self.within} of {self.total} stitches within {self.tolerance:g} point of the line "
                       f"({self.share:.0f} %); median gap {self.median:+.2f}, worst {w.gap:+.2f} "
                       f"(stitch {w.id}: {w.route})")
        else:
            out.append("  no stitches evaluated besides the anchors")
        if self.original and self.anchors:
            out.append("  anchors' top-1, reference -> now: " + "; ".join(
                f"{a.name} {a.reference:.2f} -> {a.top1:.2f} ({a.change:+.2f})" for a in self.anchors))
        return out

    def to_dict(self) -> dict:
        """JSON-ready: the summary and every stitch's and anchor's row."""
        w, wa = self.worst, self.worst_anchor
        return {"reference": "original anchors" if self.original else "same measurement",
                "tolerance": self.tolerance, "stitches_judged": self.total, "within": self.within,
                "within_share": self.share, "median_gap": self.median, "worst_gap": w.gap if w else None,
                "worst_stitch": w.id if w else None,
                "worst_anchor_change": wa.change if (wa and self.original) else None,
                "gaps": [dict(asdict(s), ends=list(s.ends)) for s in self.stitches],
                "anchors": [asdict(a) for a in self.anchors]}


# --- the line ----------------------------------------------------------------------------------------

def anchor_ids(plan: StitchPlan) -> dict[int, int]:
    """Anchor index -> the stitch id of that anchor alone."""
    out = {}
    for s in plan.stitches:
        if s.is_anchor:
            out.setdefault(s.route[0].anchor, s.id)
    return out


def line_ends(plan: StitchPlan, stitch) -> tuple[int, int]:
    """The anchors (indices) whose line judges this stitch: the cheapest and the dearest by MACs of
    the distinct anchors on its route (ties: lower index first)."""
    s = plan.stitches[stitch] if isinstance(stitch, int) else stitch
    visited = sorted({seg.anchor for seg in s.route}, key=lambda a: (plan.infos[a].total.macs, a))
    return visited[0], visited[-1]


def line_gaps(plan: StitchPlan, top1: dict[int, float], reference_top1: dict[int, float] | None = None,
              tolerance: float = 1.0) -> Judgement:
    """Every evaluated stitch's gap to the line between its anchors, in points of top-1.

    top1: stitch id -> top-1 (%) as measured now (the anchors' too). reference_top1: stitch id ->
    top-1 of the same plan measured before any fine-tune, on the same images; only the anchors'
    entries are read. None: the line joins the anchors of `top1` itself (no anchor changes).
    A stitch without a top-1 is left out; an anchor that a judged stitch needs must have one."""
    ids = anchor_ids(plan)
    ref = top1 if reference_top1 is None else reference_top1
    where = "this measurement" if reference_top1 is None else "the reference"

    def anchor_top1(a: int) -> float:
        sid = ids.get(a)
        if sid is None:
            raise JudgeError(f"the plan has no route for anchor {a} alone, so there is no line to judge against")
        if ref.get(sid) is None:
            raise JudgeError(f"{where} has no top-1 for anchor {a} ({plan.anchors[a]}): evaluate every stitch")
        return float(ref[sid])

    gaps = []
    for s in plan.stitches:
        if s.is_anchor or top1.get(s.id) is None:
            continue
        lo, hi = line_ends(plan, s)
        y_lo, y_hi = anchor_top1(lo), anchor_top1(hi)   # also checks that both anchors have a route alone
        m_lo, m_hi, m = plan.cost(ids[lo]).macs, plan.cost(ids[hi]).macs, plan.cost(s).macs
        line = y_lo + (y_hi - y_lo) * (m - m_lo) / (m_hi - m_lo) if m_hi != m_lo else (y_lo + y_hi) / 2
        gaps.append(StitchGap(s.id, plan.describe_route(s), (lo, hi), int(m), float(top1[s.id]), float(line),
                              float(top1[s.id]) - float(line)))
    anchors = []
    if reference_top1 is not None:
        from zoo.sources import short_name
        for a, sid in sorted(ids.items()):
            if top1.get(sid) is None:
                continue
            before = anchor_top1(a)
            anchors.append(AnchorChange(a, sid, short_name(plan.anchors[a]), before, float(top1[sid]),
                                        float(top1[sid]) - before))
    return Judgement(gaps, anchors, float(tolerance), reference_top1 is not None)


# --- a reference read from an evaluation.json -------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    path: Path              # the evaluation.json read
    data: str               # the images it was measured on (as its evaluation recorded them)
    images: int
    step: int               # fine-tuning steps of the weights measured (0: before any fine-tune)
    rows: list[dict]        # its stitch rows (id, route, costs, top1)

    def top1_for(self, plan: StitchPlan) -> dict[int, float]:
        """The reference's anchors' top-1, keyed by `plan`'s anchor stitch ids. The reference may be of
        another run (an anchors-only run, say) as long as its anchors are the plan's: matched by the
        anchor's index and blocks, and checked by their MACs and params."""
        mine = {}
        for r in self.rows:
            route = r.get("route") or []
            if len(route) == 1 and r.get("top1") is not None:
                mine[int(route[0]["anchor"])] = r
        out = {}
        for a, sid in anchor_ids(plan).items():
            r = mine.get(a)
            if r is None:
                raise JudgeError(f"the reference {self.path} has no top-1 for anchor {a} ({plan.anchors[a]})")
            s = plan.stitches[sid]
            cost = plan.cost(s)
            blocks = [s.route[0].first, s.route[0].last]
            if list(r["route"][0].get("blocks", blocks)) != blocks or any(
                    k in r and int(r[k]) != getattr(cost, k) for k in ("macs", "params")):
                raise JudgeError(f"the reference {self.path} measured another anchor {a} than this run's "
                                 f"({plan.anchors[a]}): its blocks or costs differ")
            out[sid] = float(r["top1"])
        return out

    def judge(self, plan: StitchPlan, top1: dict[int, float], images: int, tolerance: float = 1.0) -> Judgement:
        """`line_gaps` against this reference, refusing a measurement on another number of images."""
        if int(images) != self.images:
            raise JudgeError(f"the reference {self.path} was measured on {self.images} images, this evaluation "
                             f"on {images}: the line must come from the same images (same --data, --limit, --seed)")
        return line_gaps(plan, top1, self.top1_for(plan), tolerance)


def _same_data(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def read_reference(path: Path | str, data: str | None = None) -> Reference:
    """An evaluation.json (or a run folder holding one) to judge against, checked to be readable, to
    hold top-1s, and, when `data` is given, to be measured on the same images (path resolved)."""
    p = Path(path).expanduser()
    f = p / EVALUATION_FILE if p.is_dir() else p
    if not f.is_file():
        raise JudgeError(f"no reference at {path}: give an evaluation.json written by `evaluate` before "
                         "fine-tuning (or a run folder holding one)")
    try:
        record = json.loads(f.read_text())
        rows = record["stitches"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "route" in r for r in rows):
            raise ValueError("its 'stitches' are not rows with routes")
        ref = Reference(f, str(record.get("data", "")), int(record["images"]), int(record.get("step") or 0), rows)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JudgeError(f"the reference {f} is not an evaluation written by `evaluate` ({e})") from None
    if not any(len(r["route"]) == 1 and r.get("top1") is not None for r in rows):
        raise JudgeError(f"the reference {f} holds no anchor's top-1")
    if data is not None and not _same_data(ref.data, str(data)):
        raise JudgeError(f"the reference {f} was measured on {ref.data}, this evaluation is on {data}: "
                         "the line must come from the same images")
    return ref
