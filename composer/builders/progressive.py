"""Once-for-All's progressive shrinking, short: fine-tune one anchor's shared weights so that its
sub-networks (composer.builders.elastic) work without training each of them.

Every step trains two sub-networks on one batch: the smallest of the current phase and a random
one, each with cross-entropy plus distillation from the anchor as it was before the fine-tune (OFA
distils from its full network). Phases follow OFA's order: elastic depth first (widths kept
whole), then depth and width together. The weights are shared, so a step moves every sub-network;
sub-networks run inside the full model through 0/1 masks (`composer.builders.subnet.masked`, equal to the
extracted network), and their BatchNorm statistics are re-estimated when they are measured, as OFA
does.

The fine-tuned, importance-sorted weights go to RUN/elastic/anchorI.safetensors; from then on
`composer.builders.elastic.anchor_of_run` builds the run's anchor I with them, and every candidate records
the digest of the weights it was measured with (`weights`, and the file's in `finetuned`).
"""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from composer.builders.elastic import WIDTH_CHOICES, Arch, ElasticAnchor, ElasticError, finetuned_path, smallest_arch
from composer.builders.source import weights_digest
from composer.data import forever
from composer.io import save_safetensors_atomic
from composer.builders.subnet import ElasticSpace, config_masks, masked

Events = Callable[[dict], None]


def arch_masks(space: ElasticSpace, arch: Arch) -> tuple[Callable, Callable]:
    """The (width, depth) mask functions `masked` takes for one architecture: the first units of
    every (importance-sorted) width, and 0 on the residual branch of every block not kept."""
    return config_masks(space, arch.config(space))


def _phase_arch(space: ElasticSpace, phase: str, rnd: random.Random | None, choices) -> Arch:
    """The smallest (rnd None) or a random architecture of a phase: "depth" keeps widths whole."""
    n_dims = len(space.dims())
    if rnd is None:
        small = smallest_arch(space, choices)
        return small if phase == "width" else Arch(small.depth, (1.0,) * n_dims)
    depth = tuple(rnd.randint(1, len(space.stage_blocks(s))) for s in range(space.num_stages))
    width = tuple(rnd.choice(choices) for _ in range(n_dims)) if phase == "width" else (1.0,) * n_dims
    return Arch(depth, width)


def progressive_shrink(anchor: ElasticAnchor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                       lr: float = 0.01, seed: int = 0, choices=WIDTH_CHOICES, label_smoothing: float = 0.1,
                       events: Events | None = None, cancel=None, precision: str = "fp32") -> dict:
    """Fine-tune `anchor.model` in place for `steps` steps over `batches` (cycled), on the model's
    device with forward passes under `precision`'s autocast; returns {"steps", "first_loss",
    "last_loss"} (mean loss of the first and last tenth of the steps)."""
    from composer.device import autocast
    if steps < 1:
        raise ElasticError(f"progressive shrinking needs at least 1 step, got {steps}")
    if anchor.stitch is not None:   # its weights would have no home in the run (save_finetuned is per anchor)
        raise ElasticError(f"progressive shrinking works on an anchor, not on a stitch yet (stitch {anchor.stitch})")
    model, space = anchor.model, anchor.space
    device = next(model.parameters()).device
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    rnd = random.Random(seed)
    stream = forever(batches, ElasticError("no images to fine-tune on"))
    losses = []
    model.train()
    try:
        for step in range(steps):
            if cancel is not None and cancel.is_set():
                break
            phase = "depth" if step < steps // 2 else "width"
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), autocast(precision, device):
                target = F.log_softmax(teacher(x).float(), -1)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for arch in (_phase_arch(space, phase, None, choices), _phase_arch(space, phase, rnd, choices)):
                width_masks, depth_masks = arch_masks(space, arch)
                with masked(model, space, width_masks, depth_masks), autocast(precision, device):
                    logits = model(x).float()
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing) + F.kl_div(
                    F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
                (loss / 2).backward()
                total += float(loss.detach()) / 2
            opt.step()
            losses.append(total)
            if events is not None:
                events({"type": "progress", "phase": f"fine-tune ({phase})", "done": step + 1, "total": steps,
                        "loss": total})
    finally:
        model.eval()
    if not losses:
        raise ElasticError("progressive shrinking was cancelled before its first step")
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "first_loss": sum(losses[:tenth]) / tenth,
            "last_loss": sum(losses[-tenth:]) / tenth}


def save_finetuned(run_dir, anchor: ElasticAnchor) -> Path:
    """Write the fine-tuned anchor where `anchor_of_run` finds it; the anchor records the file's
    digest and that of the weights it now runs (what its candidates are measured with)."""
    import hashlib
    path = finetuned_path(run_dir, anchor.index or 0)
    save_safetensors_atomic(path, {k: v.contiguous() for k, v in anchor.model.state_dict().items()})
    anchor.finetuned = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    anchor.weights = weights_digest(anchor.model)
    return path
