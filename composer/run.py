"""A run folder: everything one SN-Net needs, readable without this app's state.

RUN/
  manifest.json              anchors (specs), preprocessing, data and fit report, versions
  plan.json                  the stitch plan (same shape as `plan --json`)
  stitch_layers.safetensors  the fitted stitching layers, and each stitch's BatchNorm statistics
                             (`route_stats.*`, see composer.snnet)
  checkpoint/                written by training (see composer.train): all weights + trainer state
Every file is written atomically, so a crash leaves the previous version loadable.
"""
from __future__ import annotations

from composer.errors import UserError
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from composer.costs import describe
from composer.data import check_same_preprocessing
from composer.io import save_safetensors_atomic, write_json_atomic
from composer.plan import StitchPlan, build_plan, load_plan
from composer.snnet import StitchedNetwork
from zoo.adapters import adapt
from zoo.sources import create_anchor

MANIFEST, PLAN, LAYERS, CHECKPOINT = "manifest.json", "plan.json", "stitch_layers.safetensors", "checkpoint"
TRAINED = "snnet.safetensors"   # inside checkpoint/: every weight of the SN-Net after training


class RunError(UserError):
    """A run folder that cannot be written or read; the message says why."""


def load_anchors(specs: list[str], pretrained: bool | None = None, device: str | None = None):
    """Models and their measured infos, in the order given (device="meta": architecture only)."""
    if not specs:
        raise RunError("give at least one anchor")
    models = [create_anchor(s, pretrained, device) for s in specs]
    check_same_preprocessing(models, specs)
    infos = [describe(s, adapt(m)) for s, m in zip(specs, models)]
    return models, infos


def build_network(specs: list[str], pretrained: bool | None = None, **plan_options) -> StitchedNetwork:
    """Anchors -> plan -> (unfitted) stitched network, anchors ordered by MACs."""
    models, infos = load_anchors(specs, pretrained)
    plan = build_plan(infos, **plan_options)
    by_name = {s: m for s, m in zip(specs, models)}
    if len(by_name) != len(specs):
        raise RunError("the same anchor is given twice")
    return StitchedNetwork([by_name[n] for n in plan.anchors], plan)


def check_writable(run_dir: Path) -> Path:
    run_dir = Path(run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise RunError(f"run folder {run_dir} is not writable")
    return run_dir


def save_fitted(run_dir: Path, net: StitchedNetwork, manifest: dict) -> None:
    run_dir = check_writable(run_dir)
    import timm
    manifest = {**manifest, "anchors": net.plan.anchors,
                "versions": {"torch": torch.__version__, "timm": timm.__version__},
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    net.plan.save(run_dir / PLAN)
    # what fitting sets: the stitching layers and each stitch's BatchNorm statistics
    save_safetensors_atomic(run_dir / LAYERS, {**net.stitch_layers.state_dict(),
                                               **{f"route_stats.{k}": v for k, v in net.route_stats.state_dict().items()}})
    write_json_atomic(run_dir / MANIFEST, manifest)


@dataclass
class Run:
    dir: Path
    net: StitchedNetwork
    manifest: dict

    @property
    def plan(self) -> StitchPlan:
        return self.net.plan


def load_run(run_dir: Path, trained: bool = True) -> Run:
    """Rebuild the SN-Net of a run: anchors from their specs, the saved plan and weights.
    With trained=True the latest training checkpoint (if any) replaces the fitted weights."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / MANIFEST).is_file():
        raise RunError(f"{run_dir} is not a run folder (no {MANIFEST}); create one with `fit`")
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        plan_data = json.loads((run_dir / PLAN).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{run_dir}: unreadable run files ({e})") from None
    models, infos = load_anchors(manifest["anchors"], manifest.get("pretrained"))
    net = StitchedNetwork(models, load_plan(plan_data, infos))
    try:
        layers = load_file(run_dir / LAYERS)
        stats = {k.removeprefix("route_stats."): v for k, v in layers.items() if k.startswith("route_stats.")}
        net.stitch_layers.load_state_dict({k: v for k, v in layers.items() if not k.startswith("route_stats.")})
        if stats:     # runs fitted before route statistics existed keep their anchors' statistics
            net.route_stats.load_state_dict(stats)
        trained_file = run_dir / CHECKPOINT / TRAINED
        if trained and trained_file.is_file():
            net.load_state_dict(load_file(trained_file))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"{run_dir}: weights could not be loaded ({str(e).splitlines()[0]})") from None
    return Run(run_dir, net, manifest)
