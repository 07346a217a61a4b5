"""Differentiable Model Scaling (DMS, ICML 2024, arXiv 2405.07194): shrink one pretrained network
to a MACs budget by learning how many units of every width (and how many residual blocks) to keep.

The core, in four formulas (see ../shared/notes/methods.md):
- every prunable dimension of N units (channels, hidden units, heads; or the skippable blocks of a
  stage) has importance scores c, normalised by rank to uniform: c'_i = mean_j 1[c_i >= c_j];
- its soft mask is a differentiable top-k: m_i = sigmoid(lambda * N * (c'_i - a)), with a in [0, 1]
  the learnable pruning ratio of that dimension. Exactly #(m >= 0.5) = N - ceil(aN) + 1 units are
  kept (for a > 0): always at least one. If all importances are equal every mask is 1;
- importance is Taylor's, as a moving average over steps: t <- 0.99 t + 0.01 (m * dL/dm)^2;
- a resource loss log(F_soft / T) when the soft MACs F_soft exceed the target T (else 0), with F_soft
  `composer.builders.subnet`'s exact cost polynomial (linear in each width's kept count and each block's
  keep mask) evaluated at the soft counts sum(m) and the soft block masks.

The search is "DMS_p-": weights and BN statistics frozen, only the ratios a are trained (Adam), for
a few hundred steps of task loss (cross-entropy on the user's labelled images) + resource loss,
the resource gradient normalised against the task gradient (`_Balance`) and the target lowered
geometrically over the first half (DMS's "root" schedule). Export keeps the units whose hard mask
is 1 (ratios shifted so that the counted MACs meet the target, `fit_hard`): each width is permuted
so they come first, `composer.builders.subnet.extract` cuts the network, dropped blocks become what
x + 0 * f(x) leaves (x, or the block's activation after the sum). `shrink_anchor` then re-estimates the BN statistics, evaluates, saves and
adds the candidate to the run.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from composer import checks
from composer.candidates import Candidate
from composer.run import add_candidates
from composer.costs import measure_latency, model_cost
from composer.data import forever
from composer.builders.elastic import FORMAT as SUBNET_FORMAT
from composer.builders.elastic import recalibrate_bn
from composer.builders.source import BuildResult, resolve_source
from composer.errors import UserError
from composer.evaluate import top1
from composer.io import save_safetensors_atomic, write_json_atomic
from composer.builders.subnet import (ElasticSpace, SubnetConfig, elastic_space, extract, masked, permute_, soft_cost,
                             subnet_cost)

DECAY = 0.99            # Taylor moving average (DMS)
LAMBDA = 1.0            # mask sharpness for widths (DMS's code: 1)
LAMBDA_DEPTH = 4.0      # and for blocks (DMS's code: 4): with N = 2..8 blocks a lambda of 1 would
                        # scale even the most important residual branch by sigmoid(1..2) < 0.9


class ShrinkError(UserError):
    """A shrink that cannot be done as asked (bad target, unknown anchor, ...); the message says why."""


# --- the differentiable top-k --------------------------------------------------------------------

def rank_normalise(scores: torch.Tensor) -> torch.Tensor:
    """c'_i = mean_j 1[c_i >= c_j]: the scores' ranks spread uniformly over (0, 1]; the largest is 1."""
    return (scores[:, None] >= scores[None, :]).to(torch.get_default_dtype()).mean(dim=1)


def soft_mask(scores: torch.Tensor, a: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """DMS's differentiable top-k: sigmoid(lam * N * (c' - a)); differentiable in `a` (not in the
    scores, which only rank). Equal scores carry no ranking, so every unit is kept (mask 1),
    still connected to `a` so that the graph (and Taylor's dL/dm) exists."""
    n = scores.numel()
    if n == 1 or bool((scores == scores[0]).all()):
        return torch.ones_like(scores, dtype=a.dtype) + 0 * a
    return torch.sigmoid(lam * n * (rank_normalise(scores).to(a.dtype) - a))


def hard_mask(scores: torch.Tensor, a: torch.Tensor | float, lam: float = LAMBDA) -> torch.Tensor:
    """The units export keeps: m >= 0.5 (bool)."""
    a = torch.as_tensor(a, dtype=torch.get_default_dtype())
    with torch.no_grad():
        return soft_mask(scores, a, lam) >= 0.5


def keep_count(n: int, a: float) -> int:
    """How many units the hard mask keeps for distinct scores: c'_i >= a holds for the ranks
    k/N >= a, i.e. N - ceil(aN) + 1 of them (N when a = 0)."""
    return min(n, n - math.ceil(a * n) + 1)


def resource_loss(soft_macs: torch.Tensor, target: float) -> torch.Tensor:
    """log(F_soft / T) above the target, 0 at or below it (no reward for undershooting)."""
    if float(soft_macs.detach()) > target:
        return torch.log(soft_macs / target)
    return soft_macs * 0


def update_taylor(taylor: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, decay: float = DECAY) -> None:
    """t <- decay t + (1 - decay) (m * dL/dm)^2, in place. A step whose values are all equal (e.g. a
    zero gradient) carries no ranking and is skipped, as DMS's code does."""
    new = (mask.detach() * grad.detach()) ** 2
    if torch.isfinite(new).all() and new.max() > new.min():
        taylor.mul_(decay).add_(new.to(taylor.dtype), alpha=1 - decay)


# --- the masks of one network --------------------------------------------------------------------

@dataclass
class TopK:
    """One DMS dimension: a width (its units), or the droppable blocks of a stage (one unit each)."""
    key: str                 # the WidthDim key, or "stage<s>.depth"
    size: int
    blocks: list[int] = field(default_factory=list)   # depth: the ElasticSpace blocks, in order

    @property
    def is_depth(self) -> bool:
        return bool(self.blocks)


def topks(space: ElasticSpace) -> list[TopK]:
    """Every width, then per stage the skippable blocks after its first (which always runs)."""
    out = [TopK(d.key, d.size) for d in space.dims() if d.size > 1]
    for s in range(space.num_stages):
        blocks = [b for b in space.stage_blocks(s)[1:] if space.blocks[b].skippable]
        if blocks:
            out.append(TopK(f"stage{s}.depth", len(blocks), blocks))
    return out


class Masks:
    """The learnable state of a DMS search: a pruning ratio a and Taylor importances per top-k."""

    def __init__(self, space: ElasticSpace):
        self.space = space
        self.topks = topks(space)
        self.ratio = torch.zeros(len(self.topks), requires_grad=True)   # a = 0: keep everything
        self.taylor = [torch.zeros(t.size) for t in self.topks]

    def soft(self) -> list[torch.Tensor]:
        """One soft mask per top-k, each keeping its gradient for the Taylor update."""
        masks = []
        for i, t in enumerate(self.topks):
            m = soft_mask(self.taylor[i], self.ratio[i], LAMBDA_DEPTH if t.is_depth else LAMBDA)
            m.retain_grad()
            masks.append(m)
        return masks

    def hard(self, width_shift: float = 0.0, depth_shift: float = 0.0) -> list[torch.Tensor]:
        """The 0/1 masks export keeps (m >= 0.5), the widths' and the blocks' ratios shifted by
        `width_shift` / `depth_shift` (then clamped to [0, 1])."""
        with torch.no_grad():
            return [hard_mask(self.taylor[i], float((self.ratio[i] + (depth_shift if t.is_depth else width_shift))
                                                    .clamp(0, 1)))
                    for i, t in enumerate(self.topks)]

    def update_taylor(self, masks: list[torch.Tensor]) -> None:
        for t, m in zip(self.taylor, masks):
            if m.grad is not None:
                update_taylor(t, m, m.grad)

    def lookups(self, masks: list[torch.Tensor]):
        """(width mask of a WidthDim key, depth mask of a block) as `subnet.masked` asks for them."""
        widths = {t.key: m for t, m in zip(self.topks, masks) if not t.is_depth}
        depth = {b: m[j] for t, m in zip(self.topks, masks) if t.is_depth for j, b in enumerate(t.blocks)}
        return widths.get, depth.get

    def soft_macs(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """F_soft: subnet's exact cost polynomial at the kept counts sum(m) and block masks m."""
        widths = {t.key: m.sum() for t, m in zip(self.topks, masks) if not t.is_depth}
        keep = {b: m[j] for t, m in zip(self.topks, masks) if t.is_depth for j, b in enumerate(t.blocks)}
        return torch.as_tensor(soft_cost(self.space, widths, keep)["macs"], dtype=torch.float64)

    def config(self, hard: list[torch.Tensor]) -> SubnetConfig:
        """The static sub-network of 0/1 masks (after `order` has put the kept units first)."""
        widths = {t.key: int(m.sum()) for t, m in zip(self.topks, hard) if not t.is_depth}
        skip = [b for t, m in zip(self.topks, hard) if t.is_depth for b, k in zip(t.blocks, m.tolist()) if not k]
        return SubnetConfig(self.space.full_config().depth, widths, sorted(skip))

    def order(self, hard: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per width, a permutation putting the kept units first (each group in its original order)."""
        return {t.key: torch.argsort(m.to(torch.int8), descending=True, stable=True)
                for t, m in zip(self.topks, hard) if not t.is_depth}

    def keep_ratios(self, masks: list[torch.Tensor]) -> dict[str, float]:
        return {t.key: float(m.detach().sum()) / t.size for t, m in zip(self.topks, masks)}


# --- the search ----------------------------------------------------------------------------------

@dataclass
class SearchResult:
    masks: Masks
    target: int
    full_macs: int
    soft_macs: float          # at the last step
    steps: int
    seconds: float
    history: list[dict]       # per step: soft MACs, scheduled target, losses


def scheduled_target(step: int, steps: int, full: float, target: float, ramp: float) -> float:
    """DMS's "root" schedule: the target falls geometrically from the full MACs to the final target
    over the first `ramp` fraction of the steps, then stays: a gentle squeeze lets the Taylor
    importances settle before many units go."""
    n = max(1, round(ramp * steps))
    return full * (target / full) ** min(1.0, step / n)


def search(model: nn.Module, space: ElasticSpace, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
           target: float, steps: int = 200, lr: float = 0.01, ramp: float = 0.5,
           events: Callable[[dict], None] | None = None, cancel=None, precision: str = "fp32") -> SearchResult:
    """Learn the pruning ratios (weights and BN statistics frozen) for `steps` batches of
    cross-entropy + log(F_soft / T) resource loss. `batches` is cycled; `cancel` (a threading.Event)
    stops after the current step. Emits {"type": "step", ...} events for a live display. The model's
    forward runs on its own device under `precision`'s autocast; the ratios and the resource loss stay
    float32 / float64 on the CPU."""
    from composer.device import autocast
    full = float(soft_cost(space)["macs"])
    check_target(space, target)
    masks = Masks(space)
    opt = torch.optim.Adam([masks.ratio], lr=lr)
    balance = _Balance()
    events = events or (lambda e: None)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()                      # BN uses its running statistics: the exported net is the searched one
    for p, _ in frozen:
        p.requires_grad_(False)       # no weight gradients: only activations' (cheaper)
    device = next(model.parameters()).device
    history, soft, start, step = [], full, time.perf_counter(), 0
    try:
        data = forever(batches, ShrinkError("no images to search on: the data set is empty"))
        for step in range(1, steps + 1):
            x, y = next(data)
            m = masks.soft()
            width_of, depth_of = masks.lookups(m)
            f_soft = masks.soft_macs(m)
            t_now = scheduled_target(step, steps, full, target, ramp)
            with masked(model, space, width_of, depth_of), autocast(precision, device):
                task = F.cross_entropy(model(x.to(device)).float(), y.to(device))
            res = resource_loss(f_soft, t_now)
            loss = task.cpu() + res.to(task.dtype)
            opt.zero_grad()
            over = res.requires_grad and float(res.detach()) > 0
            g_res = torch.autograd.grad(res, masks.ratio, retain_graph=True)[0] if over else None
            task.backward()           # the task loss alone: Taylor's dL/dm and the ratios' task gradient
            masks.update_taylor(m)
            if masks.ratio.grad is None:
                masks.ratio.grad = torch.zeros_like(masks.ratio)
            balance.combine(masks.ratio.grad, g_res)
            opt.step()
            with torch.no_grad():
                masks.ratio.clamp_(0, 1)
            soft = float(f_soft.detach())
            record = {"step": step, "soft_macs": soft, "target": float(target), "scheduled_target": t_now,
                      "loss": float(loss.detach()), "task_loss": float(task.detach()),
                      "resource_loss": float(res.detach()), "pressure": balance.pressure}
            history.append(record)
            events({"type": "step", "total_steps": steps, **record, "keep": masks.keep_ratios(m)})
            if cancel is not None and cancel.is_set():
                break
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return SearchResult(masks, int(target), int(full), soft, step, time.perf_counter() - start, history)


class _Balance:
    """How much the resource loss pulls against the task loss.

    As DMS's code does, the resource gradient on the ratios is rescaled to the norm of the task
    gradient (a moving average), so one setting works for any model and loss scale; and, added
    here, the scale ("pressure", from 1) grows by GROW every step the soft MACs are above the
    scheduled target and falls back toward 1 below it. With a fixed scale, a pretrained network's
    task gradient can balance the resource gradient well above the target (measured on ResNet-56:
    the soft MACs stalled at 105.8 M for targets of 97.2 M and 68.9 M); growing pressure always
    reaches the target, while the task gradient still decides which widths and blocks give way."""
    GROW = 1.05

    def __init__(self):
        self.task_norm: float | None = None
        self.pressure = 1.0

    def combine(self, grad: torch.Tensor, g_res: torch.Tensor | None) -> None:
        """grad (the task gradient, in place) += pressure * |task| * g_res / |g_res|."""
        norm = float(grad.norm())
        if norm > 0:
            self.task_norm = norm if self.task_norm is None else DECAY * self.task_norm + (1 - DECAY) * norm
        if g_res is None or float(g_res.norm()) == 0:
            self.pressure = max(1.0, self.pressure / self.GROW)
            return
        # Before any task gradient (the first step: all masks 1) the resource gradient leads alone.
        scale = self.pressure * (self.task_norm or 1.0) / float(g_res.norm())
        grad.add_(g_res.to(grad.dtype), alpha=scale)
        self.pressure *= self.GROW


def smallest_macs(space: ElasticSpace) -> int:
    """The least DMS can reach: one unit per width, one droppable block per stage (plus the first)."""
    tks = topks(space)
    widths = {t.key: 1 for t in tks if not t.is_depth}
    skip = sorted(b for t in tks if t.is_depth for b in t.blocks[1:])
    return subnet_cost(space, SubnetConfig(space.full_config().depth, widths, skip)).macs


def check_target(space: ElasticSpace, target: float) -> None:
    full = subnet_cost(space, space.full_config()).macs
    if not target > 0:
        raise ShrinkError(f"the target must be a positive number of MACs, got {target:g}")
    if target >= full:
        raise ShrinkError(f"the target ({target / 1e6:.2f} M MACs) is not below the model's own "
                          f"{full / 1e6:.2f} M MACs: nothing to shrink")
    low = smallest_macs(space)
    if target < low:
        raise ShrinkError(f"the target ({target / 1e6:.2f} M MACs) is below the smallest network shrinking can "
                          f"make from this model ({low / 1e6:.2f} M MACs: one unit per width, one droppable "
                          "block per stage)")


# --- export --------------------------------------------------------------------------------------

def fit_hard(masks: Masks, target: float, iterations: int = 40) -> list[torch.Tensor]:
    """Hard masks costing at most `target` MACs, as close to it as shifting the ratios gets: first
    the smallest common shift of all ratios (bisection; the hard cost only falls as ratios rise),
    then, the blocks kept as that leaves them, the smallest shift of the widths' ratios alone. This
    removes the rounding excess of the hard masks (up to one unit per width above the soft count
    sum(m)) and gives back budget the search left unused; the second pass fills what the coarse
    first one overshot (one block of ResNet-56's second stage is 2.4 M MACs, one channel 0.3 M).
    What is left below the target is less than the units crossing at the last shift (usually one
    channel), or, when every width is back to full, less than one block."""
    def cost(hard: list[torch.Tensor]) -> int:
        return subnet_cost(masks.space, masks.config(hard)).macs

    def smallest_shift(shifted) -> float:
        lo, hi = -1.0, 1.0
        if cost(shifted(lo)) <= target:
            return lo
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(shifted(mid)) <= target else (mid, hi)
        return hi

    def both(shift: float) -> list[torch.Tensor]:
        return masks.hard(width_shift=shift, depth_shift=shift)

    if cost(both(1.0)) > target:
        raise ShrinkError(f"no pruning ratios reach {target / 1e6:.2f} M MACs")
    depth_shift = smallest_shift(both)

    def widths(shift: float) -> list[torch.Tensor]:
        return masks.hard(width_shift=shift, depth_shift=depth_shift)

    return widths(smallest_shift(widths))


def export(model: nn.Module, space: ElasticSpace, masks: Masks, target: float | None = None
           ) -> tuple[nn.Module, SubnetConfig, dict[str, torch.Tensor]]:
    """The static pruned network of the hard masks (fitted to `target` when given, see `fit_hard`):
    a copy of `model` with each width permuted so that the kept units come first, then cut by
    `subnet.extract`. Returns (network, configuration, permutation per width)."""
    hard = fit_hard(masks, target) if target is not None else masks.hard()
    order, config = masks.order(hard), masks.config(hard)
    work = copy.deepcopy(model)
    permute_(work, space, order)
    return extract(work, space, config).eval(), config, order


def stage_summary(space: ElasticSpace, config: SubnetConfig) -> list[dict]:
    """Per stage: blocks kept of all, and units kept of all in the kept blocks' widths."""
    kept = space.kept_blocks(config)
    out = []
    for s in range(space.num_stages):
        blocks = space.stage_blocks(s)
        dims = [d for b in blocks if kept[b] for d in space.blocks[b].widths]
        units = sum(config.widths.get(d.key, d.size) for d in dims)
        out.append({"stage": s, "blocks": sum(kept[b] for b in blocks), "of_blocks": len(blocks),
                    "width_keep": units / max(1, sum(d.size for d in dims))})
    return out


# --- from a run: search, export, evaluate, store ------------------------------------------------

FOLDER = "shrink"          # RUN/shrink/<name>/: model.safetensors + config.json per shrunk network


@dataclass
class ShrinkResult:
    candidate: Candidate
    folder: Path
    full_macs: int
    target: int
    soft_macs: float            # the search's last soft MACs
    counted_macs: int           # composer.costs.model_cost of the exported network
    top1_before: float          # the anchor, same images
    top1_after: float           # the shrunk network as saved (BN statistics re-estimated)
    top1_exported: float        # the shrunk network with the anchor's BN statistics
    bn_images: int              # images the BN statistics were re-estimated on (0: not done)
    eval_images: int
    stages: list[dict]
    search_seconds: float
    steps: int


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def shrink_anchor(run_dir, anchor: int | None, data: str, target_macs: float, steps: int = 200,
                  eval_data: str | None = None, eval_limit: int | None = 1000, batch_size: int = 64,
                  lr: float = 0.01, bn_images: int = 256, seed: int = 0, workers: int = 0, latency: bool = False,
                  events: Callable[[dict], None] | None = None, cancel=None, stitch: int | None = None,
                  device: torch.device | str = "cpu", precision: str = "fp32") -> ShrinkResult:
    """DMS on anchor `anchor` of a run: search on `data` (shuffled, cycled), export, re-estimate the
    pruned network's BN statistics on `bn_images` images of `data` (0: keep the anchor's), evaluate
    the anchor and the pruned network on the same `eval_limit` images of `eval_data` (default: the
    validation split of `data`), save RUN/shrink/<name>/ and add the candidate to the run. With
    latency=True the pruned network's batch-1 latency on this device becomes the candidate's
    latency_ms (composer.costs' timer, as elastic and fold candidates are timed). With `stitch` (and
    anchor None) the stitch's route is shrunk instead (composer.builders.source, as elastic and fold do).
    device / precision: where the source and the pruned network run (search, BatchNorm statistics,
    top-1, latency) and the autocast precision of their forward passes (composer.device)."""
    from composer import data as data_mod
    from composer.device import autocast

    events = events or (lambda e: None)
    target_macs = checks.number(target_macs, "the target MACs")   # before loading anything
    if not target_macs > 0:
        raise ShrinkError(f"the target must be a positive number of MACs, got {target_macs:g}")
    steps = checks.whole(steps, "search steps", 1, 1_000_000)
    eval_limit = None if eval_limit is None else checks.whole(eval_limit, "evaluation images", 1, None)
    batch_size = checks.whole(batch_size, "batch size", 1, 100_000)
    lr = checks.number(lr, "the learning rate", hi=10, above=0)
    bn_images = checks.whole(bn_images, "BatchNorm images", 0, None)
    source = resolve_source(run_dir, anchor, stitch)
    model, spec = source.module, source.spec
    space = elastic_space(model, source.input_size)
    device = torch.device(device)
    model.to(device)
    base, label = {"stitch" if stitch is not None else "anchor": source.entry}, source.key
    arch = source.label
    check_target(space, target_macs)
    cfg = data_mod.data_config(model)
    train_ds = data_mod.open_dataset(data, cfg)
    eval_ds = data_mod.subset(data_mod.open_dataset(eval_data or data, cfg, split="validation"), eval_limit, seed=seed)
    batches = data_mod.loader(train_ds, batch_size, shuffle=True, workers=workers, seed=seed)
    events({"type": "start", "anchor": spec, "full_macs": subnet_cost(space, space.full_config()).macs,
            "target": int(target_macs), "total_steps": steps})
    result = search(model, space, batches, target_macs, steps=steps, lr=lr, events=events, cancel=cancel,
                    precision=precision)
    pruned, config, order = export(model, space, result.masks, target_macs)
    pruned.to(device)
    cost = model_cost(pruned, space.input_size)
    events({"type": "evaluate", "images": len(eval_ds)})
    with autocast(precision, device):
        before = top1(model, data_mod.loader(eval_ds, batch_size, workers=workers))
        after_export = top1(pruned, data_mod.loader(eval_ds, batch_size, workers=workers))
    after, recalibrated, n = after_export, 0, len(eval_ds)
    if bn_images > 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules()):
        # Pruning shifts the statistics downstream of every cut, so the anchor's BN statistics are
        # off: re-estimating them (no weight changes) is nearly free and recovers much of the loss
        # (ResNet-56 shrunk to ResNet-32's MACs: 66.5 -> 74.7 % top-1 from 256 images, 2 s on CPU).
        bn_ds = data_mod.subset(train_ds, bn_images, seed=seed + 1)
        with autocast(precision, device):
            recalibrate_bn(pruned, (x for x, _ in data_mod.loader(bn_ds, batch_size, workers=workers)))
            recalibrated = len(bn_ds)
            after = top1(pruned.eval(), data_mod.loader(eval_ds, batch_size, workers=workers))
    latency_ms = None
    if latency:
        events({"type": "latency"})
        with autocast(precision, device):
            latency_ms = measure_latency(pruned.eval(), torch.zeros(1, *space.input_size, device=device))

    name = f"{arch} DMS <={target_macs / 1e6:.2f}M"
    folder = Path(source.run_dir) / FOLDER / _slug(f"{label}-{int(target_macs)}")
    stages = stage_summary(space, config)
    # composer.builders.elastic's format for a static sub-network of an anchor or a stitch: `elastic.load_subnet` loads it
    described = {"format": SUBNET_FORMAT, "version": 1, "method": "shrink", **base, "subnet": config.to_dict(),
                 "input_size": list(space.input_size), "cost": cost.to_dict(),
                 "order": {k: v.tolist() for k, v in order.items()},
                 "ratios": {t.key: float(a) for t, a in zip(result.masks.topks, result.masks.ratio.detach())},
                 "target_macs": int(target_macs), "soft_macs": result.soft_macs, "steps": result.steps,
                 "search_data": data, "lr": lr, "preprocessing": source.preprocessing,
                 "top1": after, "top1_before_bn_recalibration": after_export, "bn_images": recalibrated,
                 "eval_data": eval_data or data, "eval_images": n}
    save_shrunk(folder, pruned, described)
    candidate = Candidate("shrink", name, spec, cost.macs, cost.params, cost.activations, top1=after,
                          status="measured", latency_ms=latency_ms, config={k: described[k] for k in
                                                     ("subnet", "order", "ratios", "target_macs", "soft_macs",
                                                      "steps", "eval_data", "eval_images", "bn_images",
                                                      "top1_before_bn_recalibration")}
                          | {"anchor_index": anchor, "stitch": stitch,
                             "folder": str(folder.relative_to(source.run_dir)), "top1_before": before, "stages": stages})
    add_candidates(source.run_dir, [candidate])
    out = ShrinkResult(candidate, folder, result.full_macs, int(target_macs), result.soft_macs, cost.macs,
                       before, after, after_export, recalibrated, n, stages, result.seconds, result.steps)
    events({"type": "done", "counted_macs": cost.macs, "top1_before": before, "top1_after": after})
    return out


def build_shrink(run_dir, *, anchor: int | None = None, stitch: int | None = None, events=None, cancel=None,
                 data: str, target_macs: float, **options) -> BuildResult:
    """composer.builders.build("shrink", ...): `shrink_anchor` on an anchor or a stitch of a run."""
    r = shrink_anchor(run_dir, anchor, data, target_macs, events=events, cancel=cancel, stitch=stitch, **options)
    return BuildResult("shrink", [r.candidate], f"shrink: {r.candidate.name} added to the curve", r)


def save_shrunk(folder: Path, pruned: nn.Module, config: dict) -> None:
    """model.safetensors (the pruned weights, the anchor's parameter names) + config.json; the
    weights are already permuted, so `composer.builders.elastic.load_subnet(folder)` rebuilds the network
    (timm anchor, random init, cut to the configuration, strict load)."""
    save_safetensors_atomic(Path(folder) / "model.safetensors", pruned.state_dict(), metadata={"format": "pt"})
    write_json_atomic(Path(folder) / "config.json", config)
