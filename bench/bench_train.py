"""Does a short fine-tune make the curve? SN-Net on the real CIFAR-10 ResNet-20/32/44/56.

Protocol: the training-set protocol of ../shared/data/README.md (see bench/cifar10.py): least-squares
fit on 256 training images and fine-tune on the 50,000 training JPEGs; evaluate on the 10,000 test
JPEGs (q75, the training images' encoding; `--eval-limit N`: a seeded subset) and on the 846 exact
(lossless) test images beside. For least squares alone and after fine-tunes with each budget
(default 2, 5, 10 and 20 minutes), every stitch is judged (composer.judge.line_gaps) against the
straight line (in MACs) between its ORIGINAL anchors, their top-1 before any fine-tune on the same
images (on the 846 exact images: the published accuracies, which the original anchors reproduce),
with each anchor's change; median, worst and the share within 1 point of that line (issue 15's
target: >= 90 % after a 10-minute train, no anchor more than 0.5 point below its original top-1;
on the exact images >= 80 %, anchors within 1 point). The line between the anchors as fine-tuned
(the same measurement) is reported beside, as "same-run line". Also steps/s and the
training-overhead ratio: one training step through a stitch of the SN-Net vs the same blocks as a
plain nn.Sequential.

Budgets are CPU time of one thread, not wall-clock time, so that the result does not depend on what
else shares the machine: a short calibration run measures the CPU seconds per step of the recipe
(single-threaded, its start-up included), and a budget of M minutes becomes M * 60 / that many steps.
On a quiet 2-core machine the fine-tune therefore takes at most M wall minutes (it uses one core of
two; `python -m composer train --time-budget M` with 2 threads does more steps in the same time).
Several budgets can run as parallel processes (`--budgets 10` in one, `--budgets 2` in another...):
each prints and writes (`--json`) its own rows; `--combine A.json B.json ...` prints one table.

    python bench/bench_train.py --budgets 10 --json /tmp/b10.json     # the target figure (10,000 + 846 images)
    python bench/bench_train.py --budgets 2 --eval-limit 1000 --no-overhead --json /tmp/b2.json   # quick
    python bench/bench_train.py --combine /tmp/b*.json                 # one table from several runs
    python bench/bench_train.py --steps 600 --eval-limit 1000 --recipe frozen_kd   # quick comparisons
    python bench/bench_train.py --steps 468 --set anchor_lr_scale=0.3 stitches_per_step=4  # any TrainConfig field
    python bench/bench_train.py --wall --threads 2 --budgets 10   # a quiet machine: `train --time-budget 10`

Recipes compared (`--recipe`; all with uniform stitch sampling unless named):
  snnet        all weights trainable, SGD momentum 0.9, lr 0.01, cosine (the notes' baseline: 29 %)
  default      whatever composer.train resolves for CNNs (TrainConfig with only the budget set)
  frozen       stitching layers only (anchors exactly as published, BN statistics fixed), SGD lr 0.05
               (diverges: a stitching layer's gradient sums over every position of every image)
  frozen_kd    as frozen, plus distillation from each route's last anchor (weight 0.5)
  frozen_adamw stitching layers only, AdamW lr 1e-3, distillation from each route's last anchor (weight 0.5):
               the anchors keep their published accuracy, so the line between them does not move
  low_anchor   all weights, AdamW lr 1e-3 for stitching layers and 1e-4 for anchors, BN statistics fixed,
               distillation from each route's last anchor (its original weights, KL weight 0.5)
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, fields as dataclass_fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.cifar10 import cifar10_splits, cifar10_train, cifar_anchor_specs, missing_shared_reason  # noqa: E402
from composer import data  # noqa: E402
from composer.judge import line_gaps  # noqa: E402
from composer.evaluate import evaluate_all  # noqa: E402
from composer.fit import calibrate_route_stats, fit_stitches  # noqa: E402
from composer.run import average_toward, build_network, load_run, save_fitted, write_evaluation  # noqa: E402
from composer.train import TrainConfig, checkpoint_step, train  # noqa: E402

RECIPES = {
    "snnet": TrainConfig(optimizer="sgd", lr=0.01, weight_decay=5e-5, anchor_lr_scale=1.0, freeze_bn=False),
    "default": TrainConfig(),
    "frozen": TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, stitch_layers_only=True),
    "frozen_kd": TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, stitch_layers_only=True, distill="anchors"),
    "low_anchor": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.0, anchor_lr_scale=0.1, freeze_bn=True,
                              distill="anchors"),
    "frozen_adamw": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.0, stitch_layers_only=True, freeze_bn=True,
                                distill="anchors"),
    "mid_anchor": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.0, anchor_lr_scale=0.3, freeze_bn=True,
                              distill="anchors"),
}


# --- measuring a curve -------------------------------------------------------------------------------

def evaluate(net, folder: Path, limit: int | None, batch: int = 250) -> dict[int, float]:
    """Top-1 of every stitch; channels_last makes the CIFAR convs ~1.3x faster on CPU."""
    ds = data.subset(data.open_dataset(str(folder), data.data_config(net.anchors[0])), limit, seed=0)
    net.to(memory_format=torch.channels_last)
    batches = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in data.loader(ds, batch))
    return evaluate_all(net, batches).top1


def summarise(plan, top1: dict[int, float], reference: dict[int, float] | None = None) -> dict:
    """The judgement (composer.judge.line_gaps) in numbers: against the line between the anchors of
    `reference` (the original anchors, same images) or, without one, of `top1` itself."""
    j = line_gaps(plan, top1, reference)
    stage = {}
    for g in j.stitches:   # the notes found late stages furthest below the line
        first = plan.stitches[g.id].route[0]
        stage.setdefault(plan.infos[first.anchor].stages[first.last], []).append(g.gap)
    out = {"median_gap": j.median, "worst_gap": j.worst.gap, "worst_stitch": j.worst.id,
           "within_1pt": j.share, "within": f"{j.within}/{j.total}",
           "median_gap_by_stage": {k: statistics.median(v) for k, v in sorted(stage.items())},
           "anchors": [top1[s.id] for s in plan.stitches if s.is_anchor],
           "stitch_median_top1": statistics.median(g.top1 for g in j.stitches)}
    if reference is not None:
        out["anchor_change"] = [a.change for a in j.anchors]
    return out


def judged(plan, top1: dict[int, float], reference: dict[int, float]) -> dict:
    """top1 (by stitch id), the judgement against the original anchors' line, and against the
    same-run line."""
    return {"top1": {str(k): v for k, v in sorted(top1.items())}, "original": summarise(plan, top1, reference),
            "same_run": summarise(plan, top1)}


def _top1(row: dict) -> dict[int, float]:
    return {int(k): v for k, v in row["top1"].items()}


# --- overhead of the SN-Net machinery in a training step --------------------------------------------

class _Stem(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.conv1, self.bn1 = m.conv1, m.bn1

    def forward(self, x):
        return torch.relu(self.bn1(self.conv1(x)))


class _Head(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.linear = m.linear

    def forward(self, x):
        return self.linear(x.mean(dim=(2, 3)))


def plain_sequential(net, stitch) -> nn.Sequential:
    """The same modules and weights as a stitch of CIFAR ResNets, as one nn.Sequential."""
    f, b = stitch.route
    fm, bm = net.anchors[f.anchor], net.anchors[b.anchor]
    layer = net.stitch_layers[stitch.layers[0]]
    conv = nn.Conv2d(layer.weight.shape[1], layer.weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[:, :, None, None])
        conv.bias.copy_(layer.bias)
    units = lambda a, m, seg: [m.get_submodule(n) for u in net.adapters[a].units[seg.first:seg.last + 1] for n in u.modules]
    return nn.Sequential(_Stem(fm), *units(f.anchor, fm, f), conv, *units(b.anchor, bm, b), _Head(bm))


def step_time(model: nn.Module, x, y, repeats: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    model.train()
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:       # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def overhead_ratio(net, repeats: int = 5) -> dict:
    """Median step time through the SN-Net / the same blocks as nn.Sequential, for a middle stitch."""
    net = copy.deepcopy(net)   # training steps on random images would spoil BN statistics
    stitches = [s for s in net.plan.stitches if not s.is_anchor]
    stitch = stitches[len(stitches) // 2]
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    seq = plain_sequential(net, stitch)
    net.select(stitch.id)
    with torch.no_grad():    # same function, checked before timing
        net.eval(), seq.eval()
        assert torch.allclose(net(x), seq(x), atol=1e-4)
    # interleave to share the machine's mood between both
    a, b = [], []
    for _ in range(3):
        a.append(step_time(net, x, y, repeats))
        b.append(step_time(seq, x, y, repeats))
    return {"stitch": stitch.id, "snnet_step_s": min(a), "sequential_step_s": min(b), "ratio": min(a) / min(b)}


# --- the benchmark -----------------------------------------------------------------------------------

def fitted_run(work: Path, specs: list[str], calib: Path, n_calib: int = 256) -> Path:
    """Least squares and per-stitch BatchNorm statistics on a seeded `n_calib` images of `calib`."""
    run = work / "fitted"
    if (run / "manifest.json").is_file():
        return run
    net = build_network(specs, True)
    ds = data.subset(data.open_dataset(str(calib), data.data_config(net.anchors[0])), n_calib, seed=0)
    fit_stitches(net, (x for x, _ in data.loader(ds, 64)))
    calibrate_route_stats(net, (x for x, _ in data.loader(ds, 64)))
    save_fitted(run, net, {"pretrained": True, "fit": {"data": str(calib), "calib": n_calib}})
    return run


def averaged(fitted, trained, alpha: float):
    """The fine-tuned SN-Net averaged toward the fitted one (`composer.run.average_toward`, what
    `train --average` gives); alpha 1 is the fine-tune, 0 least squares."""
    net = copy.deepcopy(trained)
    net.load_state_dict(average_toward(fitted.state_dict(), trained.state_dict(), alpha))
    return net


def with_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """`FIELD=VALUE` strings applied to a TrainConfig, each value parsed as the field's default type."""
    fields = {f.name: f for f in dataclass_fields(TrainConfig)}
    changes = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            sys.exit(f"error: --set takes FIELD=VALUE with FIELD one of {', '.join(fields)}; got {item!r}")
        if text.lower() in ("none", "true", "false"):
            changes[name] = {"none": None, "true": True, "false": False}[text.lower()]
        else:
            try:
                changes[name] = int(text) if text.lstrip("-").isdigit() else float(text)
            except ValueError:
                changes[name] = text
    return replace(config, **changes)


def cpu_seconds_per_step(work: Path, fitted: Path, label: str, recipe: TrainConfig, data: str, eval_data: str,
                         steps: int = 60) -> float:
    """CPU seconds (one thread) per training step of `recipe`, start-up included; cached per label."""
    cache = work / f"cpu_per_step_{label}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["cpu_s_per_step"]
    run = work / f"calibrate-{label}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(fitted, run)
    cfg = replace(recipe, steps=steps, eval_limit=50, checkpoint_every=10**9)
    c0 = time.process_time()
    train(run, data, cfg, eval_data=eval_data)
    per_step = (time.process_time() - c0) / steps
    cache.write_text(json.dumps({"cpu_s_per_step": per_step, "steps": steps, "threads": torch.get_num_threads()}))
    return per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 20],
                   help="fine-tune budgets in CPU minutes of one thread")
    p.add_argument("--steps", type=int, help="fixed step counts instead of budgets (quick recipe comparisons)")
    p.add_argument("--wall", action="store_true",
                   help="budgets are wall-clock minutes of `composer train --time-budget` with --threads threads "
                        "(for a quiet machine: what a user gets)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation (default 1)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--family", choices=("cifar", "starter"), default="cifar",
                   help="cifar: the real CIFAR-10 ResNets (../shared); starter: the built-in ViTs on their digits")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override TrainConfig fields of the recipe, e.g. --set lr=3e-3 batch_size=32")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="a seeded subset of the test JPEGs (default: all 10,000)")
    p.add_argument("--exact-for", type=float, nargs="*", default=None,
                   help="budgets (or --steps) also evaluated on the 846 lossless images (default: every one; "
                        "least squares always is; give the option alone for none)")
    p.add_argument("--no-overhead", action="store_true", help="skip the training-step overhead measurement")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_train_trainset"),
                   help="runs and caches (per protocol: the least-squares run and its evaluations are reused)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--reuse", action="store_true", help="measure a budget's run already trained in --work (by an earlier bench, or by "
                        "`composer train WORK/LABEL-wall_min-M --time-budget M` itself) without retraining it")
    p.add_argument("--average", type=float, nargs="*", default=[], metavar="ALPHA",
                   help="also measure each fine-tune averaged toward the fitted weights: fitted + ALPHA x (trained - fitted)")
    p.add_argument("--combine", type=Path, nargs="+", help="print one table from these --json files and exit")
    args = p.parse_args()
    if args.combine:
        print(table(combine([json.loads(f.read_text()) for f in args.combine])))
        return
    if args.family == "cifar" and (reason := missing_shared_reason(train=True)):
        sys.exit(f"skipped: {reason}")
    recipe = with_overrides(RECIPES[args.recipe], args.set)
    label = args.recipe + "".join(f"+{kv}" for kv in args.set)
    torch.set_num_threads(args.threads)   # 1: budgets are single-thread CPU time (see the module docstring)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.family == "starter":   # the built-in ViTs: a transformer recipe measured too (issue 15)
        from zoo.starter import ensure_starter
        specs, train_folder, test, exact_set = ensure_starter().anchors, "starter:train", "starter:val", None
        args.no_overhead = True        # the overhead measure is written for the CIFAR ResNets
    else:
        splits, train_folder = cifar10_splits(), cifar10_train()
        specs, test, exact_set = cifar_anchor_specs(), splits.test, splits.exact846
    fitted = fitted_run(args.work, specs, train_folder)
    net = load_run(fitted).net
    plan = net.plan
    eval_images = len(data.subset(data.open_dataset(str(test), data.data_config(net.anchors[0])), args.eval_limit))
    results = {"recipe": label, "config": asdict(recipe), "threads": args.threads,
               "protocol": ("starter: fit and fine-tune on starter:train, evaluate on starter:val" if args.family == "starter"
                            else "training set: fit and fine-tune on cifar10-train, evaluate on the test JPEGs"),
               "eval_images": eval_images, "runs": []}
    if not args.no_overhead:
        o = results["overhead"] = overhead_ratio(net)
        print(f"overhead: SN-Net step {o['snnet_step_s'] * 1e3:.1f} ms vs nn.Sequential "
              f"{o['sequential_step_s'] * 1e3:.1f} ms: ratio {o['ratio']:.3f}", flush=True)

    base: dict = {}

    def measure(name: str, run_net, extra: dict, exact: bool, run_dir: Path | None = None) -> dict:
        t0 = time.time()
        top1 = evaluate(run_net, test, args.eval_limit)
        if run_dir is not None:   # so that `python -m composer curve RUN` draws this evaluation
            write_evaluation(run_dir, plan, top1, str(test), eval_images, extra.get("steps", 0))
        row = {"name": name, **extra, **judged(plan, top1, _top1(base) if base else top1)}
        if exact and exact_set is not None:
            e = evaluate(run_net, exact_set, None)
            row["exact846"] = judged(plan, e, _top1(base["exact846"]) if base else e)
        row["eval_s"] = round(time.time() - t0, 1)
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top1"}), flush=True)
        return row

    cache = args.work / f"least_squares_{eval_images}.json"
    if cache.is_file():
        base = json.loads(cache.read_text())
        results["runs"].append(base)
        print(json.dumps({k: v for k, v in base.items() if k != "top1"}), flush=True)
    else:
        # the original anchors: least squares leaves them as published, so this row's anchors are the
        # reference every fine-tune is judged against (on the same images); written as the fitted
        # run's evaluation.json too, the reference for `python -m composer evaluate RUN --reference`
        base = measure("least squares", net, {"steps": 0}, exact=True, run_dir=fitted)
        cache.write_text(json.dumps(base))
    if args.steps:
        limits = [("steps", args.steps, args.steps)]
    elif args.wall:
        limits = [("wall_min", b, None) for b in args.budgets]
    else:
        per_step = results["cpu_s_per_step"] = cpu_seconds_per_step(args.work, fitted, label, recipe, str(train_folder).removesuffix(":train"),
                                                                    str(test))
        print(f"calibration: {per_step:.3f} CPU s per step ({label}, one thread)", flush=True)
        limits = [("budget_min", b, max(1, int(b * 60 / per_step))) for b in args.budgets]
    for kind, value, steps in limits:
        run = args.work / f"{label}-{kind}-{value:g}"
        done = run / "train.json"
        trained_here = json.loads(done.read_text()) if done.is_file() else (
            {"steps": checkpoint_step(run)} if checkpoint_step(run) else None)   # e.g. by `composer train` itself
        if args.reuse and trained_here and (steps is None or trained_here["steps"] == steps):
            extra = trained_here     # trained before (a killed bench, or the CLI): measure only
        else:
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(fitted, run)
            cfg = replace(recipe, steps=steps, time_budget_min=value if kind == "wall_min" else None,
                          eval_limit=50, checkpoint_every=10**9)
            t0, c0 = time.time(), time.process_time()
            r = train(run, str(train_folder).removesuffix(":train"), cfg, eval_data=str(test))
            extra = {"steps": r["step"], "steps_per_cpu_s": round(r["step"] / (time.process_time() - c0), 3),
                     "cpu_min": round((time.process_time() - c0) / 60, 2), "wall_min": round((time.time() - t0) / 60, 2)}
            if kind == "wall_min":
                extra["steps_per_wall_s"] = round(r["step"] / (time.time() - t0), 3)
            done.write_text(json.dumps(extra))
        trained = load_run(run).net
        measure(f"{label} {kind}={value:g}", trained, extra,
                      exact=args.exact_for is None or value in args.exact_for, run_dir=run)
        for alpha in args.average:   # toward the fitted weights from the weights as trained
            raw = load_run(run, average=False).net
            measure(f"{label} {kind}={value:g} averaged {alpha:g}", averaged(net, raw, alpha), extra,
                    exact=args.exact_for is None or value in args.exact_for)
        if args.json:   # after every run, so a later kill keeps the finished ones
            args.json.write_text(json.dumps(results, indent=1))
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def combine(parts: list[dict]) -> dict:
    """Several processes' results as one: least squares once, then the runs by step count."""
    out = dict(parts[0], runs=[])
    seen = set()
    for part in parts:
        for r in part["runs"]:
            if r["name"] not in seen:
                seen.add(r["name"])
                out["runs"].append(r)
        out.setdefault("overhead", part.get("overhead"))
    out["runs"].sort(key=lambda r: r["steps"])
    return out


def table(results: dict) -> str:
    """One line per run: the judgement against the original anchors' line on the test JPEGs, each
    anchor's change, the same-run line beside, and the same on the 846 exact images."""
    def change(j: dict) -> str:
        return "/".join(f"{c:+.1f}" for c in j.get("anchor_change", []))

    lines = [f"recipe {results['recipe']}, {results.get('threads', 1)} thread(s); "
             f"{results.get('protocol', 'test-half protocol')}; "
             f"{results['eval_images']} test JPEGs (and the 846 exact images where measured). "
             f"gap = top-1 minus the line (in MACs) between a stitch's ORIGINAL anchors (points); "
             f"same-run = the line between the anchors as fine-tuned; st/s = steps per CPU second "
             f"(per wall second for wall-clock budgets)",
             f"{'run':30} {'steps':>5} {'st/s':>5} | {'median':>6} {'worst':>6} {'<=1pt':>5} "
             f"{'anchors change':22} | same-run {'med':>5} {'<=1pt':>5} | exact846 {'med':>5} {'<=1pt':>5} anchors change"]
    for r in results["runs"]:
        sps = r.get("steps_per_wall_s") or r.get("steps_per_cpu_s")
        sps = f"{sps:.2f}" if sps else "-"
        o, s = r["original"], r["same_run"]
        e = r.get("exact846")
        exact = (f"{e['original']['median_gap']:+5.2f} {e['original']['within_1pt']:4.0f}% {change(e['original'])}"
                 if e else "-")
        lines.append(f"{r['name']:30} {r['steps']:>5} {sps:>5} | {o['median_gap']:+6.2f} {o['worst_gap']:+6.2f} "
                     f"{o['within_1pt']:4.0f}% {change(o):22} | same-run {s['median_gap']:+5.2f} "
                     f"{s['within_1pt']:4.0f}% | exact846 {exact}")
    base = results["runs"][0] if results["runs"] else None
    if base:
        lines.append("original anchors' top-1 (%): test JPEGs " + " / ".join(f"{a:.2f}" for a in base["original"]["anchors"])
                     + ("; 846 exact " + " / ".join(f"{a:.2f}" for a in base["exact846"]["original"]["anchors"])
                        if "exact846" in base else ""))
    if (o := results.get("overhead")):
        lines.append(f"training-step overhead (stitch {o['stitch']}, batch 64): SN-Net / nn.Sequential = {o['ratio']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
