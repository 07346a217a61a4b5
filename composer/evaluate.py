"""Top-1 of every stitch on a labelled set, sharing prefixes between stitches; and the one top-1 of
any plain model (`top1`, `predictions`) that the other curve builders measure with.

Per batch, each anchor's stem and units run once (as deep as any stitch needs); each stitch then
only runs its suffix: stitching layer, the next anchor's remaining units, and the head. The
predictions are those of one full forward per stitch (tested), for a fraction of the compute.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from composer.errors import UserError
from composer.snnet import StitchedNetwork, prefix_outputs


class EvaluationError(UserError):
    """Nothing to evaluate on (an empty data set); the message says so."""


@dataclass
class EvalResult:
    top1: dict[int, float]                 # stitch id -> top-1 accuracy in percent
    images: int
    predictions: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)


@torch.inference_mode()
def evaluate_all(net: StitchedNetwork, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 stitch_ids: list[int] | None = None, progress=None, *, device: torch.device | str | None = None,
                 precision: str = "fp32", distributed: bool = False) -> EvalResult:
    """Evaluate the given stitches (all by default) on (images, labels) batches.

    device: where to run (the network is moved there and stays); default: where the network is.
    precision: "fp32" / "bf16" / "fp16": forward passes under autocast on that device.
    distributed: `batches` is this rank's shard (composer.distributed.shard) and every rank of the
        default process group calls this: correct counts are summed over ranks and the predictions
        gathered in rank order, so every rank gets one process's result (a no-op without a group).
    """
    from composer.device import autocast
    from composer.distributed import all_gather_objects, all_reduce_sum, rank_world
    was_training = net.training
    if device is not None:
        net.to(device)
    net.eval()
    stitches = [net.plan.stitches[i] for i in (stitch_ids if stitch_ids is not None else range(len(net.plan.stitches)))]
    needed: dict[int, set[int]] = defaultdict(set)
    for s in stitches:
        needed[s.route[0].anchor].add(s.route[0].last)
    device = next(net.parameters()).device
    # counts and predictions stay on the device until the end: no synchronisation per stitch and batch
    correct = torch.zeros(len(stitches), dtype=torch.int64, device=device)
    preds = defaultdict(list)
    n = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(precision, device):
                outs = prefix_outputs(net, x, needed)
                for k, s in enumerate(stitches):
                    first = s.route[0]
                    logits = net.run_from(s, outs[(first.anchor, first.last)], start=first.last + 1)
                    p = logits.argmax(-1)
                    correct[k] += (p == y).sum()
                    preds[s.id].append(p)
            n += y.shape[0]
            if progress is not None:
                progress(n)
    finally:
        net.train(was_training)
    preds = {s.id: torch.cat(preds[s.id]).cpu() if preds[s.id] else torch.zeros(0, dtype=torch.int64)
             for s in stitches}
    if distributed and rank_world()[1] > 1:
        counts = all_reduce_sum(torch.cat([torch.tensor([n], dtype=torch.int64), correct.cpu()]))
        n, correct = int(counts[0]), counts[1:]
        parts = all_gather_objects(preds)
        preds = {i: torch.cat([part[i] for part in parts]) for i in preds}
    if n == 0:
        raise EvaluationError("no evaluation images: the data set is empty")
    correct = correct.tolist()
    return EvalResult({s.id: 100.0 * c / n for s, c in zip(stitches, correct)}, n, preds)


# --- one model (or a few) on labelled batches: the builders' top-1 -----------------------------------

def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of predicted classes against labels."""
    return 100.0 * int((predicted == labels).sum()) / len(labels)


@torch.inference_mode()
def predictions(models: Sequence[nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                progress: Callable[[int], None] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Predicted classes of each model (in eval mode, on the first one's device) over the same
    labelled batches, read once, and the labels; progress(images so far) after each batch."""
    models = list(models)
    device = next(models[0].parameters()).device
    for m in models:
        m.eval()
    preds: list[list[torch.Tensor]] = [[] for _ in models]
    labels, n = [], 0
    for x, y in batches:
        x = x.to(device)
        for m, p in zip(models, preds):
            p.append(m(x).argmax(-1).cpu())
        labels.append(y)
        n += len(y)
        if progress is not None:
            progress(n)
    if n == 0:
        raise EvaluationError("no evaluation images: the data set is empty")
    return [torch.cat(p) for p in preds], torch.cat(labels)


def top1(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (%) of `model` on (images, labels) batches (left in eval mode)."""
    (predicted,), labels = predictions([model], batches)
    return accuracy(predicted, labels)


@torch.inference_mode()
def evaluate_naive(net: StitchedNetwork, batches, stitch_ids: list[int] | None = None,
                   precision: str = "fp32") -> EvalResult:
    """One full forward per stitch: the reference that shared-prefix evaluation must match."""
    from composer.device import autocast
    net.eval()
    ids = stitch_ids if stitch_ids is not None else list(range(len(net.plan.stitches)))
    batches = list(batches)
    device = next(net.parameters()).device
    top1, preds = {}, {}
    for i in ids:
        net.select(i)
        with autocast(precision, device):
            p = torch.cat([net(x.to(device)).argmax(-1).cpu() for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        preds[i], top1[i] = p, 100.0 * int((p == y).sum()) / len(y)
    return EvalResult(top1, sum(len(y) for _, y in batches), preds)


def stitch_latencies(net, stitch_ids: list[int] | None = None, repeats: int = 10,
                    progress=None) -> dict[int, float]:
    """Median batch-1 latency (ms) of every stitch on the network's device (composer.costs' timer)."""
    from composer.costs import measure_latency as time_ms
    net.eval()
    device = next(net.parameters()).device
    ids = list(range(len(net.plan.stitches))) if stitch_ids is None else stitch_ids
    out = {}
    for n, i in enumerate(ids):
        # a route at its first anchor's input size (they differ only with `--resolution native`)
        x = torch.zeros(1, *net.plan.infos[net.plan.stitches[i].route[0].anchor].input_size, device=device)
        out[i] = time_ms(net.select(i), x, repeats=repeats)
        if progress is not None:
            progress(n + 1, len(ids))
    return out
