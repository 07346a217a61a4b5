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
from composer.run import data_name, stitch_rows

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
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# --- where a flow runs -------------------------------------------------------------------------------

def resolve_where(device: str | torch.device | None = "auto", precision: str | None = "auto"
                  ) -> tuple[torch.device, str]:
    """The user's words for device and precision (composer.device: `auto` takes the GPU, and bf16 on a
    GPU that supports it, when there is one; fp32 on the CPU) as (torch.device, "fp32" | "bf16" |
    "fp16"); one DeviceError line for a device this machine lacks. Under torchrun with several
    processes each rank takes its own GPU: "auto" and "cuda" become cuda:LOCAL_RANK."""
    from composer.device import resolve_device, resolve_precision
    where = resolve_device(device)
    if where.type == "cuda" and where.index is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        where = resolve_device(f"cuda:{local}")
    return where, resolve_precision(precision, where)


class _Ranks:
    """This process's place among torchrun's ranks (composer.distributed.init_from_env): the group is
    joined on entry when WORLD_SIZE > 1 (nccl on a GPU, gloo on the CPU) and left on exit if this flow
    created it; one process is rank 0 of 1 and nothing happens."""

    def __init__(self, device: torch.device):
        self.device, self.group = device, None

    def __enter__(self):
        from composer.distributed import init_from_env
        self.group = init_from_env(self.device)
        return self.group

    def __exit__(self, *exc) -> bool:
        self.group.close()
        return False


def _shard_align(batch_size: int) -> int:
    """Shards made of whole batches of the one-process run, starting at a multiple of fit's held-out
    period: each rank then computes exactly the per-batch sums one process would."""
    import math

    from composer.distributed import ALIGN
    return math.lcm(ALIGN, batch_size)


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
            device: str | torch.device | None = "auto", precision: str | None = "auto",
            resolution: int | str | None = None, stitch_rank: int | None = None,
            progress: Progress | None = None) -> FitResult:
    """Anchors -> plan -> SN-Net, every stitching layer fitted by least squares on `calib` images of
    `data` (a seeded subset), each stitch's BatchNorm statistics re-estimated on the same images;
    written to the run folder `out` (manifest, plan, weights). `anchors` may be ["starter"].

    The run folder is written whole or not at all (staged beside it, then moved in place): a failed
    fit leaves nothing, or the earlier run as it was. `out` may be new, empty or an earlier untrained
    run (replaced whole: no old checkpoint or evaluation survives); anything else, a trained run
    included, only with `force`.

    device / precision: where the forward passes run and in which precision (resolve_where; the least
    squares stay float64). Under torchrun (WORLD_SIZE > 1) every rank takes its shard of the
    calibration images (whole batches) and the normal equations are summed across ranks, so the
    layers are one process's (within float64 rounding); only rank 0 writes the run.

    resolution: every anchor runs at N x N pixels (members trained at different sizes: EfficientNet
    B0..B7), costs counted there; or "native": each anchor at its own size, a route at its first
    anchor's, stitching layers resampling onto the next anchor's grid (composer.run.set_native).
    Stored in the manifest, so every later command loads the run the same way.

    stitch_rank: SN-Netv2's low-rank stitching layers (composer.snnet.StitchLayer): least squares
    fits the weight, which training keeps frozen while it learns a rank-R update and the bias;
    stored in the manifest, so training and export rebuild the same layers."""
    progress = progress or _quiet
    calib = checks.whole(calib, "calibration images", 1)
    ridge = checks.number(ridge, "ridge", 0)
    batch_size = checks.whole(batch_size, "batch size", 1)
    workers = checks.whole(workers, "workers", 0)
    seed = checks.whole(seed, "seed")
    if resolution is not None:
        from composer.run import check_resolution
        resolution = check_resolution(resolution)
    if stitch_rank is not None:
        stitch_rank = checks.whole(stitch_rank, "stitch rank", 1)
    where, precision = resolve_where(device, precision)
    out = check_run_output(out, force)
    with _Ranks(where) as ranks:
        return _fit(anchors, data, out, calib, ridge, plan_options, pretrained, batch_size, workers, seed,
                    manifest_extra, where, precision, resolution, stitch_rank, ranks, progress)


def _fit(anchors, data, out, calib, ridge, plan_options, pretrained, batch_size, workers, seed, manifest_extra,
         where, precision, resolution, stitch_rank, ranks, progress) -> FitResult:
    from composer import data as data_mod
    from composer.distributed import shard
    from composer.fit import calibrate_route_stats, fit_stitches
    from composer.io import staged_folder
    from composer.run import build_network, run_lock, save_fitted
    _report(progress, "anchors", 0, 1, "anchors")
    net = build_network(resolve_anchors(anchors), pretrained, resolution=resolution, stitch_rank=stitch_rank,
                        **(plan_options or {}))
    _report(progress, "anchors", 1, 1, "anchors")
    cfg = data_mod.data_config(net.anchors[net.input_anchor])
    ds = data_mod.subset(data_mod.open_dataset(data, cfg), calib, seed=seed)
    ds = shard(ds, ranks.rank, ranks.world, align=_shard_align(batch_size))   # the whole set in one process
    multi = ranks.world > 1
    # BatchNorm statistics per stitch only for routes with BatchNorms behind their stitch point
    needs_stats = any(net.route_bn_names(s) for s in net.plan.stitches)
    images = _DecodedOnce(lambda: data_mod.loader(ds, batch_size, workers=workers), keep=needs_stats)
    report = fit_stitches(net, images.first(), ridge=ridge, device=where, precision=precision, distributed=multi,
                          progress=lambda n: _report(progress, "fit", n, len(ds), "images"))
    if needs_stats:
        calibrate_route_stats(net, images.again(), device=where, precision=precision, distributed=multi,
                              progress=lambda n: _report(progress, "route_stats", n, len(ds), "images"))
    images.kept = None
    net.cpu()   # saved and returned from the CPU
    manifest = {"pretrained": pretrained, **({"resolution": resolution} if resolution is not None else {}),
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                "fit": {"data": data, "calib": report.images, "held_out": report.held_out, "ridge": ridge,
                        "r2": {str(k): v for k, v in report.r2.items()},
                        "device": device_name(where), "precision": precision, "processes": ranks.world},
                **(manifest_extra or {})}
    if not ranks.main:   # rank 0 writes the run; the other ranks computed the same layers
        return FitResult(out, net, dict(report.r2), report.images, report.held_out, manifest)
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
    ran_on: str | None = None    # where the evaluation ran (device_name)
    precision: str | None = None  # the forward passes' precision: fp32, bf16 or fp16
    processes: int = 1           # torchrun ranks that shared the images

    @property
    def name(self) -> str:
        return data_name(self.data)


def evaluate_run(run_dir: Path, data: str, *, limit: int | None = None, latency: bool = False,
                 batch_size: int = 64, workers: int = 0, seed: int = 0, split: str = "validation",
                 net=None, device: str | torch.device | None = "auto", precision: str | None = "auto",
                 progress: Progress | None = None) -> EvalReport:
    """Top-1 of every stitch of the run (shared prefixes) on `data` (a seeded subset of `limit`
    images), with latency=True also each stitch's batch-1 latency on a real image; written to
    RUN/evaluation.json with the training step of the weights, so composer.run.read_top1 ranks it.
    `net`: the run's network when it is already in memory (as composer.run.load_run gives it; it is
    back on its own device afterwards). device / precision: where the forward passes run and in which
    precision (resolve_where); latency is timed there in the same precision.

    Under torchrun (WORLD_SIZE > 1) every rank evaluates its shard of the images and the correct
    counts are summed: the same top-1 as one process; only rank 0 writes evaluation.json (and times
    latency)."""
    progress = progress or _quiet
    limit = None if limit is None else checks.whole(limit, "evaluation images", 1)
    batch_size = checks.whole(batch_size, "batch size", 1)
    workers = checks.whole(workers, "workers", 0)
    seed = checks.whole(seed, "seed")
    where, precision = resolve_where(device, precision)
    run_dir = Path(run_dir).expanduser()
    with _Ranks(where) as ranks:
        return _evaluate(run_dir, data, limit, latency, batch_size, workers, seed, split, net, where, precision,
                         ranks, progress)


def _evaluate(run_dir, data, limit, latency, batch_size, workers, seed, split, net, where, precision, ranks,
              progress) -> EvalReport:
    from composer import data as data_mod
    from composer.costs import measure_latency
    from composer.device import autocast
    from composer.distributed import shard
    from composer.evaluate import evaluate_all
    from composer.run import load_run, read_manifest, write_evaluation
    from composer.train import checkpoint_step
    if net is None:
        net = load_run(run_dir).net
        home = None
    else:
        read_manifest(run_dir)   # still a run folder
        home = next(net.parameters()).device   # the caller's network goes back there
    step = checkpoint_step(run_dir)
    cfg = data_mod.data_config(net.anchors[net.input_anchor])
    ds = data_mod.subset(data_mod.open_dataset(data, cfg, split=split), limit, seed=seed)
    part = shard(ds, ranks.rank, ranks.world)   # the whole set in one process
    stitches = len(net.plan.stitches)
    try:
        res = evaluate_all(net, data_mod.loader(part, batch_size, workers=workers), device=where, precision=precision,
                           distributed=ranks.world > 1,
                           progress=lambda n: _report(progress, "evaluate", n, len(part), "images",
                                                      stitches=stitches))
        extra = {k: {} for k in res.top1}
        ms, device = None, None
        if latency and ranks.main:
            x = next(iter(data_mod.loader(ds, 1)))[0].to(where)
            ms, device = {}, device_name(where)
            with autocast(precision, where):
                for n, s in enumerate(net.plan.stitches):
                    ms[s.id] = extra[s.id]["latency_ms"] = measure_latency(net.select(s.id), x)
                    _report(progress, "latency", n + 1, stitches, "stitches")
    finally:
        net.to(home or "cpu")
    if ranks.main:
        rows = write_evaluation(run_dir, net.plan, res.top1, data, res.images, step=step, extra=extra)["stitches"]
    else:
        rows = stitch_rows(net.plan, {k: {"top1": v} for k, v in res.top1.items()})
    return EvalReport(run_dir, net.plan, dict(res.top1), res.images, data, step, rows, ms, device,
                      device_name(where), precision, ranks.world)


# --- latency -----------------------------------------------------------------------------------------

@dataclass
class LatencyResult:
    ms: dict[int, float]         # stitch id -> median batch-1 latency (ms)
    device: str                  # the device that ran them (device_name)
    threads: int                 # torch's CPU threads while timing


def latency_run(run_dir: Path, *, net=None, repeats: int = 10, device: str | torch.device | None = "auto",
                precision: str | None = "auto", progress: Progress | None = None) -> LatencyResult:
    """Batch-1 latency of every stitch of the run on `device` (resolve_where: the GPU when there is
    one) in `precision`, saved as RUN/latency.json with the device that ran them (device_name, and the
    precision when not fp32). `net`: the run's network when it is already in memory (back on its own
    device afterwards)."""
    from composer.device import autocast
    from composer.evaluate import stitch_latencies
    from composer.run import load_run, read_manifest, save_latency
    progress = progress or _quiet
    repeats = checks.whole(repeats, "repeats", 1)
    where, precision = resolve_where(device, precision)
    run_dir = Path(run_dir).expanduser()
    if net is None:
        net, home = load_run(run_dir).net, None
    else:
        read_manifest(run_dir)
        home = next(net.parameters()).device
    name = device_name(where) + ("" if precision == "fp32" else f", {precision}")
    try:
        net.to(where)   # stitch_latencies times on the network's device
        with autocast(precision, where):
            ms = stitch_latencies(net, repeats=repeats,
                                  progress=lambda n, total: _report(progress, "latency", n, total, "stitches"))
    finally:
        net.to(home or "cpu")
    save_latency(run_dir, ms, name)
    return LatencyResult(ms, name, torch.get_num_threads())


# --- train -------------------------------------------------------------------------------------------

def train_run(run_dir: Path, data: str, config, *, eval_data: str | None = None,
              events: Callable[[dict], None] | None = None, cancel: threading.Event | None = None,
              device: str | torch.device | None = None, precision: str | None = None) -> dict:
    """Fine-tune the run's SN-Net (composer.train.train: resumes from its checkpoint; DDP over
    torchrun's ranks happens there). Signals are the caller's: set `cancel` to stop after a step.

    device / precision (resolve_where; None: the config's own, "auto" when it has none) are resolved
    here and passed to training in the config: under torchrun each rank takes cuda:LOCAL_RANK, and the
    process group is joined here with the backend of the chosen device (gloo for --device cpu)."""
    from dataclasses import replace

    from composer.run import read_manifest, run_lock
    from composer.train import train
    read_manifest(run_dir)   # a run folder, refused in one line before the lock file is made
    where, precision = resolve_where(device if device is not None else getattr(config, "device", None),
                                     precision if precision is not None else getattr(config, "precision", None))
    config = replace(config, device=str(where), precision=precision)
    # one process trains a run at a time (torchrun's other ranks share rank 0's lock)
    lock = run_lock(run_dir, "training") if os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock, _Ranks(where):
        return train(run_dir, data, config, events=events, cancel=cancel, eval_data=eval_data)


# --- export ------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path                    # the folder written
    files: list[str]             # its files (names, sorted)
    hub: str | None = None       # the Hub URL it was pushed to


def export_run(run_dir: Path, out: Path, *, stitch: int | None = None, whole: bool = False,
               candidate: str | None = None, latency: bool = False, push_to_hub: str | None = None,
               force: bool = False, device: str | torch.device | None = "auto",
               precision: str | None = "auto") -> ExportResult:
    """Export one stitch, the whole switchable SN-Net (`whole`, with latency: each stitch timed here)
    or a builder's candidate ("METHOD:NAME" or NAME) as a folder people load; optionally push it to
    a Hugging Face Hub repo. device / precision: where (and how) `latency` is timed (resolve_where);
    table.json and the model card name that device.

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
    # the device a whole export's latency is timed on: refused in one line before anything is written
    where, precision = resolve_where(device, precision) if whole and latency else (None, "fp32")
    if stitch is not None:
        stitch = checks.whole(stitch, "stitch id")
    what = ("the whole SN-Net" if whole else f"candidate {candidate}" if candidate is not None else f"stitch {stitch}")
    of = f"{what} of {run_dir.resolve()}"
    out = check_output_folder(out, "export", of, force)
    with staged_folder(out, {"kind": "export", "of": of}) as tmp:
        if whole:
            export_mod.export_snnet(run_dir, tmp, latency=latency, device=where, precision=precision)
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
