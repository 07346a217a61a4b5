"""What one browser tab (or one API client) is doing: its family, plan, run, fine-tune and exports.

No Gradio here: every action is a method that calls the library and raises `AppError` with a
message for the user when the input is bad. `composer.ui.app` only wires these to widgets, so the
same actions are scriptable and testable without a browser.

Security rules kept here: data folders and local anchors resolve only inside configured roots
(symlinks resolved first), run folders are named by the server-made session key, and only zips
this session exported can be handed out for download.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from composer.checks import number, whole
from composer.costs import AnchorInfo
from composer.errors import UserError
from composer.plan import PlanError, Segment, StitchPlan, build_plan
from composer.routes import check_route, route_from_junctions, routes_plan
from zoo.sources import short_name

log = logging.getLogger(__name__)

SESSION_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
RUN_NAME = re.compile(r"^run-\d{1,6}$")
DEFAULT_OPTIONS = {"kernel": 2, "stride": 1, "all_pairs": False}   # SN-Net's sliding window
_STARTER_BUILD = threading.Lock()   # one build of the starter family, whichever tabs ask for it
DATASET_SCHEMES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")
Progress = Callable[[float, str], None]


class AppError(UserError):
    """Bad input or an impossible action; the message is shown to the user as it is."""


# composer.pipeline's progress events as the app's progress(fraction, text): phase -> (from, to, text)
FIT_STEPS = {"anchors": (0.02, 0.05, "loading anchors with their weights"),
             "fit": (0.05, 0.5, "fitting stitching layers: {done}/{total} images"),
             "route_stats": (0.5, 0.6, "BatchNorm statistics per stitch: {done}/{total} images"),
             "evaluate": (0.6, 1.0, "evaluating {stitches} stitches: {done}/{total} images")}
LATENCY_STEPS = {"latency": (0.0, 1.0, "timing stitch {done}/{total}")}


def _as_fraction(progress: Progress | None, steps: dict[str, tuple[float, float, str]]) -> Callable[[dict], None]:
    def show(e: dict) -> None:
        if progress is None or e.get("type") != "progress" or e.get("phase") not in steps:
            return
        lo, hi, text = steps[e["phase"]]
        progress(lo + (hi - lo) * e["done"] / max(e["total"], 1), text.format(**e))
    return show


@dataclass
class AppConfig:
    runs_root: Path                       # one folder per session under it
    exports_dir: Path                     # only exported zips live here (served for download)
    data_roots: list[Path] = field(default_factory=list)    # ImageFolders must be inside one of these
    model_roots: list[Path] = field(default_factory=list)   # local families are looked for here
    starter_cache: Path | None = None     # None: zoo.starter's default cache
    eval_limit: int = 500                 # images for the curve before training
    max_sessions: int = 64


@dataclass
class FamilyEntry:
    id: str
    name: str
    source: str                 # "starter" | "hub" | "local" | "cached" | "custom"
    specs: list[str] = field(default_factory=list)   # empty for the starter until it is built
    tag: str = ""               # what the members were pretrained on
    note: str = ""

    def label(self) -> str:
        members = f", {len(self.specs)} members" if self.specs else ""
        return f"{self.name} ({self.source}{members})"


# --- families ------------------------------------------------------------------------------------

STARTER = FamilyEntry("starter", "Starter: 3 tiny ViTs on digits", "starter", [],
                      "scikit-learn digits (built in)", "trained here on first use, about a minute")


def _hub():
    try:
        from zoo import hub
        return hub
    except ImportError:
        return None


def _entry_from(family, source: str, index: int) -> FamilyEntry:
    """A zoo.hub Family as an entry (attribute names read defensively: only specs are required)."""
    specs = list(getattr(family, "members", None) or getattr(family, "specs", None) or getattr(family, "anchors", []))
    specs = [getattr(m, "spec", m) for m in specs]
    name = getattr(family, "name", None) or f"family {index}"
    tag = getattr(family, "pretrain", None) or getattr(family, "tag", None) or getattr(family, "pretrained_on", "") or ""
    return FamilyEntry(f"{source}:{index}", str(name), source, [str(s) for s in specs], str(tag))


def _hub_reachable_for(entry: FamilyEntry) -> None:
    """Refuse at once (not after the Hub client's retries) a family whose hf-hub: members are not in
    the local Hub cache while the Hub cannot be reached."""
    missing = []
    for spec in entry.specs:
        if spec.startswith("hf-hub:"):
            try:
                from huggingface_hub import try_to_load_from_cache
                cached = try_to_load_from_cache(spec[len("hf-hub:"):].split("@")[0], "config.json")
            except Exception:   # a malformed id: timm's own error names it later
                cached = None
            if not isinstance(cached, str):
                missing.append(spec)
    if not missing:
        return
    hub = _hub()
    try:
        status = hub.hub_status() if hub is not None else None
    except Exception as e:
        status = f"Hub status unknown ({type(e).__name__})."
    if status:
        raise AppError(f"{entry.name} needs the Hugging Face Hub: {len(missing)} of its members (e.g. "
                       f"{short_name(missing[0])}) are not downloaded yet. {status.rstrip('.')}. Choose the starter, "
                       "a cached or a local family, or try again when online.")


def hub_status_line() -> str:
    hub = _hub()
    if hub is None:
        return "Hub browsing is not available in this build."
    try:
        status = hub.hub_status()
    except Exception as e:  # status is informational: never let it break browsing
        return f"Hub status unknown ({type(e).__name__})."
    return "Hub online: search it above." if status is None else str(status)


# --- sessions ------------------------------------------------------------------------------------

class Session:
    """State and actions of one tab. Methods hold `lock`, so two events of one tab never interleave."""

    def __init__(self, key: str, config: AppConfig):
        self.key, self.config = key, config
        self.lock = threading.RLock()
        self.created = self.touched = time.time()
        self.families: dict[str, FamilyEntry] = {STARTER.id: STARTER}
        self.family: FamilyEntry | None = None
        self.member_infos: dict[str, AnchorInfo] = {}
        self.specs: list[str] = []
        self.infos: list[AnchorInfo] = []          # chosen anchors, sorted by MACs
        self.options = dict(DEFAULT_OPTIONS)
        self.points: list[tuple[int, int, int, int]] | None = None   # None: SN-Net's defaults
        self.two_way = False                       # SN-Netv2's routes between two anchors instead of SN-Net's
        self.routes: list[tuple[Segment, ...]] | None = None   # two-way routes by hand; None: SN-Netv2's own
        self.plan: StitchPlan | None = None
        self.run_dir: Path | None = None
        self.net = None                            # the fitted network, kept for latency measurement
        self.data: str | None = None
        self.r2: dict[int, float] = {}
        self.top1: dict[int, float] = {}
        self.reference: dict[int, float] | None = None   # the anchors' top-1 before the fine-tune, same images
        self.top1_source = ""
        self.latency: dict[int, float] | None = None
        self.selected: int | None = None
        self.job = None                            # composer.ui.jobs.TrainJob
        self.builder = None                        # composer.ui.jobs.BuilderJob: elastic / shrink / fold
        self.builder_result = ""                   # the last builder's report (Markdown)
        self.exports: set[Path] = set()
        self.message, self.error = "", False       # the latest message drawn on the graph
        self.train_form: dict = {}                 # the fine-tune form as last started (shown again after a reload)

    # --- browse ----------------------------------------------------------------------------------

    def list_families(self, query: str = "") -> tuple[list[FamilyEntry], str]:
        """Starter + local (under the model roots) + cached + Hub families; a one-line Hub status.
        Offline, the Hub is not asked at all and the status line says so."""
        query = (query or "").strip()
        if len(query) > 100:
            raise AppError("the search text is too long (at most 100 characters)")
        built = self.families.get(STARTER.id)
        entries, notes = [built if built is not None and built.specs else STARTER], []   # the built one keeps its members
        hub = _hub()
        status = hub_status_line()
        if hub is not None:
            sources = [("local", hub.local_families, (root,)) for root in self.config.model_roots]
            sources.append(("cached", hub.cached_families, ()))
            if status.startswith("Hub online"):
                sources.append(("hub", hub.list_hub_families, (query or None,)))
            for source, fn, args in sources:
                try:
                    found = fn(*args)
                except Exception as e:   # one source failing must not hide the others
                    notes.append(f"{source}: {(str(e).splitlines() or [type(e).__name__])[0][:160]}")
                    continue
                entries += [_entry_from(f, source, len(entries) + i) for i, f in enumerate(found)]
        if query:
            q = query.lower()
            entries = [e for e in entries if e.source == "hub" or q in e.name.lower()
                       or any(q in s.lower() for s in e.specs)]
        with self.lock:
            self.families = {e.id: e for e in entries}
            self.families.setdefault(STARTER.id, STARTER)
            if self.family is not None:   # the family shown stays a choice (a custom one, or a reopened run's)
                self.families.setdefault(self.family.id, self.family)
        return entries, status + (" " + "; ".join(notes) if notes else "")

    def custom_family(self, text: str) -> FamilyEntry:
        """Anchors typed by the user: timm names and hf-hub: repos; local-dir: only inside model roots."""
        specs = [s.strip() for s in re.split(r"[,\n]", text or "") if s.strip()]
        if not specs:
            raise AppError("type at least one anchor: timm names or hf-hub:org/repo, separated by commas")
        if len(specs) < 2:
            raise AppError(f"a family needs at least two anchors to stitch, got {len(specs)}: add a larger "
                           "(or smaller) one, separated by a comma")
        if len(specs) > 8:
            raise AppError(f"at most 8 anchors at once, got {len(specs)}")
        for s in specs:
            if s.startswith("local-dir:"):
                self._inside(Path(s[len("local-dir:"):]), self.config.model_roots, "model folders")
            elif not re.fullmatch(r"(hf-hub:)?[A-Za-z0-9_./-]+(\.[A-Za-z0-9_]+)?", s) or ".." in s:
                raise AppError(f"'{s[:80]}' is not a timm model name or hf-hub:org/repo")
        entry = FamilyEntry("custom", "Custom anchors", "custom", specs, "as named")
        with self.lock:
            self.families[entry.id] = entry
        return entry

    def choose_family(self, family_id: str, progress: Progress | None = None) -> list[dict]:
        """Select a family; measure every member on the meta device (no weights); plan with all."""
        with self.lock:
            self._no_running_job()
            entry = self.families.get(family_id)
            if entry is None:
                raise AppError(f"unknown family '{str(family_id)[:60]}': list the families again and pick one")
            if entry.source == "starter":
                from zoo.starter import ensure_starter
                if progress:
                    progress(0.0, "opening the starter family (its first use trains it: about a minute)")
                with _STARTER_BUILD:   # other tabs wait for this build instead of training their own
                    fam = ensure_starter(self.config.starter_cache)
                entry = FamilyEntry(STARTER.id, STARTER.name, "starter", list(fam.anchors), STARTER.tag,
                                    "top-1 on its val split: " + ", ".join(
                                        f"{short_name(a)} {acc:.1f}%" for a, acc in fam.accuracies.items()))
                self.families[entry.id] = entry
            if len(entry.specs) < 2:
                raise AppError(f"family {entry.name} has {len(entry.specs)} member(s): stitching needs at least two")
            _hub_reachable_for(entry)
            if progress:
                progress(0.5, "measuring members (shapes and MACs, no weights)")
            from composer.data import SizeMismatch
            from composer.run import NATIVE, load_anchors
            try:
                _, infos = load_anchors(entry.specs, pretrained=False, device="meta")
            except SizeMismatch:   # members trained at different sizes (EfficientNet-B0..B7): each at its own
                _, infos = load_anchors(entry.specs, pretrained=False, device="meta", resolution=NATIVE)
            self.family = entry
            self.member_infos = dict(zip(entry.specs, infos))
            self.two_way = False    # a new family starts from SN-Net's defaults (two-way takes exactly two anchors)
            self._set_anchors(entry.specs)
            return self.members()

    def members(self) -> list[dict]:
        if self.family is None:
            return []
        rows = []
        for spec, info in sorted(self.member_infos.items(), key=lambda kv: kv[1].total.macs):
            rows.append({"spec": spec, "name": short_name(spec), "params_m": info.total.params / 1e6,
                         "macs_m": info.total.macs / 1e6, "resolution": "x".join(map(str, info.input_size[1:])),
                         "blocks": info.depth, "pretrained": self.family.tag})
        return rows

    def set_anchors(self, specs: list[str]) -> StitchPlan:
        with self.lock:
            self._no_running_job()
            if self.family is None:
                raise AppError("choose a family first")
            unknown = [s for s in specs if s not in self.member_infos]
            if unknown:
                raise AppError(f"not a member of {self.family.name}: {unknown[0][:80]}")
            if len(specs) < 2:
                raise AppError(f"choose at least two anchors (got {len(specs)}): a stitch joins a smaller anchor "
                               "to a larger one")
            if self.two_way and len(specs) != 2:
                raise AppError(f"a two-way plan (SN-Netv2) joins exactly two anchors, and {len(specs)} are ticked: "
                               "tick two, or untick 'two-way' in section 2 first")
            old = (self.specs, self.infos, self.points, self.routes)
            try:
                return self._set_anchors(specs)
            except PlanError:   # the plan shown stays, with the anchors it was made of
                self.specs, self.infos, self.points, self.routes = old
                raise

    def _set_anchors(self, specs: list[str]) -> StitchPlan:
        self.specs = list(specs)
        self.infos = sorted((self.member_infos[s] for s in specs), key=lambda i: i.total.macs)
        self.points, self.routes = None, None
        return self._replan(f"{len(specs)} anchors: " +
                            ("SN-Netv2's two-way routes" if self.two_way else "SN-Net's default stitches"))

    # --- plan ------------------------------------------------------------------------------------

    def set_options(self, kernel: int, stride: int, all_pairs: bool) -> StitchPlan:
        with self.lock:
            self._no_running_job()
            self._need_plan()
            if self.two_way:
                raise AppError("kernel, stride and all pairs shape SN-Net's one-way stitches: untick 'two-way' to "
                               "use them (a two-way plan takes SN-Netv2's routes, edited on the graph)")
            kernel, stride = whole(kernel, "kernel"), whole(stride, "stride")   # the plan checks their range
            old = dict(self.options)
            self.options = {"kernel": kernel, "stride": stride, "all_pairs": bool(all_pairs)}
            self.points = None   # the defaults depend on the options: start again from them
            try:
                return self._replan("plan options changed: SN-Net's default stitches for them")
            except PlanError:
                self.options = old
                raise

    def reset_plan(self) -> StitchPlan:
        with self.lock:
            self._no_running_job()
            self._need_plan()
            old = (dict(self.options), self.two_way, self.routes)
            self.options = dict(DEFAULT_OPTIONS)   # kernel 2, stride 1, neighbours: all of SN-Net's defaults
            self.points, self.two_way, self.routes = None, False, None
            try:
                return self._replan("back to SN-Net's defaults: kernel 2, stride 1, neighbours only, default stitches"
                                    + (" (one-way: tick 'two-way' again for SN-Netv2's routes)" if old[1] else ""))
            except PlanError:
                self.options, self.two_way, self.routes = old
                raise

    def set_two_way(self, on: bool) -> StitchPlan:
        """SN-Netv2's routes between the two anchors (both ways, and there and back), or SN-Net's
        one-way stitches again; either starts from its own default routes."""
        with self.lock:
            self._no_running_job()
            self._need_plan()
            if not isinstance(on, bool):
                raise AppError(f"two-way is true or false, not '{str(on)[:20]}'")
            if on == self.two_way:
                return self.plan
            if on and len(self.infos) != 2:
                raise AppError(f"a two-way plan (SN-Netv2) joins exactly two anchors, and {len(self.infos)} are "
                               "ticked: tick two in section 1 first")
            old = (self.two_way, self.routes, self.points)
            self.two_way, self.routes, self.points = on, None, None
            small, large = (short_name(i.name) for i in self.infos[:2])
            try:
                return self._replan(f"two-way (SN-Netv2): {small} -> {large}, {large} -> {small} and there and back; "
                                    "click blocks to add a route" if on else "one-way again: SN-Net's default stitches")
            except PlanError:
                self.two_way, self.routes, self.points = old
                raise

    def current_points(self) -> list[tuple[int, int, int, int]]:
        """(front anchor, front block, back anchor, back block) of every stitch of a one-way plan."""
        self._need_plan()
        return [(s.route[0].anchor, s.route[0].last, s.route[1].anchor, s.route[1].first)
                for s in self.plan.stitches if not s.is_anchor]

    def current_routes(self) -> list[tuple[Segment, ...]]:
        """Every route of the plan between anchors (what a two-way plan is edited as)."""
        self._need_plan()
        return [s.route for s in self.plan.stitches if not s.is_anchor]

    def add_stitch(self, front: tuple[int, int], back: tuple[int, int]) -> StitchPlan:
        with self.lock:
            if self.two_way:   # one link, in either direction
                return self.add_route([front, back])
            self._no_running_job()
            point = _point(front, back)
            points = self.current_points()
            if point[0] == point[2]:
                raise AppError("pick blocks in two different anchors: a stitch joins a smaller anchor to a larger one")
            if point in points:
                raise AppError(f"that stitch already exists ({self._point_text(point)})")
            return self._replan_points(points + [point], f"added {self._point_text(point)}")

    def add_route(self, points) -> StitchPlan:
        """Add the route through these blocks (composer.routes.route_from_junctions): where it leaves
        an anchor and enters the other, twice for a route that comes back (two-way plans only)."""
        with self.lock:
            self._no_running_job()
            self._need_plan()
            if not self.two_way:
                if isinstance(points, (list, tuple)) and len(points) == 2:
                    return self.add_stitch(*points)
                raise AppError("a route that goes there and back needs a two-way plan: tick 'two-way (SN-Netv2)' in "
                               "section 2 first (with two anchors)")
            route = route_from_junctions(self.infos, points)
            routes = self.current_routes()
            if route in routes:
                raise AppError(f"that route already exists ({self._route_text(route)})")
            return self._replan_routes(routes + [route], f"added {self._route_text(route)}")

    def move_stitch(self, old: tuple[int, int, int, int], end: str, to: tuple[int, int]) -> StitchPlan:
        """Move one end ("front" or "back") of an existing stitch to another block (in a two-way
        plan: of a link, in every route through it, within its anchor)."""
        with self.lock:
            self._no_running_job()
            if self.two_way:
                return self._move_link(_point4(old), end, _pair(to))
            old = _point4(old)
            points = self.current_points()
            if old not in points:
                raise AppError("that stitch is no longer in the plan")
            a, u = _pair(to)
            if end == "front":
                new = (a, u, old[2], old[3])
            elif end == "back":
                new = (old[0], old[1], a, u)
            else:
                raise AppError(f"end must be 'front' or 'back', not '{str(end)[:20]}'")
            if new == old:
                return self.plan
            if new[0] == new[2]:
                raise AppError("both ends are in the same anchor: a stitch joins two anchors")
            if new in points:
                raise AppError(f"that stitch already exists ({self._point_text(new)})")
            return self._replan_points([new if p == old else p for p in points],
                                       f"moved {self._point_text(old)} to {self._point_text(new)}")

    def remove_stitch(self, point: tuple[int, int, int, int]) -> StitchPlan:
        """Remove a stitch (in a two-way plan: a link, with every route through it)."""
        with self.lock:
            self._no_running_job()
            point = _point4(point)
            if self.two_way:
                routes = self.current_routes()
                kept = [r for r in routes if point not in _links(r)]
                if len(kept) == len(routes):
                    raise AppError("that link is not in the plan")
                n = len(routes) - len(kept)
                return self._replan_routes(kept, f"removed {self._point_text(point)} and the {n} "
                                                 f"route{'s' if n > 1 else ''} through it")
            points = self.current_points()
            if point not in points:
                raise AppError("that stitch is not in the plan")
            return self._replan_points([p for p in points if p != point], f"removed {self._point_text(point)}")

    def _move_link(self, old: tuple[int, int, int, int], end: str, to: tuple[int, int]) -> StitchPlan:
        """A two-way link's end moved to another block of the same anchor, in every route through it."""
        f, j, b, k = old
        if end not in ("front", "back"):
            raise AppError(f"end must be 'front' or 'back', not '{str(end)[:20]}'")
        anchor = f if end == "front" else b
        if to[0] != anchor:
            raise AppError(f"in a two-way plan a link's end moves within its anchor: drop it on a block of "
                           f"{short_name(self.infos[anchor].name)}")
        new = (f, to[1], b, k) if end == "front" else (f, j, b, to[1])
        if new == old:
            return self.plan
        routes = self.current_routes()
        if not any(old in _links(r) for r in routes):
            raise AppError("that link is no longer in the plan")
        moved = []
        for r in routes:
            m = _with_link(r, old, new)
            if m != r:
                try:
                    check_route(self.infos, m)
                except UserError as e:
                    raise AppError(f"moving it would break the route {self._route_text(r)} ({e}): remove that route "
                                   "first, or move the end elsewhere") from None
            moved.append(m)
        return self._replan_routes(moved, f"moved {self._point_text(old)} to {self._point_text(new)}")

    def _replan_routes(self, routes: list[tuple[Segment, ...]], message: str) -> StitchPlan:
        old = self.routes
        self.routes = routes
        try:
            return self._replan(message)
        except PlanError:
            self.routes = old
            raise

    def _replan_points(self, points, message: str) -> StitchPlan:
        old = self.points
        self.points = points
        try:
            return self._replan(message)
        except PlanError:
            self.points = old
            raise

    def _replan(self, message: str) -> StitchPlan:
        pts = None if self.points is None else [((f, j), (b, k)) for f, j, b, k in self.points]
        try:
            if self.two_way and self.routes is not None:
                plan = routes_plan(self.infos, _routes_json(self.routes))
            elif self.two_way:
                plan = build_plan(self.infos, two_way=True)
            else:
                plan = build_plan(self.infos, points=pts, **self.options)
        except UserError as e:   # the library names anchors by spec; short names read better here
            text = str(e)
            for info in sorted(self.infos, key=lambda i: -len(i.name)):
                text = text.replace(info.name, short_name(info.name))
            raise PlanError(text) from None
        kept = self._kept_note()
        self.plan = plan
        # A different plan needs a new fit: the old run stays on disk (listed under "earlier runs",
        # `open_run` restores it) and a new plan starts beside it.
        self.run_dir, self.net, self.r2, self.top1, self.top1_source = None, None, {}, {}, ""
        self.latency, self.selected, self.reference = None, None, None
        self.job = None    # never running here (_no_running_job): its run is an earlier run now
        if plan.native_resolution:
            from composer.curve import input_sizes_text
            message += f" · members trained at different sizes: {input_sizes_text(plan)}, stitching layers resample"
        self.message, self.error = message + kept, False
        return plan

    def _kept_note(self) -> str:
        """What a plan change leaves behind, said after the change ("" when nothing was fitted)."""
        if self.run_dir is None:
            return ""
        return (f" · {self.run_dir.name} ({self._run_state(self.run_dir)}) is kept: reopen it from "
                "'earlier runs' (section 3)")

    def _point_text(self, p) -> str:
        f, j, b, k = p
        return f"{short_name(self.infos[f].name)} block {j} -> {short_name(self.infos[b].name)} block {k}"

    def _route_text(self, route: tuple[Segment, ...]) -> str:
        return " -> ".join(f"{short_name(self.infos[g.anchor].name)}[{g.first}..{g.last}]" for g in route)

    @property
    def resolution(self) -> str | None:
        """"native" when the chosen anchors were trained at different sizes: each runs at its own, a
        route at its first anchor's, stitching layers resampling (composer.run.set_native)."""
        from composer.run import NATIVE
        return NATIVE if len({tuple(i.input_size) for i in self.infos or []}) > 1 else None

    def plan_options(self) -> dict:
        """The plan as composer.pipeline.fit_run's plan_options rebuild it."""
        if self.two_way:
            if self.routes is None:
                return {"two_way": True}
            return {"routes": _routes_json(self.routes)}
        return {**self.options, "points": None if self.points is None else [[[f, j], [b, k]] for f, j, b, k in self.points]}

    # --- fit -------------------------------------------------------------------------------------

    def resolve_data(self, spec: str) -> str:
        """A data spec the library may open: starter, a dataset name, or a folder inside a data root."""
        spec = (spec or "").strip()
        if not spec:
            raise AppError("choose calibration data: 'starter', a folder under the data roots, or a data set name")
        if spec in ("starter", "starter:train", "starter:val"):
            return spec
        if spec.startswith(DATASET_SCHEMES):
            if ".." in spec or len(spec) > 200:
                raise AppError(f"'{spec[:80]}' is not a data set name")
            return spec
        folder = self._inside(Path(spec), self.config.data_roots, "data folders", relative_ok=True)
        return str(folder)

    def _inside(self, path: Path, roots: list[Path], what: str, relative_ok: bool = False) -> Path:
        """`path` (relative ones: under a root) resolved, links included, and inside one of `roots`;
        refused otherwise with what to do about it."""
        data = what.startswith("data")
        flag = "--data-root" if data else "--model-root"
        fill = ("put an ImageFolder there (one subfolder per class) or choose a folder from the list" if data else
                "put a timm model folder there (config.json + model.safetensors)")
        if not roots:
            raise AppError(f"{what} are disabled: the app was started without {flag}; restart it with "
                           f"{flag} /path/to/your/folders")
        candidates = [path] if path.is_absolute() else ([r / path for r in roots] if relative_ok else [])
        for c in candidates:
            real = c.expanduser().resolve()
            for r in roots:
                if real == r.resolve() or real.is_relative_to(r.resolve()):
                    if not real.exists():
                        raise AppError(f"{c} does not exist: {fill}")
                    return real
        places = ", ".join(str(r) + ("" if r.is_dir() else " (not created yet)") for r in roots)
        if not path.is_absolute():
            raise AppError(f"'{str(path)[:80]}' is not a folder under the {what[:-1]} root ({places}): give a "
                           f"folder inside it, or restart the app with {flag} pointing where your folders are")
        if not path.expanduser().exists():
            raise AppError(f"{str(path)[:120]} does not exist; {what} must also be inside {places} (restart the app "
                           f"with {flag} to add a folder)")
        raise AppError(f"{str(path)[:120]} is outside the {what[:-1]} roots ({places}): restart the app with "
                       f"{flag} {str(path)[:120]} (or a folder above it) to use it, or move it into {roots[0]}")

    def data_choices(self) -> list[str]:
        """'starter' and the ImageFolders (folders of class folders) found in the data roots."""
        out = ["starter"]
        for root in self.config.data_roots:
            if not root.is_dir():
                continue
            for d in sorted([root, *root.iterdir(), *(p for q in root.iterdir() if q.is_dir() for p in q.iterdir())])[:200]:
                try:
                    if d.is_dir() and any(c.is_dir() for c in d.iterdir()) and not any(
                            c.is_dir() and any(g.is_dir() for g in c.iterdir()) for c in d.iterdir()):
                        out.append(str(d))
                except OSError:
                    continue
        return out

    def fit(self, data: str, calib: int = 256, eval_images: int | None = None,
            progress: Progress | None = None) -> dict[int, float]:
        """Build the network with weights, fit every stitching layer, save a run, evaluate all stitches
        (composer.pipeline's fit_run and evaluate_run; the starter is evaluated on its val split)."""
        from composer.pipeline import evaluate_run, fit_run
        from composer.run import data_name
        show = _as_fraction(progress, FIT_STEPS)
        with self.lock:
            self._no_running_job()
            self._need_plan()
            spec = self.resolve_data(data)
            calib = whole(calib, "calibration images", 1, 100_000)
            eval_images = whole(self.config.eval_limit if eval_images is None else eval_images,
                                "evaluation images", 1, 100_000)
            eval_spec = "starter:val" if spec.startswith("starter") else spec
            run_dir = self._new_run_dir()
            try:
                fitted = fit_run(self.specs, spec, run_dir, calib=calib, plan_options=self.plan_options(),
                                 resolution=self.resolution,
                                 manifest_extra={"app": {"family": self.family.name if self.family else None,
                                                         "family_tag": self.family.tag if self.family else ""}},
                                 progress=show)
                res = evaluate_run(run_dir, eval_spec, limit=eval_images, net=fitted.net, progress=show)
            except BaseException as e:
                if run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()   # nothing was written: the next fit takes this name again
                if isinstance(e, UserError) and "download=True" in str(e):   # torchvision's advice: not ours to give
                    raise AppError(_not_downloaded(spec)) from None
                raise
            kept = self._kept_note()
            net = fitted.net
            self.plan, self.net, self.run_dir, self.data = net.plan, net, run_dir, spec
            self.r2, self.top1, self.reference = dict(fitted.r2), dict(res.top1), None
            self.top1_source = f"after fitting, before fine-tuning ({res.images} images of {data_name(eval_spec)})"
            self.latency, self.selected, self.job = None, None, None   # a new run: no fine-tune yet
            worst = min(fitted.r2.values()) if fitted.r2 else float("nan")
            self.message = (f"fitted {len(net.plan.layers)} stitching layers on {fitted.images} images; "
                            f"lowest R^2 {worst:.2f}" + kept)
            self.error = False
            return self.r2

    def _new_run_dir(self) -> Path:
        base = self.config.runs_root / self.key
        base.mkdir(parents=True, exist_ok=True)
        n = 1 + max([int(p.name[4:]) for p in base.glob("run-*") if p.name[4:].isdigit()] or [0])
        return base / f"run-{n}"

    # --- earlier runs: every fitted run of this session stays on disk and can be reopened ----------

    def _runs_dir(self) -> Path:
        return self.config.runs_root / self.key

    def runs(self) -> list[tuple[str, str]]:
        """(label, name) of this session's fitted runs, newest first: what 'earlier runs' offers."""
        from composer.run import MANIFEST, PLAN
        base = self._runs_dir()
        if not base.is_dir():
            return []
        found = [p for p in base.iterdir() if RUN_NAME.match(p.name) and (p / MANIFEST).is_file() and (p / PLAN).is_file()]
        out = []
        for p in sorted(found, key=lambda p: -int(p.name[4:])):
            try:
                n = len(json.loads((p / PLAN).read_text()).get("stitches", []))
                what = f"{n} stitches · {self._run_state(p)}"
            except (OSError, ValueError, UserError):
                what = "unreadable"
            out.append((f"{p.name} · {what}" + (" · shown" if p == self.run_dir else ""), p.name))
        return out

    @staticmethod
    def _run_state(run_dir: Path) -> str:
        """'fitted', 'fine-tuned to step N' or 'diverged at step N (step K kept)', from the run's manifest."""
        from composer.run import read_manifest
        try:
            m = read_manifest(run_dir)
        except UserError:
            return "unreadable"
        tr, bad = m.get("train") or {}, m.get("train_diverged")
        if bad:
            return f"diverged at step {bad.get('at_step')} (step {bad.get('checkpoint_step', 0)} kept)"
        return f"fine-tuned to step {tr['step']}" if tr.get("step") else "fitted"

    def open_run(self, name: str) -> StitchPlan:
        """Show an earlier run of this session again as it was left: its anchors, plan and options, fit
        quality, accuracies (the latest measurement), latency, selected stitch and fine-tune state."""
        from composer.run import read_latency, read_manifest, read_original_top1, read_top1
        with self.lock:
            self._no_running_job()
            name = str(name or "").strip()
            if not RUN_NAME.match(name) or not (self._runs_dir() / name).is_dir():
                raise AppError(f"no run '{name[:40]}' in this session: choose one from 'earlier runs'")
            run_dir = self._runs_dir() / name
            if run_dir == self.run_dir:
                self.message, self.error = f"{name} is the run shown", False
                return self.plan
            from composer.run import load_plan_of_run
            manifest = read_manifest(run_dir)
            plan = load_plan_of_run(run_dir)
            kept = self._kept_note()
            if self.family is None or not all(a in self.member_infos for a in plan.anchors):
                app = manifest.get("app") or {}
                self.family = FamilyEntry(f"run:{name}", str(app.get("family") or "anchors of " + name), "run",
                                          list(plan.anchors), str(app.get("family_tag") or ""))
                self.families[self.family.id] = self.family
                self.member_infos = dict(zip(plan.anchors, plan.infos))
            self.specs, self.infos, self.plan = list(plan.anchors), list(plan.infos), plan
            self.options = {k: plan.options.get(k, v) for k, v in DEFAULT_OPTIONS.items()}
            self.two_way = bool(plan.options.get("two_way"))
            self.routes = ([s.route for s in plan.stitches if not s.is_anchor]
                           if self.two_way and plan.options.get("custom_routes") else None)
            self.points = ([(s.route[0].anchor, s.route[0].last, s.route[1].anchor, s.route[1].first)
                            for s in plan.stitches if not s.is_anchor]
                           if not self.two_way and plan.options.get("custom_points") else None)
            fit = manifest.get("fit") or {}
            self.run_dir, self.net, self.job = run_dir, None, None
            self.data = str(fit.get("data") or "starter")
            self.r2 = {int(k): float(v) for k, v in (fit.get("r2") or {}).items()}
            try:
                self.top1, self.top1_source = read_top1(run_dir)
                self.reference = read_original_top1(run_dir)
            except UserError:
                self.top1, self.top1_source, self.reference = {}, "", None
            self.latency = read_latency(run_dir)
            sid = self._selections().get(name)
            self.selected = sid if isinstance(sid, int) and 0 <= sid < len(plan.stitches) else None
            self.message, self.error = f"reopened {name} ({self._run_state(run_dir)})" + kept, False
            return plan

    def _selections(self) -> dict:
        f = self._runs_dir() / "selections.json"
        try:
            data = json.loads(f.read_text()) if f.is_file() else {}
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember_selection(self) -> None:
        """The selected stitch of the shown run, kept beside the runs so that reopening it selects it again."""
        if self.run_dir is None or self.selected is None:
            return
        from composer.io import write_json_atomic
        try:
            write_json_atomic(self._runs_dir() / "selections.json", {**self._selections(), self.run_dir.name: self.selected})
        except (OSError, UserError):
            log.warning("could not remember the selection of %s", self.run_dir)

    # --- fine-tune -------------------------------------------------------------------------------

    def start_training(self, add_steps, config, data: str | None = None, form: dict | None = None):
        """Start (or resume from the run's checkpoint) a fine-tune of `add_steps` more steps in the
        background. The trainer's `config.steps` is a total across resumes: it is set here, to the
        checkpoint's step + add_steps. `form`: the fine-tune form as the user set it (shown again
        after a reload)."""
        from dataclasses import replace

        from composer.train import checkpoint_step
        from composer.ui.jobs import TrainJob
        with self.lock:
            self._no_running_job()
            if self.run_dir is None:
                raise AppError("fit the stitching layers first (step 3), or reopen an earlier run: fine-tuning "
                               "starts from a fitted run")
            add = whole(add_steps, "steps to add", 1, 1_000_000)
            spec = self.resolve_data(data or self.data or "")
            if spec == "starter:val":
                raise AppError("fine-tune on training data, not on the validation split: choose 'starter'")
            done = checkpoint_step(self.run_dir) or 0
            self.net = None   # the weights will change: what needs them loads them again
            self.job = TrainJob(self.run_dir, "starter" if spec == "starter:train" else spec,
                                replace(config, steps=done + add), on_eval=self._on_eval, on_end=self._on_train_end)
            self.job.start()
            self.train_form = {**(form or {}), "steps": add}
            return self.job

    def _on_eval(self, step: int, top1: dict[int, float], reference: dict[int, float] | None = None) -> None:
        # Called from the training thread: replace the dicts (readers never see them half-built).
        # reference: the same held-out images before the fine-tune, drawn as the original anchors' line
        self.top1, self.reference = dict(top1), (dict(reference) if reference else None)
        self.top1_source = f"fine-tuning, step {step}"

    def _on_train_end(self, run_dir: Path, state: str) -> None:
        """Called from the training thread when a job ends. After a divergence the curve shows again
        what was measured of the weights kept on disk (the last finite checkpoint, or the fit)."""
        if state != "diverged" or run_dir != self.run_dir:
            return
        from composer.run import read_top1
        try:
            top1, source = read_top1(run_dir)
        except UserError:
            return
        self.top1, self.top1_source = dict(top1), f"{source} (kept after the divergence)"

    def training_snapshot(self) -> dict | None:
        """The fine-tune of the run shown: its job while it lives, else what the run holds on disk."""
        job = self.job
        if job is not None and self.run_dir is not None and job.run_dir == self.run_dir:
            return job.snapshot()
        if self.run_dir is None:
            return None
        from composer.run import read_manifest
        try:
            manifest = read_manifest(self.run_dir)
        except UserError:
            return None
        tr, bad = manifest.get("train") or {}, manifest.get("train_diverged")
        if bad:
            return {"state": "diverged", "step": bad.get("checkpoint_step", 0), "total_steps": None,
                    "message": f"the last fine-tune diverged at step {bad.get('at_step')} ({bad.get('reason')}, lr "
                               f"{bad.get('lr')}); the checkpoint at step {bad.get('checkpoint_step', 0)} is kept: "
                               "lower the learning rate, then Start / resume"}
        if not tr:
            return None
        return {"state": tr.get("status", "done"), "step": tr.get("step", 0),
                "total_steps": (tr.get("config") or {}).get("steps"),
                "message": f"fine-tuned to step {tr.get('step', 0)} (saved in {self.run_dir.name})"}

    def cancel_training(self) -> bool:
        job = self.job
        if job is None or not job.running:
            return False
        job.cancel.set()
        return True

    def _no_running_job(self) -> None:
        if self.job is not None and self.job.running:
            raise AppError("a fine-tune is running in this session: cancel it (or wait) before changing this")
        if self.builder is not None and self.builder.running:
            raise AppError(f"a {self.builder.kind} job is running in this session: wait for it (or cancel it) first")

    def _need_plan(self) -> None:
        if self.plan is None:
            raise AppError("choose a family first")

    # --- curve, selection ------------------------------------------------------------------------

    def curve_figure(self, x: str = "macs"):
        from composer.curve import curve_figure
        if self.plan is None or not self.top1:
            return None
        return curve_figure(self.plan, self.top1, x, highlight=self.selected, latency=self.latency,
                            reference=self.reference,
                            title=self.top1_source, candidates=self.candidates())

    def candidates(self) -> list:
        """The other builders' points stored in this session's run (elastic, shrink, fold, scale)."""
        from composer.run import read_candidates
        return read_candidates(self.run_dir) if self.run_dir is not None else []

    def select(self, stitch_id: int) -> int:
        with self.lock:
            self._need_plan()
            sid = whole(stitch_id, "a stitch id")
            if not 0 <= sid < len(self.plan.stitches):
                raise AppError(f"stitch {sid} does not exist (0..{len(self.plan.stitches) - 1})")
            self.selected = sid
            self._remember_selection()
            return sid

    def pick_under_budget(self, x: str, budget: float) -> int:
        from composer.curve import best_under, curve_points
        with self.lock:
            self._need_plan()
            if not self.top1:
                raise AppError("no accuracies yet: fit first")
            pts = curve_points(self.plan, self.top1, x, self.latency)
            i = best_under([(p.x, p.top1) for p in pts], number(budget, "the budget"))
            if i is None:
                cheapest = min(p.x for p in pts)
                raise AppError(f"no stitch fits that budget: the cheapest needs {cheapest:.3g}")
            self.selected = pts[i].id
            self._remember_selection()
            return self.selected

    def measure_latency(self, progress: Progress | None = None) -> dict[int, float]:
        """Batch-1 latency of every stitch on this server (composer.pipeline.latency_run: saved in the
        run with the device that ran it)."""
        from composer.pipeline import latency_run
        with self.lock:
            self._no_running_job()
            if self.run_dir is None:
                raise AppError("fit first: latency is measured on the fitted network")
            if self.net is None:
                from composer.run import load_run
                self.net = load_run(self.run_dir).net
            r = latency_run(self.run_dir, net=self.net, progress=_as_fraction(progress, LATENCY_STEPS))
            self.latency = r.ms
            return r.ms

    def stitch_summary(self, sid: int | None) -> dict | None:
        if self.plan is None or sid is None:
            return None
        cost = self.plan.cost(sid)
        return {"id": sid, "route": self.plan.describe_route(sid), "macs": cost.macs, "params": cost.params,
                "activations": cost.activations, "top1": self.top1.get(sid), "r2": self.r2.get(sid),
                "is_anchor": self.plan.stitches[sid].is_anchor}

    # --- the other curve builders: elastic sub-networks, DMS shrinking, folding, scaling --------------

    def _builder_data(self) -> tuple[Path, str, str]:
        """The run and its data as (search/fit split, held-out split)."""
        if self.run_dir is None or self.plan is None:
            raise AppError("fit first (step 3): the other builders work on the anchors and stitches of a fitted run")
        spec = self.resolve_data(self.data or "")
        if spec.startswith("starter"):
            return self.run_dir, "starter:train", "starter:val"
        return self.run_dir, spec, spec

    def builder_source(self, source) -> tuple[int | None, int | None]:
        """What a builder starts from: (anchor index, None) for an anchor index, (None, stitch id) for
        "stitch ID" (an anchor's own stitch id counts as that anchor)."""
        self._need_plan()
        m = re.fullmatch(r"\s*stitch\s*:?\s*(-?\d+)\s*", str(source))
        if m is None:
            if not re.fullmatch(r"\s*-?\d+\s*", str(source)):
                raise AppError(f"start from an anchor index or 'stitch ID', not '{str(source)[:30]}'")
            return _bounded_int(source, "anchor", 0, len(self.plan.anchors) - 1), None
        sid = int(m.group(1))
        if not 0 <= sid < len(self.plan.stitches):
            raise AppError(f"stitch {sid} does not exist (this run has 0..{len(self.plan.stitches) - 1})")
        stitch = self.plan.stitches[sid]
        return (stitch.route[0].anchor, None) if stitch.is_anchor else (None, sid)

    def start_builder(self, kind: str, source, **options):
        """Start an elastic search, a DMS shrink or a fold of one anchor or stitch ("stitch ID") in the
        background; its candidates land in the run (and so on the curve) when it ends. Bad options are
        refused before anything starts, whatever runs."""
        from composer.ui.jobs import BuilderJob
        with self.lock:
            run, train_spec, eval_spec = self._builder_data()
            i, sid = self.builder_source(source)
            limit = self.config.eval_limit
            full = self.plan.cost(sid).macs if sid is not None else self.plan.infos[i].total.macs
            if kind == "shrink":
                pct = _bounded_float(options.get("target_pct"), "target (% of its MACs)", 1, 99)
                steps = _bounded_int(options.get("steps") or 100, "search steps", 5, 5000)
                args = {"data": train_spec, "eval_data": eval_spec, "target_macs": full * pct / 100, "steps": steps,
                        "eval_limit": limit, "latency": True}
            elif kind == "elastic":
                metric = str(options.get("metric") or "macs")
                if metric not in ELASTIC_METRICS:
                    raise AppError(f"budget metric must be one of {', '.join(ELASTIC_METRICS)}, not '{metric[:20]}'")
                budgets = _percentages(options.get("budgets") or "30, 50, 70, 90")
                samples = _bounded_int(options.get("samples") or 24, "sampled sub-networks", 8, 500)
                bn_images = _bounded_int(options.get("bn_images") or 0, "BatchNorm images", 0, 100_000)
                finetune = _bounded_int(options.get("finetune_steps") or 0, "progressive-shrinking steps", 0, 100_000)
                if finetune and sid is not None:
                    raise AppError(f"progressive shrinking works on an anchor, not on a stitch yet: set its steps to 0 "
                                   f"to search stitch {sid} as it is, or choose an anchor")
                args = {"data": train_spec, "eval_data": eval_spec, "budgets": [(metric, p) for p in budgets],
                        "relative": True, "samples": samples, "eval_limit": limit, "bn_images": bn_images,
                        "finetune_steps": finetune}
            elif kind == "fold":   # written to RUN/folded/anchorI or RUN/folded/stitchID
                args = {"data": eval_spec, "limit": limit}
            else:
                raise AppError(f"unknown builder '{kind}' (elastic, shrink or fold)")
            work = _builder_work(kind, run, i, sid, args, self._report)
            self._no_running_job()
            self.builder_result = ""
            self.builder = BuilderJob(kind, work)
            self.builder.start()
            return self.builder

    def _report(self, markdown: str) -> None:
        self.builder_result = markdown

    def cancel_builder(self) -> bool:
        job = self.builder
        if job is None or not job.running:
            return False
        job.cancel.set()
        return True

    def scale(self, anchor, factor, alpha=0.8, fill: bool = False) -> str:
        """dWr-scale an anchor (or fill the biggest MACs gap between anchors); adds a "scale" candidate
        with predicted costs. Returns a Markdown report."""
        from composer.builders import build
        with self.lock:
            run, _, _ = self._builder_data()
            i, sid = (None, None) if fill else self.builder_source(anchor)   # a stitch: refused by the builder
            alpha = _bounded_float(alpha, "alpha", 0, 1)
            s = None if fill or sid is not None else _bounded_float(factor, "scale factor", 0.01, 100)
            r = build("scale", run, anchor=i, stitch=sid, factor=s, alpha=alpha, fill=fill).details
            rows = "\n".join(f"| {w} | {getattr(r.base_cost, w) / 1e6:.3f} | {getattr(r.cost, w) / 1e6:.3f} |"
                              for w in ("macs", "params", "activations"))
            return (f"**{short_name(r.spec)}** x {r.s:.3g} (alpha {r.alpha:g}): `{r.base.describe()}` -> "
                    f"`{r.config.describe()}`\n\n| | anchor (M) | scaled (M, predicted) |\n|---|---:|---:|\n{rows}\n\n"
                    "Predicted costs only (no accuracy): the point is listed, not drawn on the accuracy curve.")

    def candidate_md(self, key: str) -> str:
        """What a clicked candidate point is ("METHOD:NAME"), with where its files are."""
        method, _, name = str(key).partition(":")
        c = next((c for c in self.candidates() if c.method == method and c.name == name), None)
        if c is None:
            raise AppError(f"no candidate '{str(key)[:80]}' in this run")
        top1 = "no accuracy" if c.top1 is None else f"top-1 {c.top1:.2f} % ({c.status})"
        return (f"**{c.method}: {c.name}** · from {short_name(c.source)} · {c.macs / 1e6:.3g} M MACs · "
                f"{c.params / 1e6:.3g} M params · {c.activations / 1e6:.3g} M activations · {top1}")

    def latency_fit_md(self) -> str:
        """How well MACs and activations each predict the measured latency of this run's points."""
        from composer.builders.scaling import latency_fit, latency_points
        with self.lock:
            if not self.latency:
                raise AppError("measure latency first (the button above the curve)")
            fit = latency_fit(latency_points(self.plan, self.latency, self.candidates()))
            return (f"R^2 of a straight line through {fit.n} measured points (batch-1 latency here): "
                    f"MACs **{fit.r2_macs:.3f}**, activations **{fit.r2_activations:.3f}**: {fit.better} predict "
                    "latency better on this device.")

    # --- export ----------------------------------------------------------------------------------

    def export(self, what: str, stitch_id: int | None = None, candidate: str | None = None) -> Path:
        """Export the selected stitch ("stitch"), the whole SN-Net ("snnet") or an elastic / shrink
        candidate of the run ("candidate": "METHOD:NAME", as its point's customdata) and zip it."""
        with self.lock:
            if self.run_dir is None:
                earlier = " or reopen an earlier run (section 3)" if self.runs() else ""
                raise AppError(f"fit (and ideally fine-tune) first{earlier}: this plan has no fitted run to export yet")
            if self.job is not None and self.job.running:
                raise AppError("a fine-tune is running: wait for it or cancel it, then export its checkpoint")
            from composer.pipeline import export_run
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out_base = self.config.exports_dir / self.key
            if what == "stitch":
                if stitch_id is None and self.selected is None:
                    raise AppError("pick a stitch first: click a point on the curve (or use the budget slider), "
                                   "then export it; 'Export whole SN-Net' needs no pick")
                sid = self.select(self.selected if stitch_id is None else stitch_id)
                name = f"stitch-{sid}-{stamp}"
                export_run(self.run_dir, out_base / name, stitch=sid)
            elif what == "snnet":
                name = f"snnet-{stamp}"
                export_run(self.run_dir, out_base / name, whole=True)
            elif what == "candidate":
                from composer.run import find_candidate
                ref = str(candidate or "").strip()
                if not ref:
                    raise AppError("click an elastic or shrink point on the curve first: it names the candidate to export")
                c = find_candidate(self.run_dir, ref)
                name = f"{c.method}-{re.sub(r'[^A-Za-z0-9._-]+', '-', c.name).strip('-')[:60]}-{stamp}"
                export_run(self.run_dir, out_base / name, candidate=f"{c.method}:{c.name}")
            else:
                raise AppError(f"export 'stitch', 'snnet' or 'candidate', not '{str(what)[:20]}'")
            zip_path = Path(shutil.make_archive(str(out_base / name), "zip", root_dir=out_base, base_dir=name))
            shutil.rmtree(out_base / name, ignore_errors=True)
            self.exports.add(zip_path.resolve())
            return zip_path


ELASTIC_METRICS = ("macs", "activations", "latency")


def _builder_work(kind: str, run: Path, i: int | None, sid: int | None, options: dict, report):
    """The background job of builder `kind` (composer.builders.build) on anchor `i` or stitch `sid`:
    its Markdown report goes to `report`, its one-line summary is the job's message."""
    def work(events, cancel) -> str:
        from composer.builders import build
        result = build(kind, run, anchor=i, stitch=sid, events=events, cancel=cancel, **options)
        markdown = REPORTS[kind](result.details, options)
        if markdown:
            report(markdown)
        return result.summary
    return work


def _shrink_md(r, options: dict) -> str:
    stages = "\n".join(f"| {s['stage']} | {s['blocks']}/{s['of_blocks']} | {100 * s['width_keep']:.0f} % |"
                        for s in r.stages)
    return (f"**{r.candidate.name}**: {r.full_macs / 1e6:.2f} M -> {r.counted_macs / 1e6:.2f} M MACs counted "
            f"(target {r.target / 1e6:.2f} M), top-1 {r.top1_before:.2f} % -> {r.top1_after:.2f} % on {r.eval_images} "
            f"images (no fine-tune), batch-1 latency here {r.candidate.latency_ms:.3f} ms\n\n"
            f"| stage | blocks | widths kept |\n|---|---|---|\n{stages}")


def _elastic_md(r, options: dict) -> str:
    """Budgets are percentages of the source's own MACs, activations or latency (one metric)."""
    if r.cancelled:   # during progressive shrinking: the job's message says so, nothing was searched
        return ""
    metric = options["budgets"][0][0]
    rho = r.rank_correlation
    unit = "ms" if metric == "latency" else "M"
    scale = 1 if metric == "latency" else 1e6
    rows = "\n".join(f"| {c.name} | {c.config['budget']['value'] / scale:.3g} {unit} | {c.macs / 1e6:.2f} | "
                      f"{c.activations / 1e6:.3f} | {c.top1:.2f} | {c.config['predicted_top1']:.2f} |"
                      for c in r.candidates)
    ps_note = (f"progressive shrinking: {r.progressive['steps']} steps first; " if r.progressive else
               "progressive-shrinking weights of an earlier run; " if r.finetuned else "")
    bn_note = ps_note + (f"BatchNorm statistics re-estimated on {r.bn_images} images per sub-network"
                         if r.bn_images else "BatchNorm statistics: the anchor's" if r.has_bn else "no BatchNorm layers")
    return (f"predictor fitted on {len(r.samples)} measured sub-networks; rank correlation (Spearman, held out) "
            f"**{'n/a' if rho is None else f'{rho:.3f}'}**; {bn_note}\n\n| sub-network | budget ({metric}) | "
            f"MACs (M) | activations (M) | top-1 | predicted |\n|---|---:|---:|---:|---:|---:|\n{rows}")


def _fold_md(r, options: dict) -> str:
    from composer.builders.fold import format_certificate
    return f"**{r.candidate.name}**: top-1 {r.candidate.top1:.2f} %\n\n```\n{format_certificate(r.certificate)}\n```"


REPORTS = {"elastic": _elastic_md, "shrink": _shrink_md, "fold": _fold_md}   # builder -> its Markdown report


def _not_downloaded(spec: str) -> str:
    """What to do when a data set named by scheme (torch/..., hfds/...) is not on this machine."""
    root = os.environ.get("ZOO_COMPOSER_DATA", str(Path.home() / ".cache" / "zoo-composer" / "data"))
    example = (f" (for torch/cifar10: python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', "
               "download=True)\")" if spec.lower() == "torch/cifar10" else "")
    return (f"data set '{spec[:60]}' is not downloaded in {root}, and the app never downloads: download it there "
            f"once{example}, or choose 'starter' or an ImageFolder under a data root")


def _bounded_float(v, what: str, lo: float, hi: float) -> float:
    return number(v, what, lo, hi)   # composer.checks: finite, in [lo, hi]


def _percentages(text: str) -> list[float]:
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts or len(parts) > 12:
        raise AppError("give 1 to 12 budgets as percentages of the anchor's cost, e.g. 30, 50, 70")
    return [_bounded_float(p.rstrip("%"), "a budget (% of the anchor's cost)", 1, 100) for p in parts]


def _pair(v) -> tuple[int, int]:
    try:
        a, u = v
        return int(a), int(u)
    except (TypeError, ValueError):
        raise AppError(f"a block is [anchor, block], got {str(v)[:40]}") from None


def _point(front, back) -> tuple[int, int, int, int]:
    return (*_pair(front), *_pair(back))


def _routes_json(routes: list[tuple[Segment, ...]]) -> list[list[list[int]]]:
    """Routes as composer.routes.routes_plan takes them: [[anchor, first block, last block], ...] each."""
    return [[[g.anchor, g.first, g.last] for g in r] for r in routes]


def _links(route: tuple[Segment, ...]) -> list[tuple[int, int, int, int]]:
    """(front anchor, front block, back anchor, back block) of each link of a route, in order."""
    return [(a.anchor, a.last, b.anchor, b.first) for a, b in zip(route, route[1:])]


def _with_link(route: tuple[Segment, ...], old: tuple[int, int, int, int],
               new: tuple[int, int, int, int]) -> tuple[Segment, ...]:
    """`route` with its link `old` moved to `new` (same anchors): the segments on each side end or
    start at the new blocks."""
    segs = list(route)
    for i, link in enumerate(_links(route)):
        if link == old:
            segs[i] = Segment(segs[i].anchor, segs[i].first, new[1])
            segs[i + 1] = Segment(segs[i + 1].anchor, new[3], segs[i + 1].last)
    return tuple(segs)


def _point4(v) -> tuple[int, int, int, int]:
    try:
        f, j, b, k = (int(x) for x in v)
        return f, j, b, k
    except (TypeError, ValueError):
        raise AppError(f"a stitch is [front anchor, front block, back anchor, back block], got {str(v)[:60]}") from None


def _bounded_int(v, what: str, lo: int, hi: int) -> int:
    return whole(v, what, lo, hi)    # composer.checks: a whole number in [lo, hi]


class SessionStore:
    """Sessions by key. Keys are made here (random, unguessable) and name the run folders."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self) -> Session:
        with self._lock:
            self._evict()
            key = secrets.token_urlsafe(18)
            s = self._sessions[key] = Session(key, self.config)
            return s

    def get(self, key: str | None) -> Session:
        if not key or not SESSION_KEY.match(str(key)):
            raise AppError("no session: reload the page (API: call /new_session first)")
        with self._lock:
            s = self._sessions.get(key)
        if s is None:
            raise AppError("this session has expired (the server restarted?): reload the page")
        s.touched = time.time()
        return s

    def find(self, key: str | None) -> Session | None:
        try:
            return self.get(key)
        except AppError:
            return None

    def _evict(self) -> None:
        """Forget the least recently used idle sessions beyond the limit (their runs stay on disk)."""
        idle = sorted((s for s in self._sessions.values() if not (s.job and s.job.running)), key=lambda s: s.touched)
        while len(self._sessions) >= self.config.max_sessions and idle:
            del self._sessions[idle.pop(0).key]

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

