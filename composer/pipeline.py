"""The one place each flow happens, for both fronts: fit a run, evaluate it, fine-tune it, time it,
export from it, and (re-exported from composer.builders) build the other curves' candidates.

Each flow is a function of plain arguments that returns a small result object. The CLI
(composer.cli) and the app (composer.ui.session) only turn their input into these arguments and
the results into text, tables and widgets, so a flow is changed, and an option added, once.

Progress: every flow takes `progress(event: dict)`, called with
    {"type": "progress", "phase": str, "done": int, "total": int, "unit": str}
(phases: "anchors", "fit", "route_stats", "evaluate", "latency"; done/total count `unit`s, images or
stitches). The CLI draws each phase as a tqdm bar, the app as gr.Progress fractions. Training
keeps its own richer events (composer.train: start / step / eval / checkpoint).

Bad input raises composer.errors.UserError (one `error:` line in the CLI, one message in the app).
"""
from __future__ import annotations

import os
import threading
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from composer import checks
from composer.errors import UserError
from composer.run import data_name

Progress = Callable[[dict], None]


def _quiet(event: dict) -> None:
    pass


def _report(progress: Progress, phase: str, done: int, total: int, unit: str, **extra) -> None:
    progress({"type": "progress", "phase": phase, "done": done, "total": total, "unit": unit, **extra})


def resolve_anchors(specs: list[str]) -> list[str]:
    """Anchor specs as given; `starter` alone stands for the built-in starter family's anchors
    (trained on first use)."""
    specs = list(specs)
    if specs == ["starter"]:
        from zoo.starter import ensure_starter
        return ensure_starter().anchors
    return specs


def device_name(device: torch.device | str) -> str:
    """How a device that ran something is recorded: "cpu", or "cuda:0 (NVIDIA H200)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# --- fit ---------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    run: Path                    # the run folder written
    net: object                  # the fitted composer.snnet.StitchedNetwork (CPU), as saved
    r2: dict[int, float]         # per stitch id, on held-out calibration images
    images: int                  # calibration images used (fit + held out)
    held_out: int
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def plan(self):
        return self.net.plan


# Decoded calibration batches are kept for the second pass (per-stitch BatchNorm statistics) up to
# this many bytes; a bigger calibration set is decoded again instead. An image costs
# 3 x H x W x 4 bytes as float32: 0.6 MB at 224 px, so 256 images hold ~150 MB, 1024 ~600 MB.
KEEP_DECODED_BYTES = 2 << 30


class _DecodedOnce:
    """The calibration images of a loader, decoded once: the first pass reads the loader and keeps
    the batches (while they fit in KEEP_DECODED_BYTES), the second pass reads what was kept."""

    def __init__(self, make_loader: Callable[[], object], keep: bool):
        self.make_loader, self.kept, self.size = make_loader, ([] if keep else None), 0

    def first(self):
        for x, _ in self.make_loader():
            if self.kept is not None:
                self.size += x.numel() * x.element_size()
                if self.size <= KEEP_DECODED_BYTES:
                    self.kept.append(x)
                else:
                    self.kept = None   # too many to keep: the second pass decodes them again
            yield x

    def again(self):
        if self.kept is not None:
            return iter(self.kept)
        return (x for x, _ in self.make_loader())


def fit_run(anchors: list[str], data: str, out: Path, *, calib: int = 256, ridge: float = 1e-4,
            plan_options: dict | None = None, pretrained: bool | None = None, batch_size: int = 64,
            workers: int = 0, seed: int = 0, manifest_extra: dict | None = None, force: bool = False,
            progress: Progress | None = None) -> FitResult:
    """Anchors -> plan -> SN-Net, every stitching layer fitted by least squares on `calib` images of
    `data` (a seeded subset), each stitch's BatchNorm statistics re-estimated on the same images;
    written to the run folder `out` (manifest, plan, weights). `anchors` may be ["starter"].

    The run folder is written whole or not at all (staged beside it, then moved in place): a failed
    fit leaves nothing, or the earlier run as it was. `out` may be new, empty or an earlier untrained
    run (replaced whole: no old checkpoint or evaluation survives); anything else, a trained run
    included, only with `force`."""
    from composer import data as data_mod
    from composer.fit import calibrate_route_stats, fit_stitches
    from composer.io import staged_folder
    from composer.run import build_network, run_lock, save_fitted
    progress = progress or _quiet
    calib = checks.whole(calib, "calibration images", 1)
    ridge = checks.number(ridge, "ridge", 0)
    batch_size = checks.whole(batch_size, "batch size", 1)
    workers = checks.whole(workers, "workers", 0)
    seed = checks.whole(seed, "seed")
    out = check_run_output(out, force)
    _report(progress, "anchors", 0, 1, "anchors")
    net = build_network(resolve_anchors(anchors), pretrained, **(plan_options or {}))
    _report(progress, "anchors", 1, 1, "anchors")
    cfg = data_mod.data_config(net.anchors[0])
    ds = data_mod.subset(data_mod.open_dataset(data, cfg), calib, seed=seed)
    # BatchNorm statistics per stitch only for routes with BatchNorms behind their stitch point
    needs_stats = any(net.route_bn_names(s) for s in net.plan.stitches)
    images = _DecodedOnce(lambda: data_mod.loader(ds, batch_size, workers=workers), keep=needs_stats)
    report = fit_stitches(net, images.first(), ridge=ridge,
                          progress=lambda n: _report(progress, "fit", n, len(ds), "images"))
    if needs_stats:
        calibrate_route_stats(net, images.again(),
                              progress=lambda n: _report(progress, "route_stats", n, len(ds), "images"))
    images.kept = None
    manifest = {"pretrained": pretrained,
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                "fit": {"data": data, "calib": report.images, "held_out": report.held_out, "ridge": ridge,
                        "r2": {str(k): v for k, v in report.r2.items()}},
                **(manifest_extra or {})}
    with ExitStack() as stack:
        if out.is_dir():
            stack.enter_context(run_lock(out, "fitting"))   # never under a process training it
        tmp = stack.enter_context(staged_folder(out, {"kind": "run", "of": "fit"}))
        save_fitted(tmp, net, manifest)
    return FitResult(out, net, dict(report.r2), report.images, report.held_out, manifest)


def check_run_output(out: Path, force: bool = False) -> Path:
    """Where `fit` may write a run (see fit_run), refused in one line otherwise."""
    from composer.io import check_output_folder
    from composer.run import CHECKPOINT, MANIFEST
    out = Path(out).expanduser()
    if out.is_dir() and (out / MANIFEST).is_file() and not force:
        if (out / CHECKPOINT).is_dir():
            raise UserError(f"{out} holds a fine-tuned run: fitting again would discard its training; "
                            "choose another --out (or pass --force to replace it)")
        return out   # an earlier fit, replaced whole
    return check_output_folder(out, "run", "fit", force)


# --- evaluate ----------------------------------------------------------------------------------------

@dataclass
class EvalReport:
    run: Path
    plan: object                 # the run's composer.plan.StitchPlan
    top1: dict[int, float]       # stitch id -> top-1 (%)
    images: int
    data: str                    # the data spec as given (see `name` for how to show it)
    step: int | None             # training steps of the weights evaluated (None: not fine-tuned)
    rows: list[dict]             # RUN/evaluation.json's stitches: costs, top1 (and latency_ms)
    latency: dict[int, float] | None = None    # batch-1 ms per stitch, with latency=True
    device: str | None = None    # where the latency was timed

    @property
    def name(self) -> str:
        return data_name(self.data)


def evaluate_run(run_dir: Path, data: str, *, limit: int | None = None, latency: bool = False,
                 batch_size: int = 64, workers: int = 0, seed: int = 0, split: str = "validation",
                 net=None, progress: Progress | None = None) -> EvalReport:
    """Top-1 of every stitch of the run (shared prefixes) on `data` (a seeded subset of `limit`
    images), with latency=True also each stitch's batch-1 latency on a real image; written to
    RUN/evaluation.json with the training step of the weights, so composer.run.read_top1 ranks it.
    `net`: the run's network when it is already in memory (as composer.run.load_run gives it)."""
    from composer import data as data_mod
    from composer.costs import measure_latency
    from composer.evaluate import evaluate_all
    from composer.run import load_run, read_manifest, write_evaluation
    from composer.train import checkpoint_step
    progress = progress or _quiet
    limit = None if limit is None else checks.whole(limit, "evaluation images", 1)
    batch_size = checks.whole(batch_size, "batch size", 1)
    workers = checks.whole(workers, "workers", 0)
    seed = checks.whole(seed, "seed")
    run_dir = Path(run_dir).expanduser()
    if net is None:
        net = load_run(run_dir).net
    else:
        read_manifest(run_dir)   # still a run folder
    step = checkpoint_step(run_dir)
    cfg = data_mod.data_config(net.anchors[0])
    ds = data_mod.subset(data_mod.open_dataset(data, cfg, split=split), limit, seed=seed)
    stitches = len(net.plan.stitches)
    res = evaluate_all(net, data_mod.loader(ds, batch_size, workers=workers),
                       progress=lambda n: _report(progress, "evaluate", n, len(ds), "images", stitches=stitches))
    extra = {k: {} for k in res.top1}
    ms, device = None, None
    if latency:
        x = next(iter(data_mod.loader(ds, 1)))[0].to(next(net.parameters()).device)
        ms, device = {}, device_name(x.device)
        for n, s in enumerate(net.plan.stitches):
            ms[s.id] = extra[s.id]["latency_ms"] = measure_latency(net.select(s.id), x)
            _report(progress, "latency", n + 1, stitches, "stitches")
    rows = write_evaluation(run_dir, net.plan, res.top1, data, res.images, step=step, extra=extra)["stitches"]
    return EvalReport(run_dir, net.plan, dict(res.top1), res.images, data, step, rows, ms, device)


# --- latency -----------------------------------------------------------------------------------------

@dataclass
class LatencyResult:
    ms: dict[int, float]         # stitch id -> median batch-1 latency (ms)
    device: str                  # the device that ran them (device_name)
    threads: int                 # torch's CPU threads while timing


def latency_run(run_dir: Path, *, net=None, repeats: int = 10, progress: Progress | None = None) -> LatencyResult:
    """Batch-1 latency of every stitch of the run on this machine, saved as RUN/latency.json with
    the device that ran them. `net`: the run's network when it is already in memory."""
    from composer.evaluate import stitch_latencies
    from composer.run import load_run, read_manifest, save_latency
    progress = progress or _quiet
    repeats = checks.whole(repeats, "repeats", 1)
    run_dir = Path(run_dir).expanduser()
    if net is None:
        net = load_run(run_dir).net
    else:
        read_manifest(run_dir)
    device = device_name(next(net.parameters()).device)   # stitch_latencies times on the network's device
    ms = stitch_latencies(net, repeats=repeats, progress=lambda n, total: _report(progress, "latency", n, total,
                                                                                  "stitches"))
    save_latency(run_dir, ms, device)
    return LatencyResult(ms, device, torch.get_num_threads())


# --- train -------------------------------------------------------------------------------------------

def train_run(run_dir: Path, data: str, config, *, eval_data: str | None = None,
              events: Callable[[dict], None] | None = None, cancel: threading.Event | None = None) -> dict:
    """Fine-tune the run's SN-Net (composer.train.train: resumes from its checkpoint; torchrun ranks
    and the device are handled there). Signals are the caller's: set `cancel` to stop after a step."""
    from composer.run import read_manifest, run_lock
    from composer.train import train
    read_manifest(run_dir)   # a run folder, refused in one line before the lock file is made
    # one process trains a run at a time (torchrun's other ranks share rank 0's lock)
    lock = run_lock(run_dir, "training") if os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock:
        return train(run_dir, data, config, events=events, cancel=cancel, eval_data=eval_data)


# --- export ------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path                    # the folder written
    files: list[str]             # its files (names, sorted)
    hub: str | None = None       # the Hub URL it was pushed to


def export_run(run_dir: Path, out: Path, *, stitch: int | None = None, whole: bool = False,
               candidate: str | None = None, latency: bool = False, push_to_hub: str | None = None,
               force: bool = False) -> ExportResult:
    """Export one stitch, the whole switchable SN-Net (`whole`, with latency: each stitch timed here)
    or a builder's candidate ("METHOD:NAME" or NAME) as a folder people load; optionally push it to
    a Hugging Face Hub repo.

    The folder is written whole or not at all. `out` may be new, empty, or an earlier export of the
    same thing from the same run (replaced); anything else (an anchor's folder, another export, a
    run) only with `force`."""
    from composer import export as export_mod
    from composer.io import check_output_folder, staged_folder
    from composer.run import read_manifest
    chosen = (stitch is not None) + bool(whole) + (candidate is not None)
    if chosen != 1:
        raise UserError("export exactly one of: a stitch, the whole SN-Net, or a candidate")
    run_dir = Path(run_dir).expanduser()
    read_manifest(run_dir)
    if stitch is not None:
        stitch = checks.whole(stitch, "stitch id")
    what = ("the whole SN-Net" if whole else f"candidate {candidate}" if candidate is not None else f"stitch {stitch}")
    of = f"{what} of {run_dir.resolve()}"
    out = check_output_folder(out, "export", of, force)
    with staged_folder(out, {"kind": "export", "of": of}) as tmp:
        if whole:
            export_mod.export_snnet(run_dir, tmp, latency=latency)
        elif candidate is not None:
            from composer.builders.elastic import export_candidate
            export_candidate(run_dir, candidate, tmp)
        else:
            export_mod.export_stitch(run_dir, stitch, tmp)
    folder = out
    url = export_mod.push_to_hub(folder, push_to_hub) if push_to_hub else None
    files = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))
    return ExportResult(Path(folder), files, url)


# --- the other curve builders ------------------------------------------------------------------------

def __getattr__(name: str):
    # `from composer.pipeline import build`: the builders' one entry (composer.builders.build), imported
    # on first use so that this module loads without the builders' dependencies.
    if name == "build":
        from composer.builders import build
        return build
    raise AttributeError(f"module 'composer.pipeline' has no attribute '{name}'")
