"""`python -m composer`: the headless face of the library.

Results go to stdout (JSON with --json), progress bars to stderr. Any bad input ends with one
line `error: ...` on stderr and exit code 2; a traceback means a bug in this program.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from composer.checks import count, number, whole
from composer.errors import UserError
from composer.run import check_resolution, stitch_rows

COMMANDS = {}   # name -> (function that adds the command's arguments, function that runs it)


def command(name: str, arguments):
    """Register a subcommand: `arguments(subparser)` declares its options; the docstring is its help."""
    def register(fn):
        COMMANDS[name] = (arguments, fn)
        return fn
    return register


def _checked(check, *limits, **kw):
    """An argparse `type` from a composer.checks check: its UserError becomes argparse's own error
    ("argument --ridge: must be at least 0, got -1"), so every typed number is checked one way."""
    def parse(text: str):
        try:
            return check(text, "", *limits, **kw)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
    parse.__name__ = check.__name__
    return parse


_positive = _checked(whole, 1)          # 1, 2, ...
_natural = _checked(whole, 0)           # 0, 1, ...
_integer = _checked(whole)              # any whole number
_nonnegative = _checked(number, 0)      # finite, >= 0
_above_zero = _checked(number, above=0)  # finite, > 0
_fraction = _checked(number, 0, 1)      # finite, in [0, 1]


class _Bars:
    """composer.pipeline progress events as tqdm bars on stderr, a fresh one per phase (none when
    stderr is not a terminal)."""
    NAMES = {"fit": "fit", "route_stats": "BatchNorm statistics per stitch", "evaluate": "evaluate",
             "latency": "latency"}

    def __init__(self, show: bool = True):
        self.phase, self.bar, self.show = None, None, show   # show=False: torchrun's other ranks draw nothing

    def __call__(self, e: dict) -> None:
        if not self.show or e.get("type") != "progress" or e["phase"] not in self.NAMES:
            return
        if e["phase"] != self.phase:
            self.close()
            self.phase = e["phase"]
            unit = {"images": "img", "stitches": "stitch"}.get(e.get("unit"), "it")
            self.bar = tqdm(total=e["total"], desc=self.NAMES[self.phase], unit=unit, file=sys.stderr, disable=None)
        self.bar.update(e["done"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.phase, self.bar = None, None

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=_positive, default=2, help="sliding-window size for equal depths (SN-Net: 2)")
    p.add_argument("--stride", type=_positive, default=1, help="sliding-window stride (SN-Net: 1)")
    p.add_argument("--all-pairs", action="store_true", help="stitch every pair of anchors, not only neighbours in MACs")
    p.add_argument("--points", help="JSON list of [[front_anchor, block], [back_anchor, block]]: exactly these stitches")
    p.add_argument("--two-way", action="store_true",
                   help="SN-Netv2's routes between two anchors: both ways and there and back (134 for DeiT3-S + DeiT3-L)")
    p.add_argument("--resolution", type=_checked(check_resolution), metavar="N|native",
                   help="members trained at different sizes (e.g. EfficientNet-B0/B1): N runs every anchor at N x N "
                        "pixels; 'native' runs each at its own size, a route at its first anchor's, the stitching "
                        "layers resampling onto the next anchor's grid. Costs are counted at the sizes run; `fit` "
                        "keeps the choice in the run for every later command")


def _pretrained(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", dest="pretrained", action="store_true", default=None,
                   help="load weights for plain timm names too (needs the Hub or its cache)")
    g.add_argument("--random-init", dest="pretrained", action="store_false",
                   help="architectures only, even for hf-hub:/local-dir: anchors")


def _plan_kwargs(args) -> dict:
    points = None
    if args.points:
        try:
            points = json.loads(args.points)
        except json.JSONDecodeError as e:
            raise UserError(f"--points is not valid JSON: {e}") from None
    return {"kernel": args.kernel, "stride": args.stride, "all_pairs": args.all_pairs, "points": points,
            "two_way": args.two_way}


def _table(plan, rows: list[dict], extra_cols: list[str]) -> str:
    lines = [f"{'id':>4}  {'MACs (M)':>10}  {'params (M)':>10}  " + "".join(f"{c:>8}  " for c in extra_cols) + "route"]
    for r in rows:
        vals = "".join(f"{r[c]:8.2f}  " if isinstance(r.get(c), float) else f"{str(r.get(c, '')):>8}  " for c in extra_cols)
        lines.append(f"{r['id']:>4}  {r['macs'] / 1e6:10.2f}  {r['params'] / 1e6:10.3f}  {vals}{plan.describe_route(r['id'])}")
    return "\n".join(lines) + "\nMACs: one multiply-add = 1 (FLOPs = 2 x MACs), per image."


def _families_args(sp) -> None:
    sp.add_argument("--search", help="Hub search text, e.g. deit")
    sp.add_argument("--author", default="timm", help="Hub author (default timm)")
    sp.add_argument("--tag", action="append", default=[], help="Hub tag filter (repeatable)")
    sp.add_argument("--local", type=Path, action="append", default=[],
                    help="a folder of local-dir: model folders (repeatable)")
    sp.add_argument("--json", action="store_true")


@command("families", _families_args)
def cmd_families(args) -> None:
    """List model families: Hub (when reachable), the Hub cache, local folders, the starter family."""
    from dataclasses import asdict

    from composer.costs import architecture_macs
    from zoo import hub, starter

    def macs(spec: str) -> float:
        try:
            return architecture_macs(spec)
        except Exception:   # a Hub repo whose architecture this timm does not know: list it last
            return float("inf")

    families, status = [], hub.hub_status()
    if status is None:
        try:
            families += hub.list_hub_families(args.search, args.author, args.tag or None, sort_key=macs)
        except hub.HubUnavailable as e:
            status = str(e)
    families += hub.cached_families(sort_key=macs)
    for folder in args.local:
        if not folder.is_dir():
            raise UserError(f"--local {folder} is not a folder")
        families += hub.local_families(folder)
    built = starter.default_cache_dir() / "starter" / "models"
    if built.is_dir():
        families += hub.local_families(built, source="starter")
    if args.json:
        print(json.dumps({"hub_status": status, "families": [asdict(f) for f in families]}))
        return
    if status:
        print(f"note: {status}", file=sys.stderr)
    for f in families:
        print(f"[{f.source}] {f.name}  ({len(f.members)} models)")
        for m in f.members:
            print(f"    {m}")
    if not built.is_dir():
        print("[starter] 3 tiny ViTs on digits: built on first use (python -m composer fit starter --data starter ...)")


def _plan_args(sp) -> None:
    sp.add_argument("anchors", nargs="+", help="timm name, hf-hub:org/repo, local-dir:DIR, or just `starter`")
    _plan_options(sp)
    _pretrained(sp)
    sp.add_argument("--json", action="store_true")


@command("plan", _plan_args)
def cmd_plan(args) -> None:
    """Enumerate stitches offline from architectures alone."""
    from composer.curve import input_sizes_text
    from composer.pipeline import resolve_anchors
    from composer.plan import build_plan
    from composer.run import load_anchors
    # Planning needs shapes and counts only: build on the meta device unless weights are asked for.
    _, infos = load_anchors(resolve_anchors(args.anchors), bool(args.pretrained), None if args.pretrained else "meta",
                            resolution=args.resolution)
    plan = build_plan(infos, **_plan_kwargs(args))
    rows = stitch_rows(plan)
    size = "x".join(str(d) for d in plan.infos[0].input_size[1:])
    if args.json:
        print(json.dumps({"anchors": plan.anchors, "resolution": args.resolution, "input_size": list(plan.infos[0].input_size),
                          "input_sizes": [list(i.input_size) for i in plan.infos], "stitches": rows}))
    else:
        print(_table(plan, rows, []))
        at = (f", {input_sizes_text(plan)}; stitching layers resample (--resolution native)"
              if plan.native_resolution else
              f" all at {size} px with the first anchor's normalisation (--resolution)" if args.resolution
              else f" at {size} px")
        print(f"{len(plan.stitches)} stitches ({len(plan.anchors)} anchors{at}), {len(plan.layers)} stitching layers")


def _fit_args(sp) -> None:
    sp.add_argument("anchors", nargs="+")
    sp.add_argument("--data", required=True, help="ImageFolder path, 'starter', or a timm dataset name")
    sp.add_argument("--calib", type=_positive, default=256, help="calibration images (default 256)")
    sp.add_argument("--out", required=True, type=Path, help="run folder to write (new, empty, or an earlier fit)")
    sp.add_argument("--force", action="store_true", help="replace whatever --out holds, a fine-tuned run included")
    sp.add_argument("--ridge", type=_nonnegative, default=1e-4, help="ridge of the least squares (default 1e-4)")
    sp.add_argument("--stitch-rank", type=_positive, metavar="R",
                    help="low-rank stitching layers (SN-Netv2): training keeps the least-squares weight and learns "
                         "a rank-R update and the bias; exports merge them into one matrix")
    _plan_options(sp)
    _pretrained(sp)
    _where(sp)
    _common(sp)


@command("fit", _fit_args)
def cmd_fit(args) -> None:
    """Fit every stitching layer by least squares on calibration images; write RUN/."""
    from composer.pipeline import fit_run
    with _Bars(show=_rank0()) as bars:
        r = fit_run(args.anchors, args.data, args.out, calib=args.calib, ridge=args.ridge,
                    plan_options=_plan_kwargs(args), pretrained=args.pretrained, batch_size=args.batch_size,
                    workers=args.workers, seed=args.seed, force=args.force, device=args.device,
                    precision=args.precision, resolution=args.resolution, stitch_rank=args.stitch_rank,
                    progress=bars)
    if not _rank0():   # torchrun: rank 0 wrote the run and reports it
        return
    rows = stitch_rows(r.plan, {k: {"r2": v} for k, v in r.r2.items()})
    if args.json:
        print(json.dumps({"run": str(r.run), "anchors": r.plan.anchors, "stitches": rows}))
    else:
        print(_table(r.plan, rows, ["r2"]))
        fit = r.manifest["fit"]
        ranks = f", {fit['processes']} processes" if fit["processes"] > 1 else ""
        low = f" (low-rank updates of rank {args.stitch_rank} to train)" if args.stitch_rank else ""
        print(f"fitted {len(r.plan.layers)} stitching layers{low} on {r.images} images "
              f"(R^2 on {r.held_out} held out; {fit['device']}, {fit['precision']}{ranks}); wrote {r.run}")


def _evaluate_args(sp) -> None:
    sp.add_argument("run", type=Path)
    sp.add_argument("--data", required=True)
    sp.add_argument("--limit", type=_positive, default=None, help="evaluate on a seeded random subset of N images")
    sp.add_argument("--latency", action="store_true", help="also measure each stitch's latency (ms, batch 1, this device)")
    sp.add_argument("--reference", type=Path, metavar="FILE",
                    help="an evaluation.json (or run folder) measured before fine-tuning on the same images: judge "
                         "every stitch against the line between those original anchors (composer.judge)")
    _where(sp)
    _common(sp)


@command("evaluate", _evaluate_args)
def cmd_evaluate(args) -> None:
    """Top-1 of every stitch (shared-prefix evaluation); also saved as RUN/evaluation.json."""
    from composer.pipeline import evaluate_run
    from composer.judge import read_reference
    # read (and checked) before evaluating, which may overwrite it (RUN/evaluation.json)
    reference = read_reference(args.reference, data=args.data) if args.reference else None
    with _Bars(show=_rank0()) as bars:
        r = evaluate_run(args.run, args.data, limit=args.limit, latency=args.latency, batch_size=args.batch_size,
                         workers=args.workers, seed=args.seed, device=args.device, precision=args.precision,
                         progress=bars)
    if not _rank0():   # torchrun: rank 0 reports the summed result
        return
    judged = reference.judge(r.plan, r.top1, r.images) if reference else None
    if args.json:
        print(json.dumps({"images": r.images, "stitches": r.rows, "device": r.ran_on, "precision": r.precision,
                          "processes": r.processes, **({"latency_device": r.device} if r.device else {}),
                          **({"judgement": judged.to_dict()} if judged else {})}))
    else:
        print(_table(r.plan, r.rows, ["top1"] + (["latency_ms"] if args.latency else [])))
        ranks = f", {r.processes} processes" if r.processes > 1 else ""
        print(f"top-1 (%) on {r.images} images of {args.data} ({r.ran_on}, {r.precision}{ranks})")
        if judged:
            print("\n".join(judged.lines()))


def _curve_args(sp) -> None:
    sp.add_argument("run", type=Path)
    sp.add_argument("--x", choices=["macs", "params", "activations", "latency"], default="macs",
                    help="x axis (MACs: 1 multiply-add = 1; latency needs RUN/latency.json)")
    sp.add_argument("--out", required=True, type=Path, help="FILE.html (offline, plotly inline), FILE.json or FILE.png")
    sp.add_argument("--reference", type=Path, metavar="FILE",
                    help="an evaluation.json (or run folder) measured before fine-tuning on the same images: its "
                         "anchors drawn as a dashed line (default: the run's own step-0 evaluation, when it has one)")


@command("curve", _curve_args)
def cmd_curve(args) -> None:
    """Draw the accuracy curve of a run (one point per stitch, Pareto front, the other builders'
    candidates) from its latest evaluation."""
    from composer.curve import check_curve_out, curve_figure, curve_rows, write_curve
    from composer.judge import read_reference
    from composer.run import load_plan_of_run, read_candidates, read_latency, read_original_top1, read_top1
    check_curve_out(args.out)
    plan = load_plan_of_run(args.run)
    top1, source = read_top1(args.run)
    reference = read_reference(args.reference).top1_for(plan) if args.reference else read_original_top1(args.run)
    latency = read_latency(args.run) if args.x == "latency" else None
    candidates = read_candidates(args.run)
    # the title names the run's folder and the data by name (read_top1's phrase), never a cache path
    fig = curve_figure(plan, top1, args.x, latency=latency, title=f"{args.run.resolve().name}: {source}",
                       candidates=candidates, reference=reference)
    rows = curve_rows(plan, top1, args.x, latency, candidates)
    write_curve(fig, rows, args.out)
    drawn = sum(c["top1"] is not None and c["x"] is not None for c in rows["candidates"])
    extra = f", {drawn} of {len(candidates)} candidates drawn" if candidates else ""
    print(f"wrote {args.out}: {len(rows['stitches'])} stitches{extra}, Pareto front {rows['pareto']} ({source})")


def _train_args(sp) -> None:
    sp.add_argument("run", type=Path, help="run folder made by `fit` (resumes from its checkpoint if any)")
    sp.add_argument("--data", required=True, help="training images: ImageFolder path, 'starter', or a timm dataset name")
    sp.add_argument("--eval-data", help="held-out images for evaluation (default: the validation split of --data)")
    g = sp.add_argument_group("when to stop (at least one)")
    g.add_argument("--steps", type=_positive, help="total optimizer steps, counted across resumes")
    g.add_argument("--time-budget", type=_above_zero, metavar="MIN", help="wall-clock minutes for this invocation")
    sp.add_argument("--lr", type=_above_zero, help="learning rate (default: per family, see composer.train)")
    sp.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: AdamW (family defaults in composer.train)")
    sp.add_argument("--weight-decay", type=_nonnegative)
    sp.add_argument("--warmup-steps", type=_natural)
    sp.add_argument("--anchor-lr-scale", type=_nonnegative, help="anchors' lr = lr x this (stitching layers get lr)")
    sp.add_argument("--sampling", choices=["uniform", "macs_grouped", "flops_gap", "need"],
                    help="uniform over stitches (SN-Net), or a MACs group first, then a stitch in it: --groups equal "
                         "groups (macs_grouped), or groups cut where MACs jump by more than --macs-gap (flops_gap, "
                         "SN-Netv2); or half by need, the stitches whose loss lies furthest above their anchors' "
                         "(default: per family, see composer.train)")
    sp.add_argument("--anchor-share", type=_checked(number, 0, 1), metavar="P",
                    help="probability that a step trains an anchor's own route (default: 0.3 with --sampling need, "
                         "else as any route)")
    sp.add_argument("--groups", type=_positive, default=4, help="MACs groups for --sampling macs_grouped")
    sp.add_argument("--macs-gap", type=_checked(count, 1), metavar="MACS",
                    help="for --sampling flops_gap: a group starts more than this many MACs above the first stitch "
                         "of the previous one (e.g. 10M)")
    sp.add_argument("--stitches-per-step", type=_positive, default=1, metavar="K",
                    help="split each batch among K sampled stitches, one optimizer step for all (as SN-Net's K GPUs)")
    sp.add_argument("--stitch-layers-only", action="store_true", help="freeze the anchors, train the stitching layers")
    sp.add_argument("--average", type=_checked(number, 0, 1, above=0), metavar="ALPHA",
                    help="the run's weights are fitted + ALPHA x (trained - fitted): weight averaging toward the "
                         "fitted weights (WiSE-FT) keeps more of what the anchors knew (default: 0.8 for CNNs, "
                         "1 for ViTs; the checkpoint keeps the weights as trained)")
    sp.add_argument("--distill", metavar="anchors|live|largest|off|SPEC",
                    help="distil from each route's last anchor (default with pretrained anchors: its original "
                         "weights; live: as fine-tuned so far), the largest anchor, any anchor spec, or not at all")
    sp.add_argument("--distill-weight", type=_fraction, default=0.5)
    sp.add_argument("--min-crop", type=_checked(number, None, 1, above=0), default=1.0,
                    help="smallest random-resized-crop area (default 1: no crop)")
    sp.add_argument("--hflip", type=_fraction, help="horizontal-flip probability (default 0.5; 0 for the starter digits)")
    sp.add_argument("--eval-every", type=_natural, default=0, help="evaluate every N steps (0: only at the end)")
    sp.add_argument("--eval-limit", type=_positive, default=500, help="held-out images per evaluation")
    sp.add_argument("--checkpoint-every", type=_positive, default=50, help="steps between checkpoints")
    _where(sp)
    _common(sp, batch_size=None)


@command("train", _train_args)
def cmd_train(args) -> None:
    """Fine-tune the SN-Net of a run (one sampled stitch per step); Ctrl-C stops with a checkpoint."""
    import signal
    import threading

    from composer.pipeline import train_run
    from composer.train import TrainConfig
    if (args.macs_gap is not None) != (args.sampling == "flops_gap"):
        raise UserError("--macs-gap goes with --sampling flops_gap, and flops_gap needs --macs-gap (e.g. 10M)")
    config = TrainConfig(steps=args.steps, time_budget_min=args.time_budget, lr=args.lr, batch_size=args.batch_size,
                         optimizer=args.optimizer, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         sampling=args.sampling, groups=args.groups, macs_gap=args.macs_gap, anchor_share=args.anchor_share,
                         stitches_per_step=args.stitches_per_step,
                         stitch_layers_only=args.stitch_layers_only, average=args.average,
                         distill=args.distill, distill_weight=args.distill_weight, eval_every=args.eval_every,
                         eval_limit=args.eval_limit, checkpoint_every=args.checkpoint_every, seed=args.seed,
                         workers=args.workers, anchor_lr_scale=args.anchor_lr_scale, min_crop=args.min_crop,
                         hflip=args.hflip)
    rank0 = os.environ.get("RANK", "0") == "0"
    cancel = threading.Event()

    def stop(*_) -> None:
        # The first Ctrl-C (or a SIGTERM from torchrun / a job scheduler) finishes the step, saves
        # a checkpoint and exits; a second one stops at once (the previous checkpoint stays).
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(desc="train", unit="step", file=sys.stderr, disable=None if rank0 else True)

    def show(e: dict) -> None:
        if e["type"] == "start":
            bar.reset(total=e["total_steps"])
            bar.update(e["step"])
            if e.get("after_divergence") and rank0:
                d = e["after_divergence"]
                bar.write(f"note: the previous run diverged at step {d.get('at_step')} (lr {d.get('lr')}); "
                          f"resuming from step {e['step']}", file=sys.stderr)
            if e.get("eval_on_train_data") and rank0:
                bar.write("warning: evaluating on the training folder; give --eval-data for held-out images",
                          file=sys.stderr)
        elif e["type"] == "step":
            bar.update(e["step"] - bar.n)
            bar.set_postfix(loss=f"{e['loss']:.3f}", lr=f"{e['lr']:.2g}", stitch=e["stitch"], refresh=False)
        elif e["type"] == "eval" and rank0:
            best = max(e["top1"].values()) if e["top1"] else float("nan")
            j = e.get("judged")
            judged = (f"; {j['within']} of {j['stitches_judged']} stitches within 1 point of the original line "
                      f"(median gap {j['median_gap']:+.2f})" if j else "")
            bar.write(f"step {e['step']}: evaluated {len(e['top1'])} stitches, best top-1 {best:.2f} %{judged}",
                      file=sys.stderr)

    try:
        result = train_run(args.run, args.data, config, eval_data=args.eval_data, events=show, cancel=cancel,
                           device=args.device, precision=args.precision)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not rank0:
        return
    if result["status"] == "diverged":   # one `error:` line, exit 2; the last finite checkpoint is kept
        kept = f"the checkpoint at step {result['step']} is kept" if result["step"] else "no checkpoint was written"
        raise UserError(f"training diverged at step {result['diverged_at']} ({result['reason']}): {kept}; "
                        f"resume with a lower --lr (this run used {result['lr']:g})")
    if args.json:
        print(json.dumps({**result, "top1": {str(k): v for k, v in result["top1"].items()}}))
    else:
        top1 = result["top1"]
        spread = f"top-1 {min(top1.values()):.2f}..{max(top1.values()):.2f} %" if top1 else "not evaluated"
        print(f"{result['status']} at step {result['step']} ({result['steps_per_s']:.2f} steps/s); "
              f"{len(top1)} stitches, {spread}; checkpoint in {result['checkpoint']}")


def _export_args(sp) -> None:
    sp.add_argument("run", type=Path)
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--stitch", type=_natural, metavar="ID", help="one stitch as a standalone model (model.pt2 + safetensors)")
    what.add_argument("--all", action="store_true", help="the whole switchable SN-Net + lookup table (table.json)")
    what.add_argument("--candidate", metavar="REF", help="an elastic or shrink candidate of the run: METHOD:NAME "
                      "(its key in `curve --out c.json`) or its NAME (model.pt2 + safetensors)")
    sp.add_argument("--out", required=True, type=Path, help="folder to write (new, empty, or an earlier export of the same)")
    sp.add_argument("--force", action="store_true", help="replace whatever --out holds")
    sp.add_argument("--latency", action="store_true", help="with --all: measure each stitch's batch-1 latency here")
    _where(sp)
    sp.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face Hub repo")
    sp.add_argument("--json", action="store_true")


@command("export", _export_args)
def cmd_export(args) -> None:
    """Export one stitch (the whole SN-Net, or a builder's candidate) as a folder people can load;
    optionally push it to the Hub."""
    from composer.pipeline import export_run
    r = export_run(args.run, args.out, stitch=args.stitch, whole=args.all, candidate=args.candidate,
                   latency=args.latency and args.all, push_to_hub=args.push_to_hub, force=args.force,
                   device=args.device, precision=args.precision)
    if args.json:
        print(json.dumps({"out": str(r.out), "files": r.files, "hub": r.hub}))
    else:
        print(f"wrote {r.out}: {', '.join(r.files)}" + (f"; pushed to {r.hub}" if r.hub else ""))


def _scale_args(sp) -> None:
    sp.add_argument("run", type=Path)
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--factor", type=float, metavar="S", help="scale the anchor by S in MACs (dWr rule)")
    what.add_argument("--fill", action="store_true", help="suggest the scaled anchor that fills the biggest MACs gap")
    sp.add_argument("--anchor", type=int, default=0, metavar="I", help="with --factor: which anchor (0 = fewest MACs)")
    sp.add_argument("--alpha", type=float, default=0.8, help="share of the scaling given to width (Fast Scaling: 0.8)")
    sp.add_argument("--json", action="store_true")


@command("scale", _scale_args)
def cmd_scale(args) -> None:
    """dWr-scale an anchor (Fast Scaling) and predict its MACs, params, activations; adds a "scale" candidate."""
    from composer.builders import build
    r = build("scale", args.run, anchor=args.anchor, factor=args.factor, alpha=args.alpha, fill=args.fill).details
    if args.json:
        print(json.dumps({"anchor": r.anchor, "s": r.s, "alpha": r.alpha, "base": r.base.to_dict(),
                          "config": r.config.to_dict(), "predicted": r.cost.to_dict(), "candidate": r.candidate.name,
                          "note": r.note}))
        return
    if r.note:
        print(r.note)
    print(f"{r.base.describe()}  ->  {r.config.describe()}   (s = {r.s:.4g}, alpha = {r.alpha:g})")
    for what in ("macs", "params", "activations"):
        print(f"  {what:<12} {getattr(r.base_cost, what) / 1e6:10.3f} M  ->  {getattr(r.cost, what) / 1e6:10.3f} M "
              "(predicted)")
    print(f"added candidate 'scale:{r.candidate.name}' (predicted costs, no accuracy). MACs: 1 multiply-add = 1.")


def _quote_args(sp) -> None:
    sp.add_argument("run", type=Path)
    sp.add_argument("--method", required=True, choices=["snnet", "elastic", "shrink", "fold", "scale"])
    sp.add_argument("--name", required=True, help="how the point is labelled, e.g. 'OFA-ResNet50 @ 0.9 GMACs'")
    sp.add_argument("--source", required=True, help="where the numbers come from, e.g. 'arXiv:1908.09791 Table 3'")
    sp.add_argument("--macs", type=_macs, required=True, metavar="M", help="MACs per image as published, e.g. 4.6G")
    sp.add_argument("--top1", type=float, required=True, help="top-1 %% as published")
    sp.add_argument("--params", type=_macs, default=0, metavar="P", help="parameters, e.g. 22M (default 0: unknown)")
    sp.add_argument("--activations", type=_macs, default=0, metavar="A", help="activations per image (default 0: unknown)")


@command("quote", _quote_args)
def cmd_quote(args) -> None:
    """Put a published point on the run's curve: labelled "quoted" (drawn as a cross, never on the
    Pareto front, since its accuracy was not measured on this run's data)."""
    from composer.candidates import Candidate
    from composer.run import add_candidates
    from composer.run import load_plan_of_run
    name = args.name.strip()
    if not name or len(name) > 120:
        raise UserError("--name must be 1 to 120 characters")
    number(args.macs, "--macs", hi=1e15)
    number(args.params, "--params", 0, 1e15)
    number(args.activations, "--activations", 0, 1e15)
    number(args.top1, "--top1")
    if not 0 <= args.top1 <= 100:
        raise UserError(f"--top1 is a percentage (0 to 100), got {args.top1:g}")
    if args.macs <= 0 or args.params < 0 or args.activations < 0:
        raise UserError("--macs must be positive, --params and --activations not negative")
    load_plan_of_run(args.run)   # a run folder (clear error otherwise), not any path
    add_candidates(args.run, [Candidate(args.method, name, args.source, int(args.macs), int(args.params),
                                        int(args.activations), args.top1, "quoted", None,
                                        {"source": args.source, "data": "as published (not this run's data)"})])
    print(f"added quoted point '{args.method}:{name}' ({args.macs / 1e6:.4g} M MACs, top-1 {args.top1:g} %) "
          f"to {args.run}")


def _latency_fit_args(sp) -> None:
    sp.add_argument("run", type=Path)
    sp.add_argument("--remeasure", action="store_true", help="time every stitch again even if the run has latencies")
    sp.add_argument("--repeats", type=_positive, default=10, help="timed runs per stitch (median kept)")
    _where(sp)
    sp.add_argument("--json", action="store_true")


@command("latency-fit", _latency_fit_args)
def cmd_latency_fit(args) -> None:
    """How well MACs and activations each predict this device's batch-1 latency (R^2), measuring it if needed."""
    from composer.builders.scaling import latency_fit, latency_points
    from composer.pipeline import latency_run, resolve_where
    from composer.run import load_plan_of_run, read_candidates, read_latency
    plan = load_plan_of_run(args.run)
    resolve_where(args.device, args.precision)   # a device this machine lacks: refused before anything is timed
    latency = None if args.remeasure else read_latency(args.run)
    if not latency:
        with _Bars() as bars:
            r = latency_run(args.run, repeats=args.repeats, device=args.device, precision=args.precision,
                            progress=bars)
        latency = r.ms
        print(f"measured batch-1 latency of {len(latency)} stitches on {r.device} ({r.threads} CPU threads); "
              f"saved in {args.run / 'latency.json'}", file=sys.stderr)
    fit = latency_fit(latency_points(plan, latency, read_candidates(args.run)))
    if args.json:
        print(json.dumps(fit.to_dict()))
        return
    print(f"R^2 of a straight line through {fit.n} points (batch-1 latency on this device):")
    print(f"  latency ~ MACs        {fit.r2_macs:.3f}")
    print(f"  latency ~ activations {fit.r2_activations:.3f}")
    print(f"{fit.better} predict latency better here.")


def _fold_args(sp) -> None:
    sp.add_argument("run", type=Path)
    what = sp.add_mutually_exclusive_group(required=True)
    what.add_argument("--anchor", type=int, metavar="I", help="fold anchor I of the run (0: the fewest MACs)")
    what.add_argument("--stitch", type=int, metavar="ID", help="fold stitch ID (exported first into OUT/source)")
    sp.add_argument("--data", required=True, help="labelled images: the certificate's inputs and the top-1")
    sp.add_argument("--out", required=True, type=Path, help="folder to write")
    sp.add_argument("--images", type=_positive, default=64, help="real images the certificate is measured on (default 64)")
    sp.add_argument("--limit", type=_positive, help="top-1 on a seeded random subset of N images (default: all)")
    sp.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference a fold may make")
    sp.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency before/after")
    _where(sp)
    _common(sp)


@command("fold", _fold_args)
def cmd_fold(args) -> None:
    """Fold what is linear (conv+BN, linear branches, stitching layers) into fewer convs, each fold certified."""
    from composer.builders import build
    from composer.builders.fold import format_certificate
    bar = tqdm(desc="fold", unit="fold", file=sys.stderr, disable=None)

    def show(e: dict) -> None:
        if e["type"] == "fold":
            bar.update(1)
        elif e["type"] == "latency":
            bar.set_description("latency")
        elif e["type"] == "evaluate":
            bar.set_description(f"top-1 ({e['images']} images)")

    try:
        report = build("fold", args.run, anchor=args.anchor, stitch=args.stitch, events=show, data=args.data,
                       out=args.out, images=args.images, limit=args.limit, tolerance=args.tolerance,
                       latency=not args.no_latency, batch_size=args.batch_size, seed=args.seed,
                       workers=args.workers, device=args.device, precision=args.precision).details
    finally:
        bar.close()
    c = report.candidate
    if args.json:
        print(json.dumps({"out": str(report.out), "certificate": report.certificate.to_dict(), "candidate": c.to_dict()}))
    else:
        print(format_certificate(report.certificate))
        print(f"top-1 {c.top1:.2f} % (source {c.config['source_top1']:.2f} %, {c.config['changed_predictions']} of "
              f"{c.config['images']} predictions changed); wrote {report.out}; candidate '{c.name}' added to {args.run}")


def _macs(text: str) -> float:
    """A MACs count: 97170000, 97.17M, 0.1G or 500k."""
    # parsed only: each command checks the range with the option's own name in the message
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1)
    try:
        return float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MACs like 97170000 or 97.17M, got '{text}'") from None


def _shrink_args(sp) -> None:
    sp.add_argument("run", type=Path)
    base = sp.add_mutually_exclusive_group(required=True)
    base.add_argument("--anchor", type=int, metavar="I", help="shrink this anchor of the run (0 = fewest MACs)")
    base.add_argument("--stitch", type=int, metavar="ID", help="shrink this stitch of the run (its route as "
                      "`export --stitch` writes it)")
    sp.add_argument("--data", required=True, help="labelled images to search on: ImageFolder path, 'starter', ...")
    sp.add_argument("--eval-data", help="held-out images for top-1 (default: the validation split of --data)")
    sp.add_argument("--target-macs", type=_macs, required=True, metavar="M", help="MACs per image, e.g. 97.17M")
    sp.add_argument("--steps", type=_positive, default=200, help="search steps (batches), default 200")
    sp.add_argument("--eval-limit", type=_positive, default=1000, help="evaluation images (default 1000)")
    sp.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the pruning ratios")
    sp.add_argument("--bn-images", type=int, default=256,
                    help="re-estimate the shrunk network's BatchNorm statistics on N images of --data (0: off)")
    sp.add_argument("--latency", action="store_true",
                    help="also measure the shrunk network's batch-1 latency here (the candidate's latency_ms)")
    _where(sp)
    _common(sp)


@command("shrink", _shrink_args)
def cmd_shrink(args) -> None:
    """Shrink one anchor or stitch to a MACs budget (DMS: differentiable top-k widths and depth), export and
    evaluate the pruned network; adds a "shrink" candidate to the run."""
    from composer.builders import build
    bar = tqdm(desc="shrink", unit="step", file=sys.stderr, disable=None)

    def show(e: dict) -> None:
        if e["type"] == "start":
            bar.reset(total=e["total_steps"])
        elif e["type"] == "step":
            bar.update(e["step"] - bar.n)
            bar.set_postfix(soft=f"{e['soft_macs'] / 1e6:.2f}M", target=f"{e['target'] / 1e6:.2f}M",
                            loss=f"{e['loss']:.3f}", refresh=False)
        elif e["type"] == "evaluate":
            bar.set_description(f"evaluate {e['images']} images")
        elif e["type"] == "latency":
            bar.set_description("latency")

    try:
        r = build("shrink", args.run, anchor=args.anchor, stitch=args.stitch, events=show, data=args.data,
                  target_macs=args.target_macs, steps=args.steps, eval_data=args.eval_data,
                  eval_limit=args.eval_limit, batch_size=args.batch_size, lr=args.lr, bn_images=args.bn_images,
                  seed=args.seed, workers=args.workers, latency=args.latency, device=args.device,
                  precision=args.precision).details
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"candidate": r.candidate.to_dict(), "folder": str(r.folder), "full_macs": r.full_macs,
                          "target_macs": r.target, "soft_macs": r.soft_macs, "counted_macs": r.counted_macs,
                          "top1_before": r.top1_before, "top1_after": r.top1_after,
                          "top1_exported": r.top1_exported, "bn_images": r.bn_images, "eval_images": r.eval_images,
                          "stages": r.stages, "search_seconds": r.search_seconds, "steps": r.steps}))
        return
    print(f"{r.candidate.source}: {r.full_macs / 1e6:.2f} M MACs -> target {r.target / 1e6:.2f} M")
    print(f"search: {r.steps} steps in {r.search_seconds:.0f} s, soft MACs {r.soft_macs / 1e6:.2f} M")
    print(f"exported: {r.counted_macs / 1e6:.2f} M MACs counted, {r.candidate.params / 1e6:.3f} M params")
    for s in r.stages:
        print(f"  stage {s['stage']}: {s['blocks']}/{s['of_blocks']} blocks, widths kept {100 * s['width_keep']:.0f} %")
    recal = (f", {r.top1_exported:.2f} % before re-estimating BN statistics on {r.bn_images} images"
             if r.bn_images else "")
    print(f"top-1 on {r.eval_images} images: {r.top1_before:.2f} % (anchor) -> {r.top1_after:.2f} % "
          f"(shrunk, no fine-tune{recal})")
    if r.candidate.latency_ms is not None:
        print(f"latency (batch 1, this device): {r.candidate.latency_ms:.3f} ms")
    print(f"candidate '{r.candidate.name}' added to {args.run}; network in {r.folder}")
    print("MACs: one multiply-add = 1 (FLOPs = 2 x MACs), per image.")


def _elastic_args(sp) -> None:
    sp.add_argument("run", type=Path)
    base = sp.add_mutually_exclusive_group(required=True)
    base.add_argument("--anchor", type=int, metavar="I", help="sub-networks of this anchor of the run (0 = fewest MACs)")
    base.add_argument("--stitch", type=int, metavar="ID", help="sub-networks of this stitch of the run (its route as "
                      "`export --stitch` writes it: the first D blocks of each stage, widths of its blocks)")
    sp.add_argument("--data", required=True, help="images to re-estimate BatchNorm statistics and to measure the "
                    "predictor's sample sub-networks on (disjoint seeded subsets)")
    sp.add_argument("--eval-data", help="images the chosen sub-networks are measured on (default: --data)")
    sp.add_argument("--budget-macs", type=_macs, action="append", default=[], metavar="M",
                    help="MACs per image, e.g. 68.86M (repeatable; default: 30/50/70/90 %% of the anchor's)")
    sp.add_argument("--budget-activations", type=_macs, action="append", default=[], metavar="A",
                    help="activations per image, e.g. 0.4M (repeatable)")
    sp.add_argument("--budget-latency", type=float, action="append", default=[], metavar="MS",
                    help="batch-1 latency in ms on this machine (repeatable; measures a latency table first)")
    sp.add_argument("--samples", type=_positive, default=40, help="sub-networks measured to fit the predictor (default 40)")
    sp.add_argument("--eval-limit", type=_positive, default=500, help="images per measurement (default 500)")
    sp.add_argument("--bn-images", type=int, default=1024,
                    help="images of --data (at most half) to re-estimate each sub-network's BatchNorm statistics on "
                         "(default 1024; 0 keeps the anchor's)")
    sp.add_argument("--predictor", choices=["mlp", "ridge"], default="mlp",
                    help="accuracy predictor: OFA's 3-layer MLP (default) or ridge regression")
    sp.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                    help="first fine-tune the anchor by progressive shrinking for N steps on --data (saved in the "
                         "run; later searches of this anchor use it); default 0: the run's weights as they are")
    sp.add_argument("--finetune-lr", type=float, default=0.01, help="SGD lr of the progressive-shrinking fine-tune")
    sp.add_argument("--population", type=_positive, default=64)
    sp.add_argument("--generations", type=_positive, default=20)
    sp.add_argument("--check", type=_positive, default=3,
                    help="measure this many predicted-best per budget on --data and keep the best measured (default 3)")
    _where(sp)
    _common(sp)


@command("elastic", _elastic_args)
def cmd_elastic(args) -> None:
    """Once-for-All sub-networks of one anchor or stitch: measure samples, fit an accuracy predictor, search
    each budget, measure the chosen ones; adds "elastic" candidates to the run."""
    from composer.builders import build
    if args.finetune_steps < 0 or not args.finetune_lr > 0:
        raise UserError("--finetune-steps must be >= 0 and --finetune-lr positive")
    budgets = ([("macs", v) for v in args.budget_macs] + [("activations", v) for v in args.budget_activations]
               + [("latency", v) for v in args.budget_latency])
    bar, phases = tqdm(file=sys.stderr, disable=None), []

    def show(e: dict) -> None:
        if e["type"] == "progress":
            phase = e["phase"]
            if not phases or phases[-1] != phase:   # each phase (fine-tune, latency, measure, search, verify) gets a fresh bar
                phases.append(phase)
                bar.set_description(phase)
                bar.reset(total=e["total"])
            bar.update(e["done"] - bar.n)

    try:
        result = build("elastic", args.run, anchor=args.anchor, stitch=args.stitch, events=show, data=args.data,
                       eval_data=args.eval_data, budgets=budgets, samples=args.samples, eval_limit=args.eval_limit,
                       bn_images=args.bn_images, predictor=args.predictor, finetune_steps=args.finetune_steps,
                       finetune_lr=args.finetune_lr, population=args.population, generations=args.generations,
                       check=args.check, batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                       device=args.device, precision=args.precision).details
    finally:
        bar.close()
    if result.progressive:
        ps = result.progressive
        print(f"progressive shrinking: {ps['steps']} steps, loss {ps['first_loss']:.3f} -> {ps['last_loss']:.3f}; "
              f"weights saved to {ps['path']}", file=sys.stderr)
    elif result.finetuned:
        print(f"using the progressive-shrinking weights of anchor {args.anchor} saved in the run", file=sys.stderr)
    if args.json:
        print(json.dumps({"candidates": [c.to_dict() for c in result.candidates], "predictor": result.predictor,
                          "rank_correlation": result.rank_correlation, "samples": result.samples,
                          "latency_table": result.latency.to_dict() if result.latency else None}))
        return
    print(f"{'MACs (M)':>9}  {'act. (M)':>8}  {'top-1':>6}  {'pred.':>6}  {'budget':>16}  name")
    for c in result.candidates:
        b = c.config["budget"]
        budget = f"{b['metric']} {b['value']:.4g}" if b["metric"] == "latency" else f"{b['metric'][:4]} {b['value'] / 1e6:.2f}M"
        print(f"{c.macs / 1e6:9.2f}  {c.activations / 1e6:8.3f}  {c.top1:6.2f}  {c.config['predicted_top1']:6.2f}  "
              f"{budget:>16}  {c.name}")
    rho = result.rank_correlation
    print(f"top-1 (%) measured on {result.candidates[0].config['images']} images of {args.eval_data or args.data}; "
          f"predictor ({result.predictor}) fitted on {len(result.samples)} measured sub-networks, rank correlation "
          f"(Spearman, 5-fold out-of-fold predictions) {'n/a' if rho is None else f'{rho:.3f}'}")
    print(f"{len(result.candidates)} 'elastic' candidates added to {args.run}. MACs: one multiply-add = 1, per image.")


def _where(sp, precision: bool = True) -> None:
    """--device and --precision, the same words for every command that runs networks (resolved once,
    in composer.pipeline.resolve_where / composer.device)."""
    sp.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                    help="where networks run (default auto: the GPU when there is one, else the CPU); "
                         "under torchrun each rank takes cuda:LOCAL_RANK")
    if precision:
        sp.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16",
                        help="autocast precision of the forward passes (default auto: bf16 on a GPU that supports "
                             "it, fp32 on the CPU)")


def _rank0() -> bool:
    """Whether this process prints results: one process, or rank 0 of torchrun's."""
    return os.environ.get("RANK", "0") == "0"


def _common(sp, batch_size: int | None = 64) -> None:
    sp.add_argument("--batch-size", type=_positive, default=batch_size,
                    help=None if batch_size else "default: 32 on a CPU, 64 on a GPU (composer.train.BATCH_CPU/GPU)")
    sp.add_argument("--workers", type=_natural, default=0, help="DataLoader worker processes")
    sp.add_argument("--seed", type=_integer, default=0)
    sp.add_argument("--json", action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option ends like every other bad input: one `error:` line, exit 2
    (`--help` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog.removeprefix('python -m composer').strip() or 'composer'}: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m composer",
                                description="Zoo Composer: stitch a model family into a speed/accuracy curve (SN-Net).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (arguments, fn) in COMMANDS.items():
        arguments(sub.add_parser(name, help=fn.__doc__, description=fn.__doc__))
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)   # argparse itself exits 2 with one usage line + error
    try:
        COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
