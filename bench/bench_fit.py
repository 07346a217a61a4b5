"""Least-squares fitting of the stitching layers: our streaming normal equations vs SN-Net's pinv.

On the four real CIFAR-10 ResNets (../shared) with SN-Net's default plan, for each calibration
size (images from the calib split, official test indices >= 5000):
- ours: `composer.fit.fit_stitches` (float64 normal equations accumulated batch by batch, small
  ridge, shared layers solved jointly);
- SN-Net's: keep every row of every needed activation, then per position
  `torch.linalg.pinv([X, 1]) @ Y` in float32 with pinv's default tolerance, averaging the
  solutions of positions that share a layer (as ziplab/SN-Net's `ps_inv` and
  `initialize_stitching_weights` do).
Each method runs in its own process. Reported: fit wall time (calibration images already decoded
in memory, so both start from the same tensors), peak memory above the process's resident size
just before fitting (VmHWM reset through /proc/self/clear_refs, else the high-water mark minus
that baseline), and the top-1 of every stitch on a fixed subset of the eval split (official
indices < 5000): median and worst gap to the straight line between its two anchors.
Workers use one torch thread by default: on a shared machine two threads time erratically.
Ours also runs its forward passes alone (`prefix_outputs` over the same batches, as whole batches
and as the few-image passes fit_stitches runs on CPU), taking turns with fitting --repeats times,
and prints fit / forward (medians of CPU seconds): the cost of the least squares beyond the
forward passes.

    python -m bench.bench_fit                      # 64 / 256 / 1024 images, 300 eval images, 1 thread
    python -m bench.bench_fit --calib 64 --eval-images 0   # timing and memory only
    python -m bench.bench_fit --calib 1024 --eval-images 0 --methods ours   # fit / forward passes at 1,024 images
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

METHODS = {"ours": "streaming normal equations (composer.fit)", "snnet": "SN-Net: pinv on stacked rows"}


# --- measuring inside a worker process ----------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> bool:
    """Make VmHWM restart from the current resident size (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fit_snnet_pinv(net, batches) -> None:
    """SN-Net's least-squares init: all rows stacked, float32 pinv per position, shared layers averaged."""
    import torch
    from composer.snnet import prefix_outputs

    positions = defaultdict(list)      # layer key -> [(front (anchor, unit), back (anchor, unit - 1))]
    needed = defaultdict(set)
    for s in net.plan.stitches:
        if s.is_anchor:
            continue
        f, b = s.route
        positions[s.layers[0]].append(((f.anchor, f.last), (b.anchor, b.first - 1)))
        needed[f.anchor].add(f.last)
        needed[b.anchor].add(b.first - 1)
    feats = defaultdict(list)
    with torch.no_grad():
        for x in batches:
            for key, t in prefix_outputs(net, x, needed).items():
                feats[key].append(t)
        feats = {k: torch.cat(v) for k, v in feats.items()}
        for key, poss in positions.items():
            spec = net.plan.layers[key]
            solutions = []
            for fkey, bkey in dict.fromkeys(poss):     # each position once, in order
                x, y = _rows(feats[fkey], spec.in_layout), _rows(feats[bkey], spec.out_layout)
                x1 = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
                solutions.append(torch.linalg.pinv(x1) @ y)       # (in + 1, out)
            theta = torch.stack(solutions).mean(0)
            layer = net.stitch_layers[key]
            layer.weight.copy_(theta[:-1].T)
            layer.bias.copy_(theta[-1])


def _rows(t, layout: str):
    """(N, C, H, W) -> (N*H*W, C) rows, like SN-Net's `rearrange_activations`; tokens as they are."""
    if layout == "nchw":
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1, t.shape[-1]).float()


def worker(args) -> dict:
    import torch
    from bench.cifar10 import cifar10_splits, cifar_anchor_specs
    from composer import data
    from composer.evaluate import evaluate_all
    from composer.fit import fit_stitches
    from composer.run import build_network
    from composer.snnet import prefix_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = cifar10_splits()
    net = build_network(cifar_anchor_specs())
    cfg = data.data_config(net.anchors[0])
    calib = data.subset(data.open_dataset(str(splits.calib), cfg), args.calib, seed=0)
    batches = [x for x, _ in data.loader(calib, args.batch_size)]   # decoded before any timing
    gc.collect()
    baseline = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    start_hwm = _status_kib("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    if args.method == "ours":
        fit_stitches(net, batches, ridge=args.ridge)
    else:
        fit_snnet_pinv(net, batches)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = _status_kib("VmHWM") - (baseline if exact_peak else max(baseline, start_hwm))
    out = {"method": args.method, "calib": len(calib), "fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "peak_mb": peak_kib / 1024,
           "peak_exact": exact_peak, "threads": torch.get_num_threads(), "stitches": len(net.plan.stitches) - len(net.plan.anchors)}

    if args.method == "ours":   # fitting vs its forward passes alone, side by side, taking turns
        import composer.fit as fit_mod
        needed = defaultdict(set)
        for s in net.plan.stitches:
            if not s.is_anchor:
                needed[s.route[0].anchor].add(s.route[0].last)
                needed[s.route[1].anchor].add(s.route[1].first - 1)
        keys = {(a, u) for a, us in needed.items() for u in us}
        image_bytes = 4 * sum(math.prod(fit_mod._key_shape(net.plan, k)) for k in keys)
        micro = max(1, fit_mod.MICRO_BATCH_BYTES // image_bytes)    # the images per forward pass fit_stitches runs

        def forward(step=None):
            with torch.no_grad():
                for x in batches:
                    for j in range(0, len(x), step or len(x)):
                        prefix_outputs(net, x[j:j + (step or len(x))], needed)

        runs = {"forward": forward, "fit": lambda: fit_stitches(net, batches, ridge=args.ridge),
                "forward_micro": lambda: forward(micro)}
        times = defaultdict(list)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                c0 = time.process_time()
                fn()
                times[name].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out.update(forward_s=med["forward"], forward_micro_s=med["forward_micro"], fit_rep_s=med["fit"], micro=micro,
                   repeats=args.repeats)

    if args.eval_images:
        ev = data.subset(data.open_dataset(str(splits.eval), cfg), args.eval_images, seed=0)
        res = evaluate_all(net, data.loader(ev, 250))
        out["eval_images"] = res.images
        out["top1"] = {str(k): v for k, v in res.top1.items()}
        out["plan"] = [{"id": s.id, "anchors": [g.anchor for g in s.route], "macs": net.plan.cost(s).macs}
                       for s in net.plan.stitches]
    return out


# --- the driver: one process per (size, method), then the table -----------------------------------

def gaps(result: dict) -> list[float]:
    """Top-1 of each stitch minus the straight line between its anchors' (MACs, top-1) points."""
    top1 = {int(k): v for k, v in result["top1"].items()}
    plan = {p["id"]: p for p in result["plan"]}
    anchor_of = {p["anchors"][0]: p for p in result["plan"] if len(p["anchors"]) == 1}
    out = []
    for p in result["plan"]:
        if len(p["anchors"]) == 1:
            continue
        f, b = anchor_of[p["anchors"][0]], anchor_of[p["anchors"][-1]]
        w = (p["macs"] - f["macs"]) / (b["macs"] - f["macs"])
        out.append(top1[p["id"]] - (top1[f["id"]] + w * (top1[b["id"]] - top1[f["id"]])))
    assert len(out) == len(plan) - len(anchor_of)
    return out


def run_worker(method: str, calib: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_fit", "--worker", method, "--calib", str(calib),
           "--eval-images", str(args.eval_images), "--batch-size", str(args.batch_size),
           "--ridge", str(args.ridge), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: worker {method} at {calib} images failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [f"{'calib':>6}  {'method':<44} {'fit s':>7} {'CPU s':>6} {'fwd s':>6} {'peak MB':>8} {'median top1':>11} "
             f"{'median gap':>10} {'worst gap':>9}"]
    by_size = defaultdict(dict)
    for r in results:
        by_size[r["calib"]][r["method"]] = r
    for n, rs in sorted(by_size.items()):
        for m, r in rs.items():
            acc = gap = worst = ""
            if "top1" in r:
                g = gaps(r)
                stitch_top1 = [v for k, v in r["top1"].items() if int(k) >= len(r["plan"]) - len(g)]
                acc, gap, worst = (f"{statistics.median(stitch_top1):.2f}", f"{statistics.median(g):+.2f}",
                                   f"{min(g):+.2f}")
            fwd = f"{r['forward_s']:.2f}" if "forward_s" in r else ""
            lines.append(f"{n:>6}  {METHODS[m]:<44} {r['fit_s']:7.2f} {r['fit_cpu_s']:6.2f} {fwd:>6} {r['peak_mb']:8.0f} {acc:>11} "
                         f"{gap:>10} {worst:>9}")
        if "forward_s" in rs.get("ours", {}):
            o = rs["ours"]
            lines.append(f"{n:>6}  {'  ours: fit / forward passes alone (CPU s)':<44} {o['fit_rep_s']:6.2f}  vs {o['forward_s']:.2f} "
                         f"= {o['fit_rep_s'] / o['forward_s']:.3f}x   (vs the same {o['micro']}-image forward passes fit runs: "
                         f"{o['forward_micro_s']:.2f} = {o['fit_rep_s'] / o['forward_micro_s']:.3f}x; medians of {o['repeats']})")
        if {"ours", "snnet"} <= rs.keys():
            o, s = rs["ours"], rs["snnet"]
            lines.append(f"{n:>6}  {'  SN-Net / ours':<44} {s['fit_s'] / o['fit_s']:6.2f}x {s['fit_cpu_s'] / o['fit_cpu_s']:5.2f}x {'':>6} "
                         f"{s['peak_mb'] / max(o['peak_mb'], 1):7.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", type=int, nargs="+", default=[64, 256, 1024], help="calibration sizes")
    p.add_argument("--eval-images", type=int, default=300, help="eval-split images for top-1 (0: skip)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["ours", "snnet"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ridge", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3,
                   help="ours: fit and its forward passes alone, taking turns this many times (medians of CPU s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (0: torch's default; 1 keeps timings steady on a shared machine)")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from bench.cifar10 import SharedDataMissing, cifar10_splits, cifar_anchor_specs
    try:
        cifar10_splits(), cifar_anchor_specs()   # build the cache once, outside any timing
    except SharedDataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        args.method = args.worker
        args.calib = args.calib[0]
        print(json.dumps(worker(args)))
        return 0
    results = []
    t0 = time.perf_counter()
    for n in args.calib:
        for m in args.methods:
            results.append(run_worker(m, n, args))
            print(f"  {m} at {n} images: fit {results[-1]['fit_s']:.2f} s", file=sys.stderr, flush=True)
    r0 = results[0]
    print(f"SN-Net fitting on ResNet-20/32/44/56 (CIFAR-10, {r0['stitches']} stitches), torch threads {r0['threads']}; "
          f"calibration: calib split (official test indices >= 5000, JPEG)")
    if "top1" in r0:
        anchors = [f"{r0['top1'][str(p['id'])]:.2f}" for p in r0["plan"] if len(p["anchors"]) == 1]
        print(f"top-1 on {r0['eval_images']} eval-split images (indices < 5000, JPEG); anchors {' / '.join(anchors)} %")
    print(table(results))
    print(f"fit s: wall time of fitting only (images decoded beforehand); CPU s: its process CPU time; "
          f"fwd s: forward passes alone over the same batches (ours, CPU s, median of the turns); peak MB: above the resident size before fitting; gap: stitch top-1 minus the line "
          f"between its anchors (points). Bench wall time {time.perf_counter() - t0:.0f} s.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
