"""Fine-tuning an SN-Net (arXiv 2302.06586): every step samples one stitch and trains its route.

Only the sampled route's modules run, so only its parameters get gradients that step; the
optimizer keeps state for all of them (SGD / AdamW skip parameters whose grad is None).

Robust jobs:
- Checkpoints go to RUN/checkpoint/ every `checkpoint_every` steps: snnet.safetensors (every weight
  of the SN-Net, which `composer.run.load_run` loads) and trainer-<step>.pt (optimizer, schedule,
  step; plain tensors and containers, read back with torch.load(weights_only=True)). Each file is
  written atomically, the weights record their step, and the trainer state of the previous
  checkpoint is deleted only after the new weights are in place: a process killed at any moment
  leaves a matching pair, so it loses at most one checkpoint interval.
- Resuming is exact: which stitch a step trains, which images it sees and their augmentation are
  functions of (seed, rank, step), not of a generator that lives in memory; so a stopped and
  resumed run matches an uninterrupted one (tested bit for bit on CPU).
- `cancel` (a threading.Event) stops within one step and writes a checkpoint.
- Divergence (a non-finite loss, or non-finite weights at a checkpoint) stops the run with status
  "diverged": no checkpoint is ever written with non-finite weights, so the last finite checkpoint
  stays (or the fitted weights, before the first); the metrics logged past it are dropped, and the
  manifest records the divergence ("train_diverged") until a later checkpoint replaces it.
- A resumed run never repeats a record of metrics.jsonl (an evaluation at a step already logged is
  not logged again).
- Several processes (`torchrun --nproc_per_node N python -m composer train ...`): each rank samples
  its own stitch per step, as SN-Net does; DistributedDataParallel with find_unused_parameters
  averages the gradients (a parameter a rank's route did not use counts as zero there; one no rank
  used keeps grad None, so no optimizer touches it). Rank 0 writes checkpoints and metrics.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from composer import data as data_mod
from composer.errors import UserError
from composer.evaluate import evaluate_all
from composer.judge import line_gaps
from composer.io import save_safetensors_atomic
from composer.run import (CHECKPOINT, TRAINED, append_metrics, average_toward, load_run, read_manifest, read_metrics,
                          trim_metrics, write_evaluation, write_manifest)
from composer.snnet import StitchedNetwork
from zoo.sources import create_anchor, is_sourced

LOG_EVERY = 10            # steps per summary line in metrics.jsonl
SAMPLINGS = ("uniform", "macs_grouped", "flops_gap", "need")
STOP_REASONS = {1: "done", 2: "budget", 3: "cancelled", 4: "diverged"}   # the largest wins across ranks
OPTIMIZERS = ("sgd", "adamw")


class TrainError(UserError):
    """Training cannot start or resume as asked; the message says why."""


@dataclass
class TrainConfig:
    steps: int | None = None            # stop after this many optimizer steps (total, across resumes)
    time_budget_min: float | None = None  # or when this wall-clock budget (this invocation) is spent
    lr: float | None = None             # None: family default
    batch_size: int | None = None       # images per step (per process); None: BATCH_CPU on a CPU, BATCH_GPU on a GPU
    optimizer: str | None = None        # None: AdamW for ViT-like (token layout) anchors, SGD momentum 0.9 for CNNs
    weight_decay: float | None = None
    warmup_steps: int | None = None
    label_smoothing: float = 0.1
    sampling: str | None = None         # None: family default | "uniform" (SN-Net) | "macs_grouped" | "flops_gap"
    #                                     (SN-Netv2: sort by MACs, pick a group, then a stitch) | "need" (see StitchSampler)
    groups: int = 4
    stitches_per_step: int = 1          # the batch split among this many sampled stitches, one optimizer
    #                                     step for all: what SN-Net's 8 GPUs do (8 stitches per step), in one process
    stitch_layers_only: bool = False
    frozen_fronts: bool = False         # a stitch's route trains only what lies behind its stitch point: the
    #                                     first anchor's blocks before it learn only from that anchor's own route
    #                                     (a lever measured for issue 15; it lost, bench/RESULTS.md)
    distill: str | None = None          # None: family default ("anchors" where the anchors have pretrained
    #                                     weights) | "off" | "largest" (largest anchor, frozen copy) | "anchors"
    #                                     (each route learns from the original of its last anchor) | "live"
    #                                     (from its last anchor as fine-tuned so far, no copy) | any anchor spec
    distill_weight: float = 0.5         # KL on logits (temperature 1)
    average: float | None = None        # the run's weights are fitted + average x (trained - fitted): weight
    #                                     averaging toward the fitted weights (WiSE-FT), applied wherever the
    #                                     run is evaluated, exported or loaded; the checkpoint keeps the trained
    #                                     weights, so a resume continues them. None: family default
    eval_every: int = 0                 # steps; 0: only at the end
    eval_limit: int | None = 500        # held-out images for periodic evaluation (shared-prefix evaluate_all)
    checkpoint_every: int = 50
    seed: int = 0
    workers: int = 0
    # Beyond SN-Net's recipe (None: family default, see `resolve`):
    anchor_lr_scale: float | None = None  # anchors' lr = lr x this (stitching layers get lr)
    freeze_bn: bool | None = None       # keep BatchNorm statistics fixed (BN layers in eval mode)
    hflip: float | None = None          # None: 0.5, but 0 for the starter digits (not mirror-symmetric)
    min_crop: float = 1.0               # smallest area of timm's random-resized crop (1.0: no cropping)
    device: str | None = None           # None: torchrun's / the first GPU, else the CPU; or "cpu", "cuda:N"
    #                                     (composer.pipeline.train_run resolves --device into this)
    precision: str | None = None        # autocast: None / "auto" = bf16 on a GPU that has it, else fp32; "fp32", "bf16", "fp16"
    anchor_share: float | None = None   # probability that a step trains an anchor's own route (None: 0.3 with
    #                                     sampling "need", else an anchor's route is drawn as any route)
    macs_gap: float | None = None       # sampling "flops_gap": a new group starts more than this many MACs above
    #                                     the first stitch of the current one (SN-Netv2's FLOPs step)


# Family defaults for short fine-tunes (minutes, batch 64), chosen with bench/bench_train.py and
# judged against the line between the ORIGINAL anchors (bench/RESULTS.md, issue 15). In both,
# distillation from each route's own last anchor (its original weights) keeps what the anchors knew.
# CNNs keep BatchNorm statistics fixed (each stitch has its own behind its stitch point, relative to
# its anchor's: composer.fit.calibrate_route_stats). Measured on the CIFAR ResNets at 10 single-thread
# CPU minutes (532 steps): anchors at the stitching layers' lr with uniform sampling put 34 of 36
# stitches within 1 point on the training set's JPEG domain but cost the anchors up to 5.3 points on
# lossless images; anchors at 0.3x lr, their own routes drawn 30 % of the time and the rest by need
# kept every anchor within 1 point of its published accuracy there. Averaging the fine-tune 0.8 toward
# the fitted weights (WiSE-FT) then helped on lossless images at every budget (10 minutes with 2 threads,
# 1,304 steps: 15 of 36 stitches within 1 point instead of 11, every anchor within 0.5 point) and cost
# nothing measurable on the JPEGs (35 of 36 either way). ViTs: not measured (the starter digits have
# no second domain), so not averaged.
VIT_DEFAULTS = dict(optimizer="adamw", lr=3e-4, weight_decay=0.0, anchor_lr_scale=1.0, freeze_bn=False,
                    distill="anchors", sampling="uniform", average=1.0)
CNN_DEFAULTS = dict(optimizer="adamw", lr=1e-3, weight_decay=0.0, anchor_lr_scale=0.3, freeze_bn=True,
                    distill="anchors", sampling="need", average=0.8)
# A time budget on a CPU buys steps in proportion to the batch; on a GPU a small step costs about as much
# as a large one. Measured on the CIFAR ResNets, `train --time-budget 2` with 2 threads: batch 32 (472
# steps) put 25 of 36 stitches within 1 point on the test JPEGs, batch 64 (229 steps) 14; batch 16 (706)
# 30, but cost ResNet-44 1.1 points on lossless images (bench/RESULTS.md).
BATCH_CPU, BATCH_GPU = 32, 64
NEED_ANCHOR_SHARE = 0.3   # sampling "need": the anchors' own routes this often unless anchor_share says otherwise


def token_family(net: StitchedNetwork) -> bool:
    return any(a.layout != "nchw" for a in net.adapters)


def resolve(config: TrainConfig, net: StitchedNetwork, data: str = "", teachers: bool = True) -> TrainConfig:
    """A copy of `config` with every None default filled in for this network, and checked.
    teachers=False: the anchors have no pretrained weights, so the default is not to distil."""
    defaults = dict(VIT_DEFAULTS if token_family(net) else CNN_DEFAULTS)
    if not teachers:
        defaults["distill"] = "off"
    c = replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
    c.optimizer = c.optimizer.lower()
    if c.sampling == "need" and c.anchor_share is None:
        c.anchor_share = NEED_ANCHOR_SHARE
    if c.distill in ("", "none"):
        c.distill = "off"
    if c.hflip is None:
        c.hflip = 0.0 if data.startswith("starter") else 0.5
    if c.batch_size is None:
        on_gpu = torch.device(c.device).type != "cpu" if c.device else torch.cuda.is_available()
        c.batch_size = BATCH_GPU if on_gpu else BATCH_CPU
    if c.steps is None and c.time_budget_min is None:
        raise TrainError("say when to stop: give a number of steps or a time budget (--steps N, a total across "
                         "resumes, or --time-budget MIN), or both")
    checks = [
        (c.steps is None or c.steps >= 0, f"steps must be >= 0, got {c.steps}"),
        (c.time_budget_min is None or c.time_budget_min > 0, f"the time budget must be positive, got {c.time_budget_min}"),
        (c.lr > 0, f"the learning rate must be positive, got {c.lr}"),
        (c.batch_size >= 1, f"the batch size must be >= 1, got {c.batch_size}"),
        (1 <= c.stitches_per_step <= c.batch_size,
         f"stitches per step must be between 1 and the batch size ({c.batch_size}), got {c.stitches_per_step}"),
        (c.optimizer in OPTIMIZERS, f"unknown optimizer '{c.optimizer}' (choose {', '.join(OPTIMIZERS)})"),
        (c.sampling in SAMPLINGS, f"unknown sampling '{c.sampling}' (choose {', '.join(SAMPLINGS)})"),
        (c.groups >= 1, f"groups must be >= 1, got {c.groups}"),
        (0 <= c.distill_weight <= 1, f"the distillation weight must be in [0, 1], got {c.distill_weight}"),
        (0 < c.average <= 1, f"the fine-tune's weight in the average must be in (0, 1] (1: as trained), got {c.average}"),
        (c.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {c.checkpoint_every}"),
        (c.eval_every >= 0, f"eval_every must be >= 0, got {c.eval_every}"),
        (c.anchor_lr_scale >= 0, f"anchor_lr_scale must be >= 0, got {c.anchor_lr_scale}"),
        (c.anchor_share is None or 0 <= c.anchor_share <= 1, f"anchor_share must be in [0, 1], got {c.anchor_share}"),
        (c.workers >= 0, f"workers must be >= 0, got {c.workers}"),
        (0 < c.min_crop <= 1 and 0 <= c.hflip <= 1, "min_crop must be in (0, 1] and hflip in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)
    if c.warmup_steps is None:
        c.warmup_steps = min(100, c.steps // 20) if c.steps else 20
    return c


# --- which stitch, which images: functions of (seed, rank, step) ---------------------------------

class StitchSampler:
    """Picks the stitch each step trains. `uniform`: any stitch (anchors included), as SN-Net.
    `macs_grouped`: stitches sorted by MACs in `groups` equal groups; a group is drawn uniformly,
    then a stitch in it, so the crowded middle of the curve is not oversampled. `flops_gap`
    (SN-Netv2's FLOPs groups, composer.plan.macs_step_groups): the MACs-sorted stitches cut wherever
    a stitch lies more than `gap` MACs above the first of its group; then as `macs_grouped`.
    `need`: half the draws uniform, half by need (`NeedScores`: the stitches furthest below the line).
    anchor_share: the probability of drawing an anchor's own route (None: as any other route)."""

    def __init__(self, net: StitchedNetwork, sampling: str, groups: int, seed: int, anchors: bool = True,
                 gap: float | None = None, anchor_share: float | None = None):
        self.seed = seed
        # with frozen anchors an anchor's route has nothing to train: it is not sampled
        ids = [s.id for s in net.plan.stitches if anchors or not s.is_anchor]
        if not ids:
            raise TrainError("nothing to train: stitching layers only, but the plan has no stitches between anchors")
        ids.sort(key=lambda i: net.plan.cost(i).macs)
        if sampling in ("uniform", "need"):
            self.groups = [ids]
        elif sampling == "flops_gap":
            if gap is None:
                raise TrainError("flops_gap sampling needs the MACs gap between groups (--macs-gap, e.g. 10M)")
            from composer.plan import macs_step_groups
            groups_of = macs_step_groups([float(net.plan.cost(i).macs) for i in ids], gap)
            self.groups = [[ids[k] for k in g] for g in groups_of]
        else:
            self.groups = [list(g) for g in np.array_split(ids, min(groups, len(ids))) if len(g)]

        self.need: NeedScores | None = None
        self.anchor_routes: list[int] = []
        if anchor_share is not None and anchors:
            # anchor routes drawn apart, with this probability; the groups hold the stitches only
            self.anchor_routes = [s.id for s in net.plan.stitches if s.is_anchor]
            self.groups = [kept for g in self.groups if (kept := [i for i in g if i not in self.anchor_routes])]
        self.anchor_share = anchor_share if self.anchor_routes and self.groups else None

    def pick(self, step: int, rank: int = 0) -> int:
        rng = np.random.default_rng([self.seed, rank, step, 1])
        if self.anchor_share is not None and rng.random() < self.anchor_share:
            return int(self.anchor_routes[rng.integers(len(self.anchor_routes))])
        group = self.groups[rng.integers(len(self.groups))]
        if self.need is not None and rng.random() < NEED_SHARE:
            return self.need.pick(group, rng)
        return int(group[rng.integers(len(group))])


NEED_SHARE = 0.5   # sampling "need": half the draws by need, half uniform (every stitch keeps being measured)


class NeedScores:
    """Sampling by need (in the spirit of ESTA, CVPR 2024): each stitch's running training loss
    (an exponential average of the losses of the steps that trained it) against the straight line,
    in MACs, between its anchors' running losses; a stitch is drawn in proportion to how far its loss
    lies above that line (the stitches furthest below the accuracy line get the steps). Free: no
    extra forward pass, only the losses the steps compute anyway. The scores travel in the trainer
    state, so a resumed run draws as an uninterrupted one."""

    DECAY = 0.8

    def __init__(self, net: StitchedNetwork, scores: dict | None = None):
        from composer.judge import anchor_ids, line_ends
        plan = net.plan
        ids = anchor_ids(plan)
        self.macs = {s.id: float(plan.cost(s).macs) for s in plan.stitches}
        self.ends = {s.id: tuple(ids.get(a) for a in line_ends(plan, s)) for s in plan.stitches if not s.is_anchor}
        self.loss: dict[int, float] = {int(k): float(v) for k, v in (scores or {}).items()}

    def observe(self, sid: int, loss: float) -> None:
        if math.isfinite(loss):
            old = self.loss.get(sid)
            self.loss[sid] = loss if old is None else self.DECAY * old + (1 - self.DECAY) * loss

    def need(self, sid: int) -> float | None:
        """Loss above the anchors' line; None until the stitch and both its anchors were trained."""
        lo, hi = self.ends.get(sid, (None, None))
        if sid not in self.loss or self.loss.get(lo) is None or self.loss.get(hi) is None:
            return None
        m_lo, m_hi = self.macs[lo], self.macs[hi]
        t = (self.macs[sid] - m_lo) / (m_hi - m_lo) if m_hi != m_lo else 0.5
        return max(0.0, self.loss[sid] - (self.loss[lo] + t * (self.loss[hi] - self.loss[lo])))

    def pick(self, group: list[int], rng: np.random.Generator) -> int:
        needs = [self.need(i) for i in group]
        known = [n for n in needs if n is not None]
        if not known or sum(known) <= 0:
            return int(group[rng.integers(len(group))])
        # an unmeasured stitch (or an anchor route) counts as the group's average need
        fill = sum(known) / len(known)
        w = np.array([fill if n is None else n for n in needs])
        return int(group[rng.choice(len(group), p=w / w.sum())])

    def state(self) -> dict:
        return {str(k): v for k, v in sorted(self.loss.items())}


def _item_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, position, 2]).generate_state(1)[0])


class _SeededItems(Dataset):
    """Items addressed as (index, seed): the augmentation of an image depends only on its seed,
    whichever process or worker loads it."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)          # timm's random-resized crop draws from `random`
            try:
                return self.ds[index]
            finally:
                random.setstate(state)


class _StepBatches(Sampler):
    """Batches for steps start, start+1, ...: a step's images are positions (step * world + rank)
    * batch_size ... of an endless stream of seeded epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int | None, rank: int, world: int):
        self.n, self.bs, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, 3]).generate_state(1)[0]))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[position % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while self.stop is None or step < self.stop:
            first = (step * self.world + self.rank) * self.bs
            yield [(self._index(p), _item_seed(self.seed, p)) for p in range(first, first + self.bs)]
            step += 1


def train_transform(cfg: dict, hflip: float, min_crop: float = 1.0):
    """timm's training transform for the anchors' preprocessing, tamed for short fine-tunes of
    pretrained models: by default only a horizontal flip, no crop and no colour jitter. Measured on
    the starter digits (16 px) and the CIFAR ResNets: a few hundred steps of random-resized crops,
    even of 90-100 % of the area, move the images away from what the anchors were trained on and
    leave stitches further below their anchors than no augmentation does."""
    keys = ("input_size", "interpolation", "mean", "std")
    ratio = (3 / 4, 4 / 3) if min_crop < 1 else (1.0, 1.0)
    return create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=True,
                            scale=(min_crop, 1.0), ratio=ratio, hflip=hflip, color_jitter=0.0)


def _eval_spec(data: str) -> tuple[str, str]:
    """(spec, split) for evaluation when none is given: the validation split of the same source."""
    if data.startswith("starter"):
        return "starter:val", "validation"
    return data, "validation"


# --- the optimizer, the schedule, train modes ----------------------------------------------------

def _param_groups(net: StitchedNetwork, c: TrainConfig) -> list[dict]:
    """Stitching layers and each stitch's own BatchNorm parameters at lr, anchors at lr x
    anchor_lr_scale; no weight decay on biases and norms (timm's convention). Order is fixed by
    named_parameters, so optimizer state maps back on resume."""
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        part = "stitch" if name.startswith(("stitch_layers.", "route_stats.")) else "anchor"
        decay = p.ndim >= 2
        key = (part, decay)
        if key not in groups:
            scale = 1.0 if part == "stitch" else c.anchor_lr_scale
            groups[key] = {"params": [], "lr_scale": scale, "weight_decay": c.weight_decay if decay else 0.0,
                           "name": f"{part}{'' if decay else '_no_decay'}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def _make_optimizer(groups: list[dict], c: TrainConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = c.lr * g["lr_scale"]
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=c.lr)


def lr_factor(step: int, cycle_start: int, warmup: int, progress: float) -> float:
    """Linear warmup over `warmup` steps from the cycle's start, then cosine to 0 over `progress`."""
    into = step - cycle_start
    warm = min(1.0, (into + 1) / warmup) if warmup > 0 else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def _set_train_modes(net: StitchedNetwork, c: TrainConfig) -> None:
    """Train mode where weights learn; frozen anchors and fixed BN statistics run as at inference."""
    net.train()
    if c.stitch_layers_only or c.anchor_lr_scale == 0:
        net.anchors.eval()
    elif c.freeze_bn:
        for m in net.anchors.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# --- teachers ------------------------------------------------------------------------------------

def _teachers(run, c: TrainConfig, device, memory_format) -> Callable[[int], nn.Module] | None:
    """stitch id -> frozen teacher model, or None without distillation. Teachers are rebuilt from
    their specs (the original weights), never the anchors being trained."""
    if c.distill == "off":
        return None
    plan, pretrained = run.plan, run.manifest.get("pretrained")

    def build(spec: str) -> nn.Module:
        if not (pretrained or is_sourced(spec)):
            raise TrainError(f"teacher {spec} would have random weights (the run's anchors are not pretrained); "
                             "distill from a pretrained anchor or hf-hub:/local-dir: spec")
        m = create_anchor(spec, pretrained).to(device, memory_format=memory_format).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if spec in plan.anchors:   # an anchor's original: preprocessed as the run runs that anchor (--resolution)
            i = plan.anchors.index(spec)
            m.pretrained_cfg = run.net.anchors[i].pretrained_cfg
            return _Resized(m, plan.infos[i].input_size[1:]) if plan.native_resolution else m
        data_mod.check_same_preprocessing([run.net.anchors[0], m], [plan.anchors[0], spec])
        return m

    if c.distill == "anchors":
        models = [build(s) for s in plan.anchors]
        return lambda sid: models[plan.stitches[sid].route[-1].anchor]
    if c.distill == "live":
        return _live_teachers(run.net, c)
    teacher = build(plan.anchors[-1] if c.distill == "largest" else c.distill)
    return lambda sid: teacher


class _Resized(nn.Module):
    """A teacher at its own input size in a run whose anchors run at their own sizes: images come
    at the largest anchor's size and are resized as the SN-Net resizes them (composer.snnet)."""

    def __init__(self, model: nn.Module, size):
        super().__init__()
        self.model, self.size = model, tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from composer.snnet import resample
        return self.model(x if tuple(x.shape[-2:]) == self.size else resample(x, self.size))


def _live_teachers(net: StitchedNetwork, c: TrainConfig) -> Callable[[int], Callable]:
    """stitch id -> its last anchor *as it is being fine-tuned* (eval mode, no copy): stitches learn
    toward the anchors' current predictions, which improve during the fine-tune, not the originals'."""
    anchor_route = {s.route[0].anchor: s for s in net.plan.stitches if s.is_anchor}

    def teacher(sid: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            net.eval()
            try:
                return net.run(anchor_route[net.plan.stitches[sid].route[-1].anchor], x)
            finally:
                _set_train_modes(net, c)
        return run
    return teacher


# --- distributed -----------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def setup(cls) -> "_Dist":
        """Single process unless launched by torchrun / accelerate (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world <= 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    def max(self, value: int) -> int:
        """The largest value over all ranks, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (the same length on all), in rank order, on every rank."""
        if self.world == 1:
            return [values]
        import torch.distributed as dist
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = torch.empty(self.world * len(values), dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(out, mine)
        return out.view(self.world, -1).tolist()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


# --- checkpoints -------------------------------------------------------------------------------------

def checkpoint_step(run_dir: Path) -> int | None:
    """The step of RUN/checkpoint/snnet.safetensors, or None when there is none."""
    f = Path(run_dir) / CHECKPOINT / TRAINED
    if not f.is_file():
        return None
    with safe_open(f, "pt") as h:
        meta = h.metadata() or {}
    return int(meta["step"]) if "step" in meta else None


def _trainer_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT / f"trainer-{step:08d}.pt"


def _save_checkpoint(run_dir: Path, net: StitchedNetwork, state: dict) -> None:
    """Trainer state first (a new name), then the weights (atomic replace), then old states."""
    folder = Path(run_dir) / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    target = _trainer_file(run_dir, step)
    tmp = folder / f".{target.name}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    save_safetensors_atomic(folder / TRAINED, net.state_dict(), metadata={"step": str(step)})
    for old in folder.glob("trainer-*.pt"):
        if old != target:
            old.unlink(missing_ok=True)


def _load_trainer_state(run_dir: Path) -> dict | None:
    step = checkpoint_step(run_dir)
    if step is None:
        return None
    f = _trainer_file(run_dir, step)
    if not f.is_file():
        raise TrainError(f"{run_dir}: checkpoint weights are at step {step} but {f.name} is missing; "
                         "delete the checkpoint folder to start over from the fitted stitching layers")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupted or foreign file: say which, never unpickle code
        raise TrainError(f"{f}: unreadable trainer state ({str(e).splitlines()[0][:200]})") from None


# Settings that decide the optimizer's shape; resuming with other values is refused.
_STRUCTURAL = ("optimizer", "stitch_layers_only")


def _check_resume(saved: dict, c: TrainConfig) -> None:
    for k in _STRUCTURAL:
        if saved.get(k) != getattr(c, k):
            raise TrainError(f"this run was trained with {k}={saved.get(k)!r}; resume with the same setting "
                             f"(or delete its checkpoint folder to start over), not {getattr(c, k)!r}")


# --- the loop ------------------------------------------------------------------------------------
# `_train`: stop, log, evaluate, checkpoint around `_step` (one optimizer step); `_setup` builds what they use.

def train(run_dir, data: str, config: TrainConfig, events: Callable[[dict], None] | None = None,
          cancel: threading.Event | None = None, eval_data: str | None = None) -> dict:
    """Fine-tune the SN-Net in `run_dir` on `data`, resuming from its checkpoint if there is one.

    Returns {"status": "done" | "budget" | "cancelled" | "diverged", "step", "total_steps", "top1",
    "elapsed_s", "steps_per_s", "checkpoint"}; `top1` is the final evaluation on `eval_limit` held-out
    images. "diverged": the loss (or the weights) became non-finite at step "diverged_at"; nothing was
    saved past the checkpoint at "step" (0: none, the fitted weights) and `top1` is empty.
    """
    run_dir = Path(run_dir).expanduser()
    dist = _Dist.setup()
    try:
        return _train(run_dir, data, config, events or (lambda e: None), cancel, eval_data, dist)
    finally:
        dist.close()


def _train(run_dir, data, config, events, cancel, eval_data, dist: _Dist) -> dict:
    t = _setup(run_dir, data, config, eval_data, dist)
    c, net, main = t.c, t.net, dist.rank == 0
    step = start_step = t.step
    history = list(t.state.get("history", [])) if t.state else []
    # what metrics.jsonl already holds (after trimming to the checkpoint): never logged twice
    logged = {(r.get("type"), r.get("step")) for r in read_metrics(run_dir) if isinstance(r, dict)} if main else set()
    last_eval: tuple[int, dict] | None = None   # (step, top1) of the latest evaluation

    def log(record: dict) -> None:
        if main and (record.get("type"), record.get("step")) not in logged:
            logged.add((record.get("type"), record.get("step")))
            append_metrics(run_dir, record)

    def checkpoint(status: str = "running") -> bool:
        """Save weights and trainer state; False (nothing written) when a weight is not finite."""
        if main:
            if not _finite(net, t.opt):
                return False
            this_run = {"data": data, "from_step": start_step, "to_step": step, "status": status,
                        "seconds": round(time.monotonic() - t0, 1)}
            _save_checkpoint(run_dir, net, _trainer_state(t, step, history + [this_run]))
            _record_in_manifest(run_dir, data, t.ev_spec, c, step, status)
        events({"type": "checkpoint", "step": step})
        return True

    reference = _reference_of(run_dir, t) if main else None

    def evaluate() -> dict[int, float]:
        nonlocal last_eval
        if not main:
            return {}
        if last_eval is not None and last_eval[0] == step:   # these weights were just evaluated
            return last_eval[1]
        with _averaged(net, t.fitted, c.average):   # what load_run, evaluate and export will see
            res = evaluate_all(net, data_mod.loader(t.eval_ds, c.batch_size, workers=c.workers))
        _set_train_modes(net, c)
        record = {"type": "eval", "step": step, "images": res.images, "top1": {str(k): v for k, v in res.top1.items()}}
        if reference is not None and reference[0] == res.images:
            j = line_gaps(net.plan, res.top1, reference[1]).to_dict()
            record["judged"] = {k: j[k] for k in ("within", "stitches_judged", "median_gap", "worst_gap",
                                                  "worst_anchor_change")}
        log(record)
        events({**record, "top1": res.top1, "reference": reference[1] if reference else None})
        last_eval = (step, res.top1)
        return res.top1

    t0 = time.monotonic()
    events({"type": "start", "step": step, "total_steps": c.steps, "time_budget_min": c.time_budget_min,
            "stitches": len(net.plan.stitches), "device": str(t.device), "world_size": dist.world,
            "resumed": t.state is not None, "config": asdict(c), "eval_data": t.ev_spec,
            "after_divergence": t.diverged_before,
            # an image folder has no validation split: without eval_data, evaluation sees training images
            "eval_on_train_data": not eval_data and not data.startswith("starter") and Path(data).expanduser().is_dir()})
    if main and reference is None and step == 0 and c.eval_every:
        # the weights before any fine-tune, on the held-out images every later evaluation sees: the
        # original anchors, whose line every stitch is judged against as the fine-tune goes (issue 15)
        reference = (len(t.eval_ds), evaluate())
    _set_train_modes(net, c)
    status, window, images, diverged, bad_loss = None, [], 0, False, None
    saved_step = step if t.state is not None else None   # the step whose checkpoint is on disk
    it = iter(t.loader)
    while True:
        elapsed = time.monotonic() - t0
        reason = (4 if diverged else
                  1 if c.steps is not None and step >= c.steps else
                  2 if t.budget_s is not None and elapsed >= t.budget_s else
                  3 if cancel is not None and cancel.is_set() else 0)
        reason = dist.max(reason)      # every rank stops at the same step
        if reason:
            status = STOP_REASONS[reason]
            break
        # cosine over the steps (total, so a resumed run continues the same curve) or the budget
        progress = max(step / c.steps if c.steps else 0.0, elapsed / t.budget_s if t.budget_s else 0.0)
        x, y = next(it)
        value, sid, lr_now = _step(t, step, x, y, progress)
        step += 1
        images += x.shape[0] * dist.world
        if not math.isfinite(value):     # the update that followed has spoilt the weights: stop here
            diverged, bad_loss = True, value
            continue

        window.append(value)
        elapsed = time.monotonic() - t0
        events({"type": "step", "step": step, "total_steps": c.steps, "loss": value, "lr": lr_now,
                "images_per_s": images / max(elapsed, 1e-9), "eta_s": _eta(t, start_step, step, elapsed),
                "stitch": sid})
        if len(window) == LOG_EVERY:
            log({"type": "step", "step": step, "loss": sum(window) / len(window), "lr": lr_now,
                 "images_per_s": images / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 2)})
            window = []
        if c.eval_every and step % c.eval_every == 0 and (c.steps is None or step < c.steps):
            evaluate()
        if step - (start_step if saved_step is None else saved_step) >= c.checkpoint_every:
            if checkpoint():
                saved_step = step
            else:
                diverged = True

    if status == "diverged":
        return _diverged(t, run_dir, events, step, saved_step, bad_loss, main, time.monotonic() - t0, start_step)
    if saved_step != step:
        if not checkpoint(status):
            return _diverged(t, run_dir, events, step, saved_step, bad_loss, main, time.monotonic() - t0, start_step)
    elif main:      # weights already saved at this step: record how the run ended
        _record_in_manifest(run_dir, data, t.ev_spec, c, step, status)
    top1 = evaluate()
    if main and top1:
        write_evaluation(run_dir, net.plan, top1, t.ev_spec, len(t.eval_ds), step)
    elapsed = time.monotonic() - t0
    result = {"status": status, "step": step, "total_steps": c.steps, "top1": top1,
              "elapsed_s": round(elapsed, 2), "steps_per_s": round((step - start_step) / max(elapsed, 1e-9), 3),
              "checkpoint": str(run_dir / CHECKPOINT)}
    events({"type": status, "step": step})
    return result


@contextlib.contextmanager
def _averaged(net: StitchedNetwork, fitted: dict[str, torch.Tensor] | None, alpha: float):
    """The network's weights averaged toward the fitted ones (`TrainConfig.average`) inside, the
    trained weights again after."""
    if fitted is None:
        yield
        return
    state = net.state_dict()    # tensors sharing the parameters' storage
    trained = {k: state[k].clone() for k in fitted}
    with torch.no_grad():
        for k, v in average_toward(fitted, trained, alpha).items():
            state[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in trained.items():
                state[k].copy_(v)


def _reference_of(run_dir: Path, t: "_Setup") -> tuple[int, dict[int, float]] | None:
    """(images, top1) of the evaluation at step 0 (before any fine-tune) in metrics.jsonl, if this
    run's earlier fine-tune made one on the held-out images it evaluates on now."""
    n = len(t.eval_ds) if t.eval_ds is not None else None
    for r in read_metrics(run_dir):
        if isinstance(r, dict) and r.get("type") == "eval" and r.get("step") == 0 and r.get("images") == n:
            return n, {int(k): v for k, v in r["top1"].items()}
    return None


def _finite(net: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Every weight, buffer and optimizer moment finite (a checkpoint is never written otherwise: an
    infinite Adam moment makes the next update NaN even where the weights are still finite)."""
    tensors = list(net.state_dict().values()) + [v for st in opt.state.values() for v in st.values()
                                                  if torch.is_tensor(v)]
    return all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point())


def _diverged(t: "_Setup", run_dir: Path, events, step: int, saved_step: int | None, loss: float | None,
              main: bool, elapsed: float, start_step: int) -> dict:
    """End a diverged run: nothing is saved; the metrics logged past the checkpoint kept on disk are
    dropped (they describe weights that are gone) and the manifest says what happened."""
    kept = saved_step if saved_step is not None else (checkpoint_step(run_dir) or 0)
    what = f"loss {loss}" if loss is not None else "non-finite weights or optimizer state"
    if main:
        trim_metrics(run_dir, kept)
        append_metrics(run_dir, {"type": "diverged", "step": step, "checkpoint_step": kept, "reason": what,
                                 "lr": t.c.lr})
        manifest = read_manifest(run_dir)
        manifest["train_diverged"] = {"at_step": step, "checkpoint_step": kept, "reason": what, "lr": t.c.lr,
                                      "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_manifest(run_dir, manifest)
    events({"type": "diverged", "step": step, "checkpoint_step": kept, "reason": what})
    return {"status": "diverged", "step": kept, "diverged_at": step, "reason": what, "lr": t.c.lr, "total_steps": t.c.steps,
            "top1": {}, "elapsed_s": round(elapsed, 2),
            "steps_per_s": round((step - start_step) / max(elapsed, 1e-9), 3), "checkpoint": str(run_dir / CHECKPOINT)}


def _step(t: _Setup, step: int, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[float, int, float]:
    """One optimizer step: the scheduled lr; each sampled stitch's share of the batch through its
    route, cross-entropy (and KL to its teacher); one backward; one update.
    Returns (loss, the stitch trained (the last one when several), lr)."""
    c, rank = t.c, t.dist.rank
    factor = lr_factor(step, t.cycle_start, c.warmup_steps, progress)
    for g in t.opt.param_groups:
        g["lr"] = c.lr * g["lr_scale"] * factor

    x, y = x.to(t.device, non_blocking=True, memory_format=t.memory_format), y.to(t.device, non_blocking=True)
    torch.manual_seed(int(np.random.SeedSequence([c.seed, rank, step, 4]).generate_state(1)[0]))  # dropout etc.
    # One graph per sampled stitch, one backward for their summed loss: the memory of one batch,
    # and each stitching layer is updated k times as often as with one stitch per step.
    k = c.stitches_per_step
    loss, observed = 0.0, []
    for j, (xj, yj) in enumerate(zip(x.tensor_split(k), y.tensor_split(k))):
        if not len(yj):
            continue
        sid = t.sampler.pick(step, rank * k + j)   # k = 1: the one-stitch-per-step sequence
        t.net.select(sid)
        with t.autocast:
            logits = t.model(xj)
            part = F.cross_entropy(logits.float(), yj, label_smoothing=c.label_smoothing)
            if t.teacher_of is not None:
                with torch.no_grad():
                    target = t.teacher_of(sid)(xj).float()
                kd = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(target, -1),
                              log_target=True, reduction="batchmean")
                part = (1 - c.distill_weight) * part + c.distill_weight * kd
        observed += [sid, float(part.detach())]
        loss = loss + part * (len(yj) / len(y))
    if t.sampler.need is not None:   # every rank's losses, so that all ranks hold the same scores
        observed += [-1.0, 0.0] * (k - len(observed) // 2)   # padded: the same length on every rank
        for values in t.dist.gather(observed):
            for sid_r, loss_r in zip(values[::2], values[1::2]):
                if sid_r >= 0:
                    t.sampler.need.observe(int(sid_r), loss_r)
    t.opt.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
        t.opt.step()
    else:   # fp16: gradients scaled past fp16's underflow; a step whose gradients overflowed is skipped
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
    return float(loss.detach()), sid, c.lr * factor


@dataclass
class _Setup:
    """What the loop needs, built once by `_setup` (from the checkpoint when resuming)."""
    c: TrainConfig                    # resolved: every default filled in
    dist: _Dist
    net: StitchedNetwork
    model: nn.Module                  # `net`, or `net` in DistributedDataParallel
    opt: torch.optim.Optimizer
    teacher_of: Callable[[int], nn.Module] | None   # stitch id -> its teacher; None: no distillation
    sampler: StitchSampler
    loader: DataLoader                # one batch per step, from `step` on
    eval_ds: Dataset | None           # held-out images (rank 0 only)
    ev_spec: str
    device: torch.device
    memory_format: torch.memory_format
    autocast: contextlib.AbstractContextManager
    state: dict | None                # the checkpoint's trainer state when resuming
    step: int                         # the first step to run
    cycle_start: int                  # the step where the lr schedule's warmup + cosine cycle starts
    budget_s: float | None
    diverged_before: dict | None = None   # the manifest's record of an earlier run that diverged
    scaler: torch.amp.GradScaler | None = None   # fp16 only: loss scaling (bf16 and fp32 need none)
    fitted: dict[str, torch.Tensor] | None = None   # the fitted weights, where evaluations average toward them


def _setup(run_dir: Path, data: str, config: TrainConfig, eval_data: str | None, dist: _Dist) -> _Setup:
    """The run's network (with its checkpoint's weights), the resolved config, data, optimizer (with
    its saved state), teachers and sampler; the metrics a killed run logged past its checkpoint dropped."""
    manifest = read_manifest(run_dir)   # a clear refusal when RUN is not a run folder
    main = dist.rank == 0
    early = _training_set_of(data, manifest, config)   # a batch bigger than the data: refused before loading
    run = load_run(run_dir, average=False)   # includes the checkpoint's weights if there is one
    net = run.net
    pretrained = run.manifest.get("pretrained")
    c = resolve(config, net, data, teachers=all(pretrained or is_sourced(a) for a in run.plan.anchors))
    state = _load_trainer_state(run_dir)
    if state is not None:
        _check_resume(state["config"], c)
    step = state["step"] if state else 0
    if main and state is not None:
        trim_metrics(run_dir, step)
    train_ds, n_train, eval_ds, ev_spec = _datasets(data, eval_data, net, c, main, early)

    # Model, optimizer, teachers.
    device = torch.device(c.device) if c.device else dist.device
    # CNN training steps run 1.2-1.45x faster in channels_last on CPU (bench/RESULTS.md); ViTs do not care
    memory_format = torch.contiguous_format if token_family(net) else torch.channels_last
    net.to(device, memory_format=memory_format)
    if c.stitch_layers_only:
        for p in net.anchors.parameters():
            p.requires_grad_(False)
    net.frozen_fronts = c.frozen_fronts
    fitted = None     # what evaluations average toward (TrainConfig.average): least squares, the original anchors
    if c.average != 1.0:
        source = net if state is None else load_run(run_dir, trained=False).net
        fitted = {k: v.detach().to(device, copy=True) for k, v in source.state_dict().items() if v.is_floating_point()}
    opt = _optimizer(net, c, state, run_dir)
    teacher_of = _teachers(run, c, device, memory_format)
    model: nn.Module = net
    if dist.world > 1 and c.stitches_per_step > 1:   # DDP finds unused parameters from one forward only
        raise TrainError("with several processes every rank already trains its own stitch per step: "
                         "use stitches_per_step 1 (or one process)")
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True, broadcast_buffers=False)

    sampler = StitchSampler(net, c.sampling, c.groups, c.seed, anchors=not c.stitch_layers_only, gap=c.macs_gap,
                            anchor_share=c.anchor_share)
    if c.sampling == "need":
        sampler.need = NeedScores(net, (state or {}).get("sampler", {}).get("need"))
    batches = _StepBatches(n_train, c.batch_size, c.seed, step, c.steps, dist.rank, dist.world)
    loader = DataLoader(_SeededItems(train_ds), batch_sampler=batches, num_workers=c.workers,
                        pin_memory=device.type == "cuda")
    from composer.device import autocast as _autocast, resolve_precision
    precision = resolve_precision(c.precision, device)
    autocast = _autocast(precision, device)
    scaler = None
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device.type)
        if state is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    budget_s = c.time_budget_min * 60 if c.time_budget_min else None
    cycle_start = step if budget_s else 0   # a time budget is one warmup + cosine cycle per invocation
    return _Setup(c=c, dist=dist, net=net, model=model, opt=opt, teacher_of=teacher_of, sampler=sampler,
                  loader=loader, eval_ds=eval_ds, ev_spec=ev_spec, device=device, memory_format=memory_format,
                  autocast=autocast, state=state, step=step, cycle_start=cycle_start, budget_s=budget_s,
                  diverged_before=manifest.get("train_diverged"), scaler=scaler, fitted=fitted)


def _training_set_of(data: str, manifest: dict, config: TrainConfig) -> Dataset | None:
    """The training set opened with the preprocessing the run's manifest records (None for runs
    without it), and the batch size checked against it before anything else is built."""
    recorded = manifest.get("data_config")
    if not isinstance(recorded, dict):
        return None
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items()}
    ds = data_mod.open_dataset(data, cfg, train=True)
    try:
        _check_batch(config.batch_size, len(ds), data)
    except TypeError:
        return None   # streaming: _datasets says why
    return ds


def _check_batch(batch_size, n_train: int, data: str) -> None:
    if isinstance(batch_size, int) and batch_size > n_train > 0:
        raise TrainError(f"the batch size ({batch_size}) is larger than the training set ({n_train} images in "
                         f"{data}): use a batch size of at most {n_train}")


def _datasets(data: str, eval_data: str | None, net: StitchedNetwork, c: TrainConfig,
              main: bool, train_ds: Dataset | None = None) -> tuple[Dataset, int, Dataset | None, str]:
    """(training set, its size, held-out set (rank 0 only), its spec): train-time transform on `data`,
    eval transform on the held-out split. `train_ds`: the training set when already opened."""
    cfg = data_mod.data_config(net.anchors[net.input_anchor])
    if train_ds is None:
        train_ds = data_mod.open_dataset(data, cfg, train=True)
    train_ds.transform = train_transform(cfg, c.hflip, c.min_crop)  # timm datasets apply `.transform` per item
    try:
        n_train = len(train_ds)
    except TypeError:
        raise data_mod.DataError(f"{data}: streaming data sets cannot be fine-tuned on yet; use an image folder") from None
    if n_train == 0:
        raise data_mod.DataError(f"{data}: no training images")
    _check_batch(c.batch_size, n_train, data)
    ev_spec, ev_split = (eval_data, "validation") if eval_data else _eval_spec(data)
    eval_ds = data_mod.subset(data_mod.open_dataset(ev_spec, cfg, split=ev_split), c.eval_limit, seed=c.seed) if main else None
    return train_ds, n_train, eval_ds, ev_spec


def _optimizer(net: StitchedNetwork, c: TrainConfig, state: dict | None, run_dir: Path) -> torch.optim.Optimizer:
    """The optimizer; when resuming, with its saved state but the lr, anchor_lr_scale and weight
    decay asked now."""
    groups = _param_groups(net, c)
    opt = _make_optimizer(groups, c)
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise TrainError(f"{run_dir}: the saved optimizer state does not fit this network ({e})") from None
        fresh = {g["name"]: g for g in groups}
        for g in opt.param_groups:     # lr, anchor_lr_scale, weight decay may change on resume
            g.update(lr_scale=fresh[g["name"]]["lr_scale"], weight_decay=fresh[g["name"]]["weight_decay"])
            g["lr"] = c.lr * g["lr_scale"]
    return opt


def _trainer_state(t: _Setup, step: int, history: list[dict]) -> dict:
    """trainer-<step>.pt: the optimizer, the schedule, the sampler, the config, every invocation so far."""
    c = t.c
    return {"step": step, "optimizer": t.opt.state_dict(),
            "schedule": {"cycle_start": t.cycle_start, "warmup_steps": c.warmup_steps, "lr": c.lr},
            "sampler": {"kind": c.sampling, "groups": c.groups, "seed": c.seed, "world": t.dist.world,
                        **({"need": t.sampler.need.state()} if t.sampler.need is not None else {})},
            "config": asdict(c), "history": history,
            **({"scaler": t.scaler.state_dict()} if t.scaler is not None else {})}


def _eta(t: _Setup, start_step: int, step: int, elapsed: float) -> float:
    """Seconds left: to the last step at this invocation's rate, or to the end of the budget, whichever first."""
    rate = (step - start_step) / max(elapsed, 1e-9)
    eta = None
    if t.c.steps is not None:
        eta = (t.c.steps - step) / rate
    if t.budget_s is not None:
        eta = min(eta, t.budget_s - elapsed) if eta is not None else t.budget_s - elapsed
    return max(0.0, eta)


def _record_in_manifest(run_dir: Path, data: str, eval_spec: str, c: TrainConfig, step: int, status: str) -> None:
    """Provenance for model cards: what the checkpoint was trained on and how long."""
    manifest = read_manifest(run_dir)
    manifest["train"] = {"data": data, "eval_data": eval_spec, "step": step, "status": status,
                         "config": {k.name: getattr(c, k.name) for k in fields(c)},
                         "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if step > int((manifest.get("train_diverged") or {}).get("checkpoint_step", step)):
        manifest.pop("train_diverged")   # a finite checkpoint past the divergence replaces its record
    write_manifest(run_dir, manifest)
