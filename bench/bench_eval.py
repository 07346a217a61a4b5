"""Evaluating every stitch: shared prefixes (`evaluate_all`) vs one forward per stitch (`evaluate_naive`).

On the four real CIFAR-10 ResNets (../shared), SN-Net's default plan, stitching layers fitted on 64
calibration images (so predictions are meaningful), the same decoded eval-split images for both
(official test indices < 5000), the two methods taking turns batch by batch. Prints the wall and
CPU time of each, the ratio, the ratio of MACs the two ways compute, and checks that every
stitch's predictions are identical.

    python -m bench.bench_eval                  # 500 eval images, all 40 networks
    python -m bench.bench_eval --images 1000 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict


def compute_macs(plan) -> tuple[int, int]:
    """Per image: MACs of one full forward per stitch, and of the shared-prefix schedule
    (each anchor once, as deep as any stitch leaves it, then every stitch's suffix)."""
    naive = sum(plan.cost(s).macs for s in plan.stitches)
    deepest: dict[int, int] = {}
    shared = 0
    for s in plan.stitches:
        first, last = s.route[0], s.route[-1]
        deepest[first.anchor] = max(deepest.get(first.anchor, -1), first.last)
        suffix = plan.cost(s).macs - plan.infos[first.anchor].stem.macs
        suffix -= sum(plan.infos[first.anchor].units[u].macs for u in range(first.first, first.last + 1))
        shared += suffix
    for a, last in deepest.items():
        info = plan.infos[a]
        shared += info.stem.macs + sum(info.units[u].macs for u in range(last + 1))
    return naive, shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="eval-split images")
    p.add_argument("--calib", type=int, default=64, help="calibration images for the stitching layers")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch
    from bench.cifar10 import SharedDataMissing, cifar10_splits, cifar_anchor_specs
    from composer import data
    from composer.evaluate import evaluate_all, evaluate_naive
    from composer.fit import fit_stitches
    from composer.run import build_network

    try:
        splits, specs = cifar10_splits(), cifar_anchor_specs()
    except SharedDataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    net = build_network(specs)
    cfg = data.data_config(net.anchors[0])
    calib = data.subset(data.open_dataset(str(splits.calib), cfg), args.calib, seed=0)
    fit_stitches(net, (x for x, _ in data.loader(calib, 64)))
    ev = data.subset(data.open_dataset(str(splits.eval), cfg), args.images, seed=0)
    batches = list(data.loader(ev, args.batch_size))     # decoded once, outside the timings

    # The two methods take turns batch by batch (ABBA...), so a change in others' load on a shared
    # machine falls on both alike; CPU seconds are shown beside wall seconds for the same reason.
    methods = {"shared": evaluate_all, "naive": evaluate_naive}
    wall, cpu = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
    preds = {m: defaultdict(list) for m in methods}
    for i, batch in enumerate(batches):
        for m in (("shared", "naive") if i % 2 == 0 else ("naive", "shared")):
            t0, c0 = time.perf_counter(), time.process_time()
            res = methods[m](net, [batch])
            wall[m] += time.perf_counter() - t0
            cpu[m] += time.process_time() - c0
            for k, v in res.predictions.items():
                preds[m][k].append(v)
    shared_s, naive_s, shared_cpu, naive_cpu = wall["shared"], wall["naive"], cpu["shared"], cpu["naive"]
    images = sum(len(y) for _, y in batches)

    ids = range(len(net.plan.stitches))
    same = all(torch.equal(torch.cat(preds["shared"][i]), torch.cat(preds["naive"][i])) for i in ids)
    naive_macs, shared_macs = compute_macs(net.plan)
    n = len(net.plan.stitches)
    print(f"Evaluating all {n} networks ({len(net.plan.anchors)} anchors + {n - len(net.plan.anchors)} stitches) of "
          f"ResNet-20/32/44/56 on {images} CIFAR-10 eval-split images (JPEG, official indices < 5000), "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"{'method':<40} {'wall s':>8} {'CPU s':>8} {'images/s x nets':>16} {'GMACs / image':>14}")
    print(f"{'one forward per stitch (evaluate_naive)':<40} {naive_s:8.1f} {naive_cpu:8.1f} "
          f"{images * n / naive_s:16.0f} {naive_macs / 1e9:14.3f}")
    print(f"{'shared prefixes (evaluate_all)':<40} {shared_s:8.1f} {shared_cpu:8.1f} "
          f"{images * n / shared_s:16.0f} {shared_macs / 1e9:14.3f}")
    print(f"{'speed-up (naive / shared)':<40} {naive_s / shared_s:7.2f}x {naive_cpu / shared_cpu:7.2f}x {'':>16} "
          f"{naive_macs / shared_macs:13.2f}x")
    print(f"predictions identical for all {n} networks: {same}")
    if not same:
        bad = [i for i in ids if not torch.equal(torch.cat(preds['shared'][i]), torch.cat(preds['naive'][i]))]
        print(f"error: predictions differ for stitches {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
