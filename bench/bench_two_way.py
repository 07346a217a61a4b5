"""SN-Netv2 on the real CIFAR-10 ResNets: one-way vs two-way plans, low-rank vs full stitching layers,
and FLOPs-gap sampling, after the same short fine-tune.

Protocol: the training-set protocol of bench/bench_train.py (../shared/data/README.md): least squares
and per-stitch BatchNorm statistics on 256 seeded training images, a fine-tune of `--steps` steps on
the 50,000 training JPEGs (composer.train's default CNN recipe, batch 64), top-1 on a seeded subset
of the test JPEGs (`--eval-limit`, default 1,000) and on the 846 exact images. Anchors: ResNet-20
and ResNet-56 (`--depths`), the pair with the widest MACs range, whose stage depths (3 and 9) are
multiples as SN-Netv2's 12 / 24 blocks are.

Runs, all with the same steps:
  one-way          SN-Net's plan (small -> large), full stitching layers, uniform sampling
  two-way          SN-Netv2's plan (both ways, there and back), full layers, uniform sampling
  two-way rank R   the same with low-rank stitching layers (`--rank`; frozen least squares + B A + bias)
  two-way gap G    full layers, FLOPs-gap groups (`--macs-gap`, composer.plan.macs_step_groups)

Per run: the Pareto front (points on it; its area = the best top-1 within a MACs budget, integrated
over the anchors' MACs range and divided by it: the mean top-1 a user gets over that range), the
median gap to the line between the ORIGINAL anchors (composer.judge.line_gaps; their least-squares
top-1 on the same images) and the share within 1 point, the stitching layers' trained parameters
(and all trained parameters), and training steps per second (one torch thread, between the first
and last step: start-up and evaluation left out; wall and CPU).

    python bench/bench_two_way.py --steps 150 --json /tmp/two_way.json
    python bench/bench_two_way.py --steps 150 --recipe frozen --json /tmp/two_way_frozen.json
    python bench/bench_two_way.py --step-times --json /tmp/two_way_steps.json   # full vs low rank, interleaved
    python bench/bench_two_way.py --table /tmp/two_way.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_train import evaluate, summarise  # noqa: E402
from bench.cifar10 import DEPTHS, cifar10_splits, cifar10_train, cifar_anchor_specs, missing_shared_reason  # noqa: E402
from composer import data  # noqa: E402
from composer.curve import pareto_front  # noqa: E402
from composer.fit import calibrate_route_stats, fit_stitches  # noqa: E402
from composer.run import build_network, load_run, save_fitted, write_evaluation  # noqa: E402
from composer.train import TrainConfig, train  # noqa: E402


def front_area(plan, top1: dict[int, float]) -> dict:
    """Points on the Pareto front (all stitches, and those inside the anchors' MACs range), and the
    front's area: the best top-1 among stitches within a MACs budget, as a step function of the
    budget, integrated from the cheapest to the dearest anchor and divided by that range."""
    ids = sorted(top1)
    points = [(float(plan.cost(i).macs), float(top1[i])) for i in ids]
    front = [ids[k] for k in pareto_front(points)]
    anchors = [float(plan.cost(s).macs) for s in plan.stitches if s.is_anchor]
    lo, hi = min(anchors), max(anchors)
    steps = sorted((m, t) for m, t in points if m <= hi)
    area, best, at = 0.0, None, lo
    for m, t in steps:
        m = max(m, lo)
        if best is not None:
            area += best * (m - at)
        best, at = t if best is None else max(best, t), m
    area += best * (hi - at)
    inside = [i for i in front if lo <= plan.cost(i).macs <= hi]
    return {"front": front, "front_points": len(front), "front_points_in_range": len(inside),
            "area": area / (hi - lo), "macs_range": [lo, hi]}


def fitted(work: Path, specs: list[str], calib: Path, name: str, stitch_rank: int | None = None,
           n_calib: int = 256, **plan_options) -> Path:
    """Least squares and per-stitch BatchNorm statistics on a seeded `n_calib` training images."""
    run = work / f"fitted-{name}"
    if (run / "manifest.json").is_file():
        return run
    net = build_network(specs, True, stitch_rank=stitch_rank, **plan_options)
    ds = data.subset(data.open_dataset(str(calib), data.data_config(net.anchors[0])), n_calib, seed=0)
    fit_stitches(net, (x for x, _ in data.loader(ds, 64)))
    calibrate_route_stats(net, (x for x, _ in data.loader(ds, 64)))
    save_fitted(run, net, {"pretrained": True, "fit": {"data": str(calib), "calib": n_calib}})
    return run


def trained_parameters(net, config: TrainConfig) -> dict:
    """Parameters a fine-tune with `config` updates: the stitching layers' and all (anchors frozen
    with stitch_layers_only)."""
    stitch = sum(p.numel() for n, p in net.named_parameters() if n.startswith("stitch_layers.") and p.requires_grad)
    total = sum(p.numel() for n, p in net.named_parameters()
                if p.requires_grad and not (config.stitch_layers_only and n.startswith("anchors.")))
    return {"stitch_params": stitch, "trained_params": total}


def timed_train(run: Path, train_folder: Path, eval_folder: Path, config: TrainConfig) -> dict:
    """Train; steps per wall and per CPU second between the first and the last step."""
    marks = []

    def events(e: dict) -> None:
        if e["type"] == "step":
            marks.append((time.monotonic(), time.process_time()))

    result = train(run, str(train_folder), config, events=events, eval_data=str(eval_folder))
    n = len(marks) - 1
    return {"steps": result["step"], "status": result["status"],
            "steps_per_s": round(n / (marks[-1][0] - marks[0][0]), 3) if n > 0 else None,
            "steps_per_cpu_s": round(n / (marks[-1][1] - marks[0][1]), 3) if n > 0 else None}


def step_times(full, low, repeats: int = 5, rounds: int = 4) -> dict:
    """Seconds per training step (batch 64, a route there and back, channels_last as training runs
    CNNs) through full and low-rank stitching layers, the two interleaved so that both see the same
    load on a shared machine (the best of `rounds` medians, the order alternating); with the anchors
    trained and frozen."""
    from bench.bench_train import step_time
    three = [s.id for s in full.plan.stitches if len(s.route) == 3]
    sid = three[len(three) // 2]
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    out = {"stitch": sid, "route": full.plan.describe_route(sid)}
    for frozen in (False, True):
        for net in (full, low):
            net.to(memory_format=torch.channels_last).select(sid)
            net.anchors.requires_grad_(not frozen)
        a, b = [], []
        for r in range(rounds):   # which one goes first alternates, so neither gains from its place
            for net, times in ((full, a), (low, b))[::1 if r % 2 else -1]:
                times.append(step_time(net, x, y, repeats))
        out["frozen" if frozen else "default"] = {"full_s": min(a), "low_rank_s": min(b), "ratio": min(b) / min(a)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="fine-tune steps of every run")
    p.add_argument("--depths", type=int, nargs=2, default=[20, 56], help="the two CIFAR ResNets")
    p.add_argument("--recipe", choices=["default", "frozen"], default="default",
                   help="default: composer.train's CNN recipe (anchors train too); frozen: stitching layers (and "
                        "each stitch's own BatchNorm parameters) only, the anchors stay as published")
    p.add_argument("--rank", type=int, default=4, help="rank of the low-rank stitching layers")
    p.add_argument("--macs-gap", type=float, default=10e6, help="MACs step of the FLOPs-gap groups")
    p.add_argument("--eval-limit", type=int, default=1000, help="seeded subset of the 10,000 test JPEGs")
    p.add_argument("--runs", nargs="+", default=["one-way", "two-way", "rank", "gap"],
                   help="which of: one-way two-way rank gap")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_two_way"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--table", type=Path, help="print the table of a --json file and exit")
    p.add_argument("--step-times", action="store_true",
                   help="only time training steps through full and low-rank layers, interleaved (see step_times)")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if (reason := missing_shared_reason(train=True)):
        sys.exit(f"skipped: {reason}")
    torch.set_num_threads(1)   # steps/s of one thread: the machine is shared
    args.work.mkdir(parents=True, exist_ok=True)
    splits, train_folder = cifar10_splits(), cifar10_train()
    all_specs = cifar_anchor_specs()
    specs = [all_specs[DEPTHS.index(d)] for d in args.depths]
    recipe = TrainConfig(steps=args.steps, eval_limit=50, checkpoint_every=10**9,
                         stitch_layers_only=args.recipe == "frozen")
    results = {"anchors": [f"resnet{d}" for d in args.depths], "steps": args.steps, "threads": 1,
               "recipe": args.recipe,
               "eval_images": args.eval_limit, "config": asdict(recipe), "runs": []}
    plans = {"one-way": {}, "two-way": {"two_way": True}}
    if args.step_times:
        full = load_run(fitted(args.work, specs, train_folder, "two-way", None, two_way=True)).net
        low = load_run(fitted(args.work, specs, train_folder, f"two-way-r{args.rank}", args.rank, two_way=True)).net
        results = {"anchors": results["anchors"], "rank": args.rank, "step_times": step_times(full, low)}
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    runs = {"one-way": ("one-way", None, recipe), "two-way": ("two-way", None, recipe),
            "rank": ("two-way", args.rank, recipe),
            "gap": ("two-way", None, replace(recipe, sampling="flops_gap", macs_gap=args.macs_gap))}
    base = {}
    for kind in args.runs:
        plan_name, rank, config = runs[kind]
        name = {"rank": f"two-way rank {args.rank}", "gap": f"two-way gap {args.macs_gap / 1e6:g}M"}.get(kind, kind)
        fit_run = fitted(args.work, specs, train_folder, plan_name + (f"-r{rank}" if rank else ""), rank,
                         **plans[plan_name])
        if plan_name not in base:   # least squares: the original anchors' top-1 is every run's reference
            net = load_run(fit_run).net
            cache = args.work / f"least_squares-{plan_name}-{args.eval_limit}.json"
            if cache.is_file():
                base[plan_name] = {k: {int(i): v for i, v in d.items()} for k, d in json.loads(cache.read_text()).items()}
            else:
                base[plan_name] = {"test": evaluate(net, splits.test, args.eval_limit),
                                   "exact": evaluate(net, splits.exact846, None)}
                cache.write_text(json.dumps(base[plan_name]))
            results["runs"].append(row(f"{plan_name} least squares", net, base[plan_name], base[plan_name],
                                       {"steps": 0, **trained_parameters(net, config)}))
            print(json.dumps(short(results["runs"][-1])), flush=True)
        run = args.work / f"trained-{args.recipe}-{kind}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(fit_run, run)
        extra = timed_train(run, train_folder, splits.test, config)
        # the recipe as training resolved it (family defaults filled in)
        results.setdefault("resolved", {})[name] = json.loads((run / "manifest.json").read_text())["train"]["config"]
        net = load_run(run).net
        top1 = {"test": evaluate(net, splits.test, args.eval_limit), "exact": evaluate(net, splits.exact846, None)}
        write_evaluation(run, net.plan, top1["test"], str(splits.test), args.eval_limit, args.steps)
        results["runs"].append(row(name, net, top1, base[plan_name], {**extra, **trained_parameters(net, config)}))
        print(json.dumps(short(results["runs"][-1])), flush=True)
        if args.json:   # after every run, so a later kill keeps the finished ones
            args.json.write_text(json.dumps(results, indent=1))
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def row(name: str, net, top1: dict, reference: dict, extra: dict) -> dict:
    plan = net.plan
    out = {"name": name, "stitches": len(plan.stitches), **extra}
    for split in ("test", "exact"):
        judged = summarise(plan, top1[split], reference[split])
        out[split] = {**front_area(plan, top1[split]), "median_gap": judged["median_gap"],
                      "within_1pt": judged["within_1pt"], "anchors": judged["anchors"],
                      "top1": {str(k): v for k, v in sorted(top1[split].items())}}
    return out


def short(r: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk not in ("top1", "front")} if isinstance(v, dict) else v)
            for k, v in r.items()}


def table(results: dict) -> str:
    lines = [f"anchors {' + '.join(results['anchors'])}, recipe {results.get('recipe', 'default')}, "
             f"{results['steps']} steps, one thread; "
             f"{results['eval_images']} test JPEGs | 846 exact images. front = points on the Pareto front "
             "(inside the anchors' MACs range); area = mean best top-1 within a MACs budget over that range; "
             "gap = median gap to the original anchors' line; st/s = steps per wall (CPU) second",
             f"{'run':22} {'routes':>6} {'steps':>5} {'stitch params':>13} {'trained':>9} {'st/s':>11} | "
             f"{'front':>7} {'area':>6} {'gap':>6} {'<=1pt':>5} | {'front':>7} {'area':>6} {'gap':>6} {'<=1pt':>5}"]
    for r in results["runs"]:
        sps = f"{r['steps_per_s']:.2f} ({r['steps_per_cpu_s']:.2f})" if r.get("steps_per_s") else "-"
        cells = []
        for split in ("test", "exact"):
            s = r[split]
            cells.append(f"{s['front_points']:>3} ({s['front_points_in_range']:>2}) {s['area']:6.2f} "
                         f"{s['median_gap']:+6.2f} {s['within_1pt']:4.0f}%")
        lines.append(f"{r['name']:22} {r['stitches']:>6} {r['steps']:>5} {r['stitch_params']:>13,} "
                     f"{r['trained_params']:>9,} {sps:>11} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
