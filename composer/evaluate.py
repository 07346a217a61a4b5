"""Top-1 of every stitch on a labelled set, sharing prefixes between stitches.

Per batch, each anchor's stem and units run once (as deep as any stitch needs); each stitch then
only runs its suffix: stitching layer, the next anchor's remaining units, and the head. The
predictions are those of one full forward per stitch (tested), for a fraction of the compute.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch

from composer.snnet import StitchedNetwork, prefix_outputs

@dataclass
class EvalResult:
    top1: dict[int, float]                 # stitch id -> top-1 accuracy in percent
    images: int
    predictions: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)


@torch.inference_mode()
def evaluate_all(net: StitchedNetwork, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 stitch_ids: list[int] | None = None, progress=None) -> EvalResult:
    """Evaluate the given stitches (all by default) on (images, labels) batches."""
    was_training = net.training
    net.eval()
    stitches = [net.plan.stitches[i] for i in (stitch_ids if stitch_ids is not None else range(len(net.plan.stitches)))]
    needed: dict[int, set[int]] = defaultdict(set)
    for s in stitches:
        needed[s.route[0].anchor].add(s.route[0].last)
    device = next(net.parameters()).device
    correct = {s.id: 0 for s in stitches}
    preds = defaultdict(list)
    n = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            outs = prefix_outputs(net, x, needed)
            for s in stitches:
                first = s.route[0]
                logits = net.run_from(s, outs[(first.anchor, first.last)], start=first.last + 1)
                p = logits.argmax(-1)
                correct[s.id] += int((p == y).sum())
                preds[s.id].append(p.cpu())
            n += y.shape[0]
            if progress is not None:
                progress(n)
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("no evaluation images: the data set is empty")
    return EvalResult({i: 100.0 * c / n for i, c in correct.items()}, n,
                      {i: torch.cat(v) for i, v in preds.items()})


@torch.inference_mode()
def evaluate_naive(net: StitchedNetwork, batches, stitch_ids: list[int] | None = None) -> EvalResult:
    """One full forward per stitch: the reference that shared-prefix evaluation must match."""
    net.eval()
    ids = stitch_ids if stitch_ids is not None else list(range(len(net.plan.stitches)))
    batches = list(batches)
    top1, preds = {}, {}
    for i in ids:
        net.select(i)
        p = torch.cat([net(x).argmax(-1).cpu() for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        preds[i], top1[i] = p, 100.0 * int((p == y).sum()) / len(y)
    return EvalResult(top1, sum(len(y) for _, y in batches), preds)


def stitch_latencies(net, stitch_ids: list[int] | None = None, repeats: int = 10,
                    progress=None) -> dict[int, float]:
    """Median batch-1 latency (ms) of every stitch on the network's device (composer.costs' timer)."""
    from composer.costs import measure_latency as time_ms
    net.eval()
    x = torch.zeros(1, *net.plan.infos[0].input_size, device=next(net.parameters()).device)
    ids = list(range(len(net.plan.stitches))) if stitch_ids is None else stitch_ids
    out = {}
    for n, i in enumerate(ids):
        out[i] = time_ms(net.select(i), x, repeats=repeats)
        if progress is not None:
            progress(n + 1, len(ids))
    return out
