"""Two CPU processes (torchrun, gloo) train one SN-Net: each rank its own stitch, gradients averaged.

The check is against an independent single-process computation of the same step: both ranks'
routes on their own batches, gradients averaged with a missing gradient counted as zero, one SGD
step. Parameters that neither route ran must not move at all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from composer import data
from composer.run import CHECKPOINT, TRAINED, load_run
from composer.train import (StitchSampler, TrainConfig, _make_optimizer, _param_groups, _SeededItems,
                            _set_train_modes, _StepBatches, lr_factor, resolve, train_transform)
from tests.test_train import CNN, make_family, make_run

ROOT = Path(__file__).resolve().parents[1]


def _expected_after_one_step(run: Path, train_dir: str, config: TrainConfig, world: int) -> dict[str, torch.Tensor]:
    # channels_last as the trainer runs CNNs: behind a stitch point BatchNorm divides by the stitch's
    # own (small, on random anchors) variances, which magnifies the rounding of another memory format
    net = load_run(run).net.to(memory_format=torch.channels_last)
    c = resolve(config, net, train_dir)
    cfg = data.data_config(net.anchors[0])
    ds = data.open_dataset(train_dir, cfg, train=True)
    ds.transform = train_transform(cfg, c.hflip, c.min_crop)
    items = _SeededItems(ds)
    sampler = StitchSampler(net, c.sampling, c.groups, c.seed)
    _set_train_modes(net, c)       # the family's train modes (CNNs: BatchNorm statistics fixed)
    grads: dict[str, torch.Tensor] = {}
    for rank in range(world):
        batch = next(iter(_StepBatches(len(ds), c.batch_size, c.seed, 0, 1, rank, world)))
        x = torch.stack([items[k][0] for k in batch]).contiguous(memory_format=torch.channels_last)
        y = torch.tensor([items[k][1] for k in batch])
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net.select(sampler.pick(0, rank))(x), y, label_smoothing=c.label_smoothing)
        loss.backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad / world      # a rank without this grad adds zero
    opt = _make_optimizer(_param_groups(net, c), c)
    for g in opt.param_groups:
        g["lr"] = c.lr * g["lr_scale"] * lr_factor(0, 0, c.warmup_steps, 0.0)
    for n, p in net.named_parameters():
        p.grad = grads.get(n)
    opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.slow   # torchrun starts two interpreters that import torch and train: ~50 s on 2 busy cores
def test_two_ranks_average_two_routes(tmp_path):
    family = make_family(tmp_path, CNN)
    run = make_run(tmp_path, family)
    before = {n: p.detach().clone() for n, p in load_run(run).net.named_parameters()}
    net = load_run(run).net
    # a seed where the two ranks train different stitches, so that averaging is visible
    seed = next(s for s in range(50) if StitchSampler(net, "uniform", 4, s).pick(0, 0) != StitchSampler(net, "uniform", 4, s).pick(0, 1))
    config = TrainConfig(steps=1, batch_size=4, optimizer="sgd", lr=0.5, seed=seed, eval_limit=8, distill="off",
                         sampling="uniform")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "composer",
           "train", str(run), "--data", family[1], "--eval-data", family[2], "--steps", "1", "--batch-size", "4",
           "--optimizer", "sgd", "--lr", "0.5", "--seed", str(seed), "--eval-limit", "8", "--distill", "off",
           "--sampling", "uniform", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["status"] == "done" and results[0]["step"] == 1   # rank 0 reports

    got = load_file(run / CHECKPOINT / TRAINED)
    # the expectation starts from the fitted weights: move the trained ones out of load_run's way
    (run / CHECKPOINT / TRAINED).rename(tmp_path / "ddp.safetensors")
    want = _expected_after_one_step(run, family[1], config, world=2)
    picked = [StitchSampler(net, "uniform", 4, seed).pick(0, r) for r in range(2)]
    # a route runs its blocks, its stitching layers and its own BatchNorm parameters behind its stitch point
    routes = [set(net.route_prefixes(net.plan.stitches[sid])) | {f"route_stats.{sid}"} for sid in picked]
    for name, value in want.items():   # float sums in another order: ~1e-6 on updates of 0.1 .. 10
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-5), name
    untouched = [n for n in before if not any(n.startswith(p + ".") or n == p for p in routes[0] | routes[1])]
    assert untouched and all(torch.equal(got[n], before[n]) for n in untouched)
    only_rank1 = [n for n in before if any(n.startswith(p + ".") for p in routes[1] - routes[0])]
    assert only_rank1 and any(not torch.equal(got[n], before[n]) for n in only_rank1)
