"""A run folder: everything one SN-Net needs, readable without this app's state.

This module is the one owner of the folder's layout: every file name, and every reader and writer
of the files below, lives here.

RUN/
  manifest.json              anchors (specs), preprocessing, data and fit report, versions, training
  plan.json                  the stitch plan (same shape as `plan --json`)
  stitch_layers.safetensors  the fitted stitching layers, and each stitch's BatchNorm statistics
                             (`route_stats.*`, see composer.snnet)
  checkpoint/                written by training (see composer.train): all weights + trainer state
  evaluation.json            top-1 (and costs) of every stitch: `evaluate`, or the end of training
  metrics.jsonl              training's log: loss lines and its periodic evaluations
  latency.json               batch-1 latency per stitch, with the device that was timed
  candidates.json            the other builders' points (composer.candidates.Candidate)
  elastic/ shrink/ folded/   the builders' networks (progressive-shrinking weights, shrunk, folded)
Every file is written atomically, so a crash leaves the previous version loadable.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from composer.candidates import Candidate, CandidateError
from composer.costs import describe
from composer.data import check_same_preprocessing
from composer.errors import UserError
from composer.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from composer.plan import StitchPlan, build_plan, load_plan
from composer.snnet import StitchedNetwork
from zoo.adapters import adapt
from zoo.sources import create_anchor

MANIFEST, PLAN, LAYERS, CHECKPOINT = "manifest.json", "plan.json", "stitch_layers.safetensors", "checkpoint"
TRAINED = "snnet.safetensors"   # inside checkpoint/: every weight of the SN-Net after training
EVALUATION, METRICS, LATENCY, CANDIDATES = "evaluation.json", "metrics.jsonl", "latency.json", "candidates.json"
ELASTIC, SHRINK, FOLDED = "elastic", "shrink", "folded"   # the builders' sub-folders


class RunError(UserError):
    """A run folder that cannot be written or read; the message says why."""


def load_anchors(specs: list[str], pretrained: bool | None = None, device: str | None = None,
                 resolution: int | str | None = None):
    """Models and their measured infos, in the order given (device="meta": architecture only).

    resolution, for a family whose members were trained at different sizes (EfficientNet-B0/B1):
    N runs every anchor at N x N pixels (see set_resolution); "native" runs each at its own size
    (see set_native). None: the anchors must agree on their input size."""
    if not specs:
        raise RunError("give at least one anchor")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise RunError(f"the same anchor is given twice: {', '.join(twice)}")
    models = [create_anchor(s, pretrained, device) for s in specs]
    if resolution == NATIVE:
        set_native(models)
    elif resolution is not None:
        set_resolution(models, specs, resolution)
    check_same_preprocessing(models, specs, same_size=resolution != NATIVE)
    infos = [describe(s, adapt(m)) for s, m in zip(specs, models)]
    return models, infos


RESOLUTION_RANGE = (8, 4096)
NATIVE = "native"   # --resolution native: every anchor at its own input size


def check_resolution(value, what: str = "resolution") -> int | str:
    """--resolution as typed: "native", or a whole number of pixels in RESOLUTION_RANGE."""
    from composer import checks
    if isinstance(value, str) and value.strip().lower() == NATIVE:
        return NATIVE
    try:
        return checks.whole(value, what or "resolution", *RESOLUTION_RANGE)
    except UserError:
        raise RunError(f"{what or 'resolution'} must be 'native' (each anchor at its own size) or a whole number "
                       f"of pixels from {RESOLUTION_RANGE[0]} to {RESOLUTION_RANGE[1]}, not '{str(value)[:30]}'") from None


def set_native(models: list) -> None:
    """Each anchor at its own input size (SN-Net across members trained at different sizes, e.g.
    EfficientNet-B0..B7): images are read once at the largest anchor's size and preprocessing, a route
    resizes them to its first anchor's size and its stitching layers resample the features onto the
    next anchor's grid (composer.snnet). Every anchor takes the largest one's normalisation and
    resizing (mean, std, interpolation, crop mode), so that one image feeds them all; each keeps its
    input size and crop fraction, which an exported route states as its own preprocessing."""
    cfgs = [dict(getattr(m, "pretrained_cfg", None) or {}) for m in models]
    sizes = [tuple(c.get("input_size") or (3, 224, 224)) for c in cfgs]
    largest = cfgs[max(range(len(cfgs)), key=lambda i: sizes[i][1] * sizes[i][2])]
    shared = {k: largest[k] for k in ("mean", "std", "interpolation", "crop_mode") if k in largest}
    for model, cfg in zip(models, cfgs):
        model.pretrained_cfg = {**cfg, **shared}


SHARED_PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def set_resolution(models: list, specs: list[str], resolution: int) -> list[str]:
    """One preprocessing for anchors trained at different sizes: every model's timm config gets
    input_size (C, N, N) and the first anchor's normalisation and resizing (mean, std, interpolation,
    crop), so their data config, their costs (describe) and an export's preprocessing all say N, and
    stitched anchors see the same images. Returns the specs whose normalisation changed (their
    accuracy may drop a little: fit and evaluate measure it). A model with a fixed input size (a ViT's
    patch grid) at another size is refused in one line."""
    from composer import checks
    n = checks.whole(resolution, "resolution", *RESOLUTION_RANGE)
    first = dict(getattr(models[0], "pretrained_cfg", None) or {})
    changed = []
    for spec, model in zip(specs, models):
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        size = tuple(cfg.get("input_size") or (3, 224, 224))
        if size[1:] != (n, n) and cfg.get("fixed_input_size"):
            raise RunError(f"{spec} has a fixed input size {size[1]}x{size[2]} (a ViT's patch grid): it cannot run "
                           f"at resolution {n}; leave it out or drop --resolution")
        shared = {k: first[k] for k in SHARED_PREPROCESSING if k in first}
        if any(tuple(_as_tuple(cfg.get(k))) != tuple(_as_tuple(shared.get(k))) for k in ("mean", "std")):
            changed.append(spec)
        model.pretrained_cfg = {**cfg, **shared, "input_size": (size[0], n, n)}
    return changed


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def build_network(specs: list[str], pretrained: bool | None = None, resolution: int | None = None,
                  stitch_rank: int | None = None, **plan_options) -> StitchedNetwork:
    """Anchors -> plan -> (unfitted) stitched network, anchors ordered by MACs (all run at
    `resolution` when given: see load_anchors; low-rank stitching layers with `stitch_rank`)."""
    models, infos = load_anchors(specs, pretrained, resolution=resolution)
    routes = plan_options.pop("routes", None)   # two-way routes chosen by hand (the app's graph)
    if routes is not None:
        from composer.routes import routes_plan
        plan = routes_plan(infos, routes)
    else:
        plan = build_plan(infos, **plan_options)
    by_name = {s: m for s, m in zip(specs, models)}
    return StitchedNetwork([by_name[n] for n in plan.anchors], plan, stitch_rank=stitch_rank)


def check_writable(run_dir: Path) -> Path:
    run_dir = Path(run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise RunError(f"run folder {run_dir} is not writable")
    return run_dir


def save_fitted(run_dir: Path, net: StitchedNetwork, manifest: dict) -> None:
    run_dir = check_writable(run_dir)
    import timm
    manifest = {**manifest, "anchors": net.plan.anchors,
                # how the stitching layers are built: every later load (train, export) rebuilds them so
                **({"stitch_rank": net.stitch_rank} if net.stitch_rank is not None else {}),
                "versions": {"torch": torch.__version__, "timm": timm.__version__},
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    net.plan.save(run_dir / PLAN)
    # what fitting sets: the stitching layers and each stitch's BatchNorm statistics
    save_safetensors_atomic(run_dir / LAYERS, {**net.stitch_layers.state_dict(),
                                               **{f"route_stats.{k}": v for k, v in net.route_stats.state_dict().items()}})
    write_manifest(run_dir, manifest)


@dataclass
class Run:
    dir: Path
    net: StitchedNetwork
    manifest: dict

    @property
    def plan(self) -> StitchPlan:
        return self.net.plan


def average_toward(fitted: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                   alpha: float) -> dict[str, torch.Tensor]:
    """Weight averaging toward the fitted weights (WiSE-FT, Wortsman et al. 2022): every floating
    tensor of `trained` that `fitted` has, moved back to fitted + alpha x (trained - fitted)."""
    return {k: (fitted[k] + alpha * (v - fitted[k]) if v.is_floating_point() and k in fitted else v)
            for k, v in trained.items()}


def trained_average(manifest: dict) -> float:
    """The weight of the fine-tune in the run's weights (`TrainConfig.average`; 1: as trained)."""
    value = ((manifest.get("train") or {}).get("config") or {}).get("average")
    return 1.0 if value is None else float(value)


def load_run(run_dir: Path, trained: bool = True, average: bool = True) -> Run:
    """Rebuild the SN-Net of a run: anchors from their specs, the saved plan and weights.
    With trained=True the latest training checkpoint (if any) replaces the fitted weights, averaged
    toward them as the fine-tune asked (`TrainConfig.average`); average=False: the checkpoint's weights
    as the optimizer left them (what a resumed fine-tune continues from)."""
    run_dir = Path(run_dir).expanduser()
    manifest = read_manifest(run_dir)
    try:
        plan_data = json.loads((run_dir / PLAN).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{run_dir}: unreadable run files ({e})") from None
    models, infos = load_anchors(manifest["anchors"], manifest.get("pretrained"), resolution=manifest.get("resolution"))
    net = StitchedNetwork(models, load_plan(plan_data, infos), stitch_rank=_stitch_rank(manifest, run_dir))
    try:
        layers = load_file(run_dir / LAYERS)
        stats = {k.removeprefix("route_stats."): v for k, v in layers.items() if k.startswith("route_stats.")}
        net.stitch_layers.load_state_dict({k: v for k, v in layers.items() if not k.startswith("route_stats.")})
        if stats:     # runs fitted before route statistics existed keep their anchors' statistics
            # (and runs fitted before private affine parameters keep their anchors' scale and shift)
            missing = net.route_stats.load_state_dict(stats, strict=False).missing_keys
            if any(not k.split(".")[-1].startswith(("weight", "bias")) for k in missing):
                raise RuntimeError(f"missing BatchNorm statistics {missing[:3]}")
        trained_file = run_dir / CHECKPOINT / TRAINED
        if trained and trained_file.is_file():
            weights, alpha = load_file(trained_file), trained_average(manifest)
            if average and alpha != 1.0:
                weights = average_toward(net.state_dict(), weights, alpha)
            net.load_state_dict(weights)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"{run_dir}: weights could not be loaded ({str(e).splitlines()[0]})") from None
    return Run(run_dir, net, manifest)


def _stitch_rank(manifest: dict, run_dir: Path) -> int | None:
    rank = manifest.get("stitch_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RunError(f"{run_dir / MANIFEST}: stitch_rank must be a whole number >= 1, got {rank!r}")
    return rank


def read_manifest(run_dir: Path) -> dict:
    """RUN/manifest.json, refused in one line when it is missing or not a run's manifest."""
    f = Path(run_dir).expanduser() / MANIFEST
    if not f.is_file():
        raise RunError(f"{run_dir} is not a run folder (no {MANIFEST}); create one with `fit`")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{f}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("anchors"), list) or not manifest["anchors"]:
        raise RunError(f"{f}: not a run manifest (it must hold the list of anchors)")
    return manifest


def write_manifest(run_dir: Path, manifest: dict) -> None:
    write_json_atomic(Path(run_dir) / MANIFEST, manifest)


def load_plan_of_run(run_dir: Path) -> StitchPlan:
    """The run's plan with costs, measured on the meta device (no weights are loaded)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    try:
        plan_data = json.loads((run_dir / PLAN).read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a run folder (no {PLAN}); create one with `fit`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{run_dir}: unreadable run files ({e})") from None
    _, infos = load_anchors(manifest["anchors"], pretrained=False, device="meta", resolution=manifest.get("resolution"))
    return load_plan(plan_data, infos)


# --- evaluation and training metrics ----------------------------------------------------------------

def stitch_rows(plan: StitchPlan, extra: dict[int, dict] | None = None) -> list[dict]:
    """One row per stitch: id, route, costs, and whatever `extra` holds for it (top1, latency_ms...)."""
    return [{"id": s.id, "route": s.to_json()["route"], **plan.cost(s).to_dict(), **(extra or {}).get(s.id, {})}
            for s in plan.stitches]


def write_evaluation(run_dir, plan: StitchPlan, top1: dict[int, float], data: str, images: int,
                     step: int | None = None, extra: dict[int, dict] | None = None) -> dict:
    """RUN/evaluation.json (what the curve and export read): every stitch's costs and top-1 on
    `images` images of `data`, after `step` fine-tuning steps when known. Returns what it wrote."""
    rows = {sid: {"top1": top1.get(sid), **(extra or {}).get(sid, {})} for sid in range(len(plan.stitches))}
    record = {"data": data, "images": images, **({"step": step} if step is not None else {}),
              "stitches": stitch_rows(plan, rows)}
    write_json_atomic(Path(run_dir) / EVALUATION, record)
    return record


def read_evaluation(run_dir: Path) -> dict:
    """RUN/evaluation.json as written, or {} when there is none."""
    f = Path(run_dir) / EVALUATION
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("stitches", []), list):
            raise ValueError("not an evaluation record")
        return data
    except (OSError, ValueError) as e:
        raise RunError(f"{f} is unreadable ({e})") from None


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl (a line cut short by a kill is skipped)."""
    f = Path(run_dir) / METRICS
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop records after the checkpoint we resume from (a killed run logged steps it lost)."""
    if (Path(run_dir) / METRICS).is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_text_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in keep))


def data_name(spec: str) -> str:
    """How a data spec is shown: a folder by its last two parts (never a whole cache path)."""
    spec = str(spec)
    if spec.startswith("/") or spec.startswith("~"):
        parts = Path(spec).parts
        return "/".join(parts[-2:]) if len(parts) > 2 else spec
    return spec


def _measurements(run_dir: Path) -> list[tuple[int, int, dict[int, float], str]]:
    """(step, images, top1, phrase) of every measurement the run holds."""
    run_dir = Path(run_dir)
    found = []   # (step, images, top1, phrase)
    evaluation = read_evaluation(run_dir)
    if evaluation:
        try:
            top1 = {int(s["id"]): float(s["top1"]) for s in evaluation["stitches"] if s.get("top1") is not None}
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{run_dir / EVALUATION} is unreadable ({e})") from None
        if top1:
            step = int(evaluation.get("step") or 0)
            found.append((step, int(evaluation.get("images") or 0), top1,
                          f"evaluation on {evaluation.get('images', '?')} images of "
                          f"{data_name(evaluation.get('data', '?'))}" + (f" after {step} steps" if step else "")))
    for r in read_metrics(run_dir):
        if isinstance(r, dict) and r.get("top1"):
            step = int(r.get("step") or 0)
            found.append((step, int(r.get("images") or 0), {int(k): float(v) for k, v in r["top1"].items()},
                          f"training eval at step {step}"))
    if not found:
        raise RunError(f"{run_dir} has no accuracies yet: run `python -m composer evaluate {run_dir} "
                       "--data ...` or fine-tune it")
    return found


def read_top1(run_dir: Path) -> tuple[dict[int, float], str]:
    """Top-1 per stitch id from the run's measurements, and a phrase saying where it came from.

    Picked by what was measured, not by file times: the measurement at the latest training step
    wins, and at the same step a full evaluation (RUN/evaluation.json) beats training's small
    periodic ones (RUN/metrics.jsonl) by having more images."""
    step, images, top1, phrase = max(_measurements(run_dir), key=lambda f: (f[0], f[1]))
    return top1, phrase


def read_original_top1(run_dir: Path) -> dict[int, float] | None:
    """The top-1 before any fine-tune (step 0) on the same images as `read_top1`'s measurement,
    when that one is of fine-tuned weights: the original anchors, whose line judges the stitches."""
    found = _measurements(run_dir)
    step, images, _, _ = max(found, key=lambda f: (f[0], f[1]))
    before = [f for f in found if f[0] == 0 and f[1] == images]
    return before[0][2] if step > 0 and before else None


# --- latency --------------------------------------------------------------------------------------

def save_latency(run_dir: Path, ms: dict[int, float], device: str) -> None:
    """RUN/latency.json: batch-1 latency per stitch and the device that was timed."""
    write_json_atomic(Path(run_dir) / LATENCY, {"device": device, "threads": torch.get_num_threads(),
                                                "batch": 1, "ms": {str(k): v for k, v in ms.items()}})


def read_latency(run_dir: Path) -> dict[int, float] | None:
    """Latency (ms) per stitch: RUN/latency.json (the app's measurement) or the latency_ms column
    that `evaluate --latency` adds to RUN/evaluation.json; None when neither has it."""
    f = Path(run_dir) / LATENCY
    try:
        if f.is_file():
            return {int(k): float(v) for k, v in json.loads(f.read_text())["ms"].items()}
        f = Path(run_dir) / EVALUATION
        rows = read_evaluation(run_dir).get("stitches", [])
        found = {int(r["id"]): float(r["latency_ms"]) for r in rows if r.get("latency_ms") is not None}
        return found or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunError(f"{f} is unreadable ({e})") from None


# --- candidates -----------------------------------------------------------------------------------

def read_candidates(run_dir) -> list[Candidate]:
    """The run's stored candidates ([] when there are none)."""
    f = Path(run_dir) / CANDIDATES
    if not f.is_file():
        return []
    try:
        return [Candidate(**c) for c in json.loads(f.read_text())["candidates"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CandidateError(f"{f} is unreadable ({e})") from None


def find_candidate(run_dir, ref: str) -> Candidate:
    """The stored candidate `ref` names: "METHOD:NAME" (its key on the curve and in the curve's
    JSON) or a bare NAME that only one method uses."""
    stored = read_candidates(run_dir)
    method, _, name = ref.partition(":")
    found = [c for c in stored if (c.method, c.name) == (method, name)] or [c for c in stored if c.name == ref]
    if len(found) == 1:
        return found[0]
    keys = [f"{c.method}:{c.name}" for c in (found or stored)]
    listed = ", ".join(f"'{k}'" for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    if found:
        raise CandidateError(f"'{ref}' names {len(found)} candidates in {run_dir}: say which as METHOD:NAME ({listed})")
    raise CandidateError(f"no candidate '{ref}' in {run_dir} ({listed or 'it has none yet'})")


def add_candidates(run_dir, new: list[Candidate]) -> list[Candidate]:
    """Store `new` in the run, replacing stored ones with the same (method, name); returns all."""
    stored = {c.key: c for c in read_candidates(run_dir)}
    for c in new:
        stored[c.key] = c
    out = list(stored.values())
    write_json_atomic(Path(run_dir) / CANDIDATES, {"candidates": [c.to_dict() for c in out]})
    return out


def remove_candidates(run_dir, method: str) -> None:
    """Forget every stored candidate of one method."""
    keep = [c for c in read_candidates(run_dir) if c.method != method]
    write_json_atomic(Path(run_dir) / CANDIDATES, {"candidates": [c.to_dict() for c in keep]})


# --- the lock ------------------------------------------------------------------------------------

LOCK = ".lock"


class run_lock:
    """Held by the one process that changes a run (training, re-fitting): a second one is refused
    at once instead of silently losing one's work. An OS lock (flock), so a killed process never
    leaves it stale."""

    def __init__(self, run_dir: Path, what: str = "training"):
        self.file, self.what, self.handle = Path(run_dir) / LOCK, what, None

    def __enter__(self) -> "run_lock":
        import fcntl
        self.handle = open(self.file, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunError(f"{self.file.parent} is in use ({holder}): wait for it to finish or stop it first") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{self.what} by process {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> bool:
        import fcntl
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        return False
