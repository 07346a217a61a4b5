"""composer.train: SN-Net fine-tuning, checkpoints, exact resume, cancel, kill, CLI.

Anchors are tiny random-weight models saved as timm local-dir: folders (so every load of the run
rebuilds the same weights), data are random PNGs in ImageFolder layout; the helpers here are also
used by test_export.py and test_ddp.py.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models import save_for_hf

import zoo  # noqa: F401  (registers the CIFAR ResNets)
import zoo.starter  # noqa: F401  (registers the starter ViTs)
from composer import cli, data
from composer.fit import calibrate_route_stats, fit_stitches
from composer.run import CHECKPOINT, TRAINED, build_network, load_run, save_fitted
from composer.train import (StitchSampler, TrainConfig, TrainError, checkpoint_step, lr_factor, resolve,
                            train)

ROOT = Path(__file__).resolve().parents[1]
VIT = ("starter_vit_tiny", "starter_vit_small")
CNN = ("cifar_resnet20", "cifar_resnet32")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation (and the machine is shared).
    torch.set_num_threads(1)
    yield


def image_folder(root: Path, n: int, size: int, classes: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = Path(root) / str(i % classes)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(root)


def make_family(tmp: Path, archs=VIT) -> tuple[list[str], str, str]:
    """Random-weight anchors as local-dir: folders + train/val image folders."""
    tmp = Path(tmp)
    specs = []
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        save_for_hf(timm.create_model(arch), str(tmp / "anchors" / arch), safe_serialization=True)
        specs.append(f"local-dir:{tmp / 'anchors' / arch}")
    size = timm.create_model(archs[0]).pretrained_cfg["input_size"][-1]
    return specs, image_folder(tmp / "train", 32, size), image_folder(tmp / "val", 16, size, seed=1)


def make_run(tmp: Path, family: tuple[list[str], str, str], name: str = "run") -> Path:
    """A fitted run folder (least-squares stitching layers), as `python -m composer fit` makes."""
    specs, train_dir, _ = family
    net = build_network(specs, None)
    ds = data.open_dataset(train_dir, data.data_config(net.anchors[0]))
    fit_stitches(net, (x for x, _ in data.loader(ds, 16)))
    calibrate_route_stats(net, (x for x, _ in data.loader(ds, 16)))
    save_fitted(Path(tmp) / name, net, {"pretrained": None})
    return Path(tmp) / name


@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    torch.set_num_threads(1)   # module fixtures run before the per-test thread setting
    return make_family(tmp_path_factory.mktemp("vit"), VIT)


@pytest.fixture(scope="module")
def cnn_family(tmp_path_factory):
    torch.set_num_threads(1)
    return make_family(tmp_path_factory.mktemp("cnn"), CNN)


def small(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "eval_limit": 8, "checkpoint_every": 100, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / CHECKPOINT / TRAINED)


# --- one step trains exactly the sampled route -----------------------------------------------------

def test_one_step_changes_only_the_sampled_route(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    before = load_run(run).net
    events = []
    result = train(run, vit_family[1], small(steps=1, optimizer="sgd", lr=0.1), events=events.append,
                   eval_data=vit_family[2])
    assert result["status"] == "done" and result["step"] == 1
    sid = [e for e in events if e["type"] == "step"][0]["stitch"]
    assert sid == StitchSampler(before, "uniform", 4, seed=0).pick(0)
    on_route = tuple(before.route_prefixes(before.plan.stitches[sid]))
    after = weights(run)
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    inside = {k for k, _ in before.named_parameters() if any(k == p or k.startswith(p + ".") for p in on_route)}
    assert changed and changed <= inside          # nothing off the route moved
    assert len(changed) > len(inside) // 2        # and the route did learn
    # the checkpoint is what load_run gives back
    reloaded = load_run(run).net.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in after.items())


def test_several_stitches_per_step_train_exactly_their_routes(tmp_path, vit_family):
    """stitches_per_step=2: the batch is split between two sampled stitches and one optimizer step
    moves both routes (both stitching layers) and nothing else."""
    run = make_run(tmp_path, vit_family)
    before = load_run(run).net
    plan = before.plan
    def picks_of(seed):
        return [StitchSampler(before, "uniform", 4, seed).pick(0, j) for j in (0, 1)]

    def disjoint_stitches(ids):   # two stitches (not anchors) that share no stitching layer
        a, b = (plan.stitches[i] for i in ids)
        return a.layers and b.layers and not set(a.layers) & set(b.layers)
    seed = next(s for s in range(200) if disjoint_stitches(picks_of(s)))
    picks = picks_of(seed)
    events = []
    train(run, vit_family[1], small(steps=1, optimizer="sgd", lr=0.1, seed=seed, stitches_per_step=2),
          events=events.append, eval_data=vit_family[2])
    after = weights(run)
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    routes = [tuple(before.route_prefixes(plan.stitches[sid])) for sid in picks]

    def on(route):
        return {k for k, _ in before.named_parameters() if any(k == p or k.startswith(p + ".") for p in route)}
    assert changed <= on(routes[0]) | on(routes[1])
    for route in routes:   # each route's own stitching layer learned
        stitch_params = {k for k in on(route) if k.startswith("stitch")}
        assert stitch_params and stitch_params & changed, route
    with pytest.raises(TrainError, match="stitches per step"):
        train(run, vit_family[1], small(steps=2, stitches_per_step=5))    # more stitches than images


def test_events_metrics_and_evaluation(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    events = []
    result = train(run, vit_family[1], small(steps=12, eval_every=5, checkpoint_every=4), events=events.append,
                   eval_data=vit_family[2])
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and types.count("step") == 12
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [4, 8, 12]
    # step 0: the weights before the fine-tune, the original anchors every later evaluation is judged against
    assert [e["step"] for e in events if e["type"] == "eval"] == [0, 5, 10, 12]
    plan = load_run(run).plan
    original = next(e for e in events if e["type"] == "eval")["top1"]
    for e in [e for e in events if e["type"] == "eval"][1:]:
        assert e["reference"] == original
        gaps = []   # by hand: each stitch against the straight line, in MACs, between its original anchors
        for st in plan.stitches:
            if st.is_anchor:
                continue
            ends = sorted({seg.anchor for seg in st.route}, key=lambda a: plan.infos[a].total.macs)
            ids = [next(a.id for a in plan.stitches if a.is_anchor and a.route[0].anchor == end) for end in ends]
            (m0, y0), (m1, y1) = [(plan.cost(i).macs, original[i]) for i in ids]
            gaps.append(e["top1"][st.id] - (y0 + (y1 - y0) * (plan.cost(st).macs - m0) / (m1 - m0)))
        assert e["judged"]["stitches_judged"] == len(gaps)
        assert e["judged"]["within"] == sum(g >= -1.0 for g in gaps)
        assert e["judged"]["worst_gap"] == pytest.approx(min(gaps))
    n = len(plan.stitches)
    final = [e for e in events if e["type"] == "eval"][-1]["top1"]
    assert sorted(final) == list(range(n)) and final == result["top1"]
    steps = [e for e in events if e["type"] == "step"]
    assert all(e["total_steps"] == 12 and e["loss"] > 0 for e in steps)
    # eta = steps left / measured rate: after step s (4 images a step, 32 images: every batch full) the
    # rate is s / elapsed = images_per_s / 4 steps a second, the same clock reading for both numbers
    for e in steps:
        assert e["eta_s"] == pytest.approx((12 - e["step"]) * 4 / e["images_per_s"], rel=1e-9), e
    assert steps[-1]["eta_s"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [10]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 5, 10, 12]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert {s["id"]: s["top1"] for s in evaluation["stitches"]} == final and evaluation["images"] == 8
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train"]["step"] == 12 and manifest["train"]["status"] == "done"


def test_warmup_then_cosine():
    assert lr_factor(0, 0, 4, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 0, 4, 0.0) == pytest.approx(1.0)
    assert lr_factor(50, 0, 4, 0.5) == pytest.approx(0.5)
    assert lr_factor(99, 0, 4, 1.0) == pytest.approx(0.0)


def test_average_toward_the_fitted_weights(tmp_path, vit_family):
    """average=0.5: the checkpoint keeps the weights as trained (a resume continues them: two
    invocations equal one); the run's weights, and its evaluation, are fitted + 0.5 x (trained - fitted)."""
    cfg = dict(optimizer="adamw", lr=1e-2, warmup_steps=1, average=0.5)
    straight = make_run(tmp_path, vit_family, "straight")
    fitted = load_run(straight, trained=False).net.state_dict()
    train(straight, vit_family[1], small(steps=4, **cfg), eval_data=vit_family[2])
    resumed = make_run(tmp_path, vit_family, "resumed")
    cancel = threading.Event()
    train(resumed, vit_family[1], small(steps=4, **cfg), eval_data=vit_family[2], cancel=cancel,
          events=lambda e: e["type"] == "step" and e["step"] == 2 and cancel.set())
    assert checkpoint_step(resumed) == 2
    result = train(resumed, vit_family[1], small(steps=4, **cfg), eval_data=vit_family[2])
    raw = weights(straight)
    assert all(torch.equal(raw[k], v) for k, v in weights(resumed).items())
    net = load_run(resumed).net
    got = net.state_dict()
    moved = [k for k, v in fitted.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert moved
    for k in moved:   # by hand, and neither end
        assert torch.allclose(got[k], (fitted[k] + raw[k]) / 2, atol=1e-6)
        assert not torch.equal(got[k], raw[k])
    assert all(torch.equal(v, raw[k]) for k, v in load_run(resumed, average=False).net.state_dict().items())
    # the final evaluation is of the averaged weights: the same top-1 as evaluating them afresh
    from composer.evaluate import evaluate_all
    ev = data.subset(data.open_dataset(vit_family[2], data.data_config(net.anchors[0]), split="validation"), 8, seed=0)
    assert evaluate_all(net.eval(), data.loader(ev, 4)).top1 == result["top1"]
    from composer.export import _training_text   # an exported stitch's model card says so
    from composer.run import read_manifest
    assert "fitted + 0.5 x (fine-tuned - fitted)" in _training_text(read_manifest(resumed))


# --- resume, cancel, kill --------------------------------------------------------------------------

def test_stop_and_resume_equals_one_run(tmp_path, vit_family):
    """2 x 3 steps with a cancel in the middle give the same weights as one 6-step run."""
    cfg = dict(optimizer="adamw", lr=1e-3, warmup_steps=2)
    straight = make_run(tmp_path, vit_family, "straight")
    train(straight, vit_family[1], small(steps=6, **cfg), eval_data=vit_family[2])

    resumed = make_run(tmp_path, vit_family, "resumed")
    cancel = threading.Event()

    def stop_after_three(e):
        if e["type"] == "step" and e["step"] == 3:
            cancel.set()

    # a worker process loads the images here: augmentation must not depend on who loads them
    first = train(resumed, vit_family[1], small(steps=6, workers=1, **cfg), events=stop_after_three, cancel=cancel,
                  eval_data=vit_family[2])
    assert first["status"] == "cancelled" and first["step"] == 3 and checkpoint_step(resumed) == 3
    events = []
    second = train(resumed, vit_family[1], small(steps=6, **cfg), events=events.append, eval_data=vit_family[2])
    assert events[0]["resumed"] and events[0]["step"] == 3 and second["step"] == 6
    assert not events[0]["eval_on_train_data"]
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming a finished run trains nothing more
    again = train(resumed, vit_family[1], small(steps=6, **cfg), eval_data=vit_family[2])
    assert again["step"] == 6 and all(torch.equal(b[k], v) for k, v in weights(resumed).items())


def test_fp16_scales_the_loss_and_resumes_as_one_run(tmp_path, vit_family):
    """fp16 training uses a gradient scaler (fp16 gradients underflow without one); its scale is
    trainer state: a resume with a fresh scale would skip or scale steps differently."""
    cfg = dict(optimizer="adamw", lr=1e-3, warmup_steps=2, precision="fp16", device="cpu")
    straight = make_run(tmp_path, vit_family, "straight")
    start = load_run(straight).net.state_dict()
    train(straight, vit_family[1], small(steps=6, **cfg), eval_data=vit_family[2])
    state = torch.load(next((straight / CHECKPOINT).glob("trainer-*.pt")), weights_only=True)
    assert 0 < state["scaler"]["scale"] <= 65536.0
    after = weights(straight)
    assert any(not torch.equal(after[k], v) for k, v in start.items() if v.is_floating_point())   # steps were taken

    resumed = make_run(tmp_path, vit_family, "resumed")
    cancel = threading.Event()
    train(resumed, vit_family[1], small(steps=6, **cfg), eval_data=vit_family[2], cancel=cancel,
          events=lambda e: cancel.set() if e["type"] == "step" and e["step"] == 3 else None)
    assert checkpoint_step(resumed) == 3
    train(resumed, vit_family[1], small(steps=6, **cfg), eval_data=vit_family[2])
    assert all(torch.equal(after[k], v) for k, v in weights(resumed).items())
    # the scaler went on from its saved state (a fresh one would have counted 3 steps since its last change)
    again = torch.load(next((resumed / CHECKPOINT).glob("trainer-*.pt")), weights_only=True)
    assert again["scaler"] == state["scaler"] and state["scaler"]["_growth_tracker"] == 6


def test_resume_refuses_another_optimizer(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    train(run, vit_family[1], small(steps=1, optimizer="adamw"), eval_data=vit_family[2])
    with pytest.raises(TrainError, match="optimizer"):
        train(run, vit_family[1], small(steps=2, optimizer="sgd"), eval_data=vit_family[2])


def test_time_budget(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    events = []
    result = train(run, vit_family[1], small(time_budget_min=0.5 / 60), events=events.append)
    assert events[0]["eval_on_train_data"]     # a folder has no validation split of its own
    assert result["status"] == "budget" and result["step"] >= 1 and checkpoint_step(run) == result["step"]


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import zoo, zoo.starter
from composer.train import TrainConfig, train
train({run!r}, {data!r}, TrainConfig(steps=100000, batch_size=4, checkpoint_every=2, eval_limit=4),
      eval_data={data!r})
"""


@pytest.mark.slow   # a second interpreter trains until 6 checkpoints exist: 15-20 s
def test_sigkill_loses_at_most_one_interval(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    script = KILL_SCRIPT.format(root=str(ROOT), run=str(run), data=vit_family[1])
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while (checkpoint_step(run) or 0) < 6:     # let it write a few checkpoints, then kill it
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.05)
        # kill while it is writing: the next checkpoint's temp files are being created right now
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    step = checkpoint_step(run)
    assert step >= 6 and step % 2 == 0
    folder = run / CHECKPOINT
    assert (folder / f"trainer-{step:08d}.pt").is_file()
    load_run(run)                                  # loadable
    result = train(run, vit_family[1], small(steps=step + 2), eval_data=vit_family[2])
    assert result["step"] == step + 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == step + 2


# --- recipes ----------------------------------------------------------------------------------------

def test_stitch_layers_only_keeps_anchors(tmp_path, cnn_family):
    run = make_run(tmp_path, cnn_family)
    before = load_run(run).net.state_dict()
    train(run, cnn_family[1], small(steps=4, stitch_layers_only=True, lr=0.05, sampling="macs_grouped", groups=2),
          eval_data=cnn_family[2])
    after = weights(run)
    anchors = [k for k in before if k.startswith("anchors.")]
    assert all(torch.equal(before[k], after[k]) for k in anchors)   # BN statistics included
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("stitch_layers."))


def test_frozen_fronts_train_only_what_lies_behind_the_stitch_point(tmp_path, vit_family):
    """frozen_fronts: a stitch's step moves its stitching layer and the back anchor's blocks, never
    the first anchor's blocks before the stitch point (nor its stem)."""
    run = make_run(tmp_path, vit_family)
    before = load_run(run).net
    plan = before.plan
    seed = next(s for s in range(100) if plan.stitches[StitchSampler(before, "uniform", 4, s).pick(0)].layers)
    events = []
    train(run, vit_family[1], small(steps=1, optimizer="sgd", lr=0.1, seed=seed, frozen_fronts=True),
          events=events.append, eval_data=vit_family[2])
    stitch = plan.stitches[[e for e in events if e["type"] == "step"][0]["stitch"]]
    after = weights(run)
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    front = stitch.route[0]
    adapter = before.adapters[front.anchor]
    front_prefixes = [f"anchors.{front.anchor}.{n}" for n in adapter.stem_modules] + [
        f"anchors.{front.anchor}.{n}" for u in adapter.units[front.first:front.last + 1] for n in u.modules]
    assert not any(k.startswith(p + ".") for k in changed for p in front_prefixes)
    assert any(k.startswith("stitch_layers.") for k in changed)
    back = stitch.route[-1].anchor
    assert any(k.startswith(f"anchors.{back}.") for k in changed)
    # the same network without the option: the front learns too (the check above can fail)
    run2 = make_run(tmp_path, vit_family, "unfrozen")
    train(run2, vit_family[1], small(steps=1, optimizer="sgd", lr=0.1, seed=seed), eval_data=vit_family[2])
    moved = {k for k, v in before.state_dict().items() if not torch.equal(v, weights(run2)[k])}
    assert any(k.startswith(p + ".") for k in moved for p in front_prefixes)


@pytest.mark.slow   # two CNN runs fitted and trained: ~5 s
def test_freeze_bn_keeps_statistics(tmp_path, cnn_family):
    run = make_run(tmp_path, cnn_family)
    before = load_run(run).net.state_dict()
    train(run, cnn_family[1], small(steps=3, freeze_bn=True), eval_data=cnn_family[2])
    after = weights(run)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("conv1.weight"))
    run = make_run(tmp_path, cnn_family, "moving")        # the converse: training mode moves them
    train(run, cnn_family[1], small(steps=3, freeze_bn=False), eval_data=cnn_family[2])
    assert any(not torch.equal(before[k], v) for k, v in weights(run).items() if k in stats)


def test_distillation_from_itself_costs_nothing(tmp_path, vit_family, monkeypatch):
    """The largest anchor distilled from its own original copy (weight 1): KL is 0 on step one."""
    run = make_run(tmp_path, vit_family)
    largest = len(VIT) - 1
    monkeypatch.setattr(StitchSampler, "pick", lambda self, step, rank=0: largest)
    events = []
    train(run, vit_family[1], small(steps=2, distill="largest", distill_weight=1.0), events=events.append,
          eval_data=vit_family[2])
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[1] > 1e-7   # weights moved after step one


def test_live_distillation_follows_the_anchor_being_trained(tmp_path, vit_family, monkeypatch):
    """distill="live": the teacher is the route's last anchor as trained so far, so on an anchor's
    own route the KL term is 0 at every step (not only the first, as with a frozen original), and a
    stitch's KL equals the one computed by hand against the anchor route of the same network."""
    run = make_run(tmp_path, vit_family)
    largest = len(VIT) - 1
    monkeypatch.setattr(StitchSampler, "pick", lambda self, step, rank=0: largest)
    events = []
    train(run, vit_family[1], small(steps=3, distill="live", distill_weight=1.0), events=events.append,
          eval_data=vit_family[2])
    assert [e["loss"] for e in events if e["type"] == "step"] == pytest.approx([0.0] * 3, abs=1e-6)

    net = load_run(run).net
    stitch = next(s for s in net.plan.stitches if not s.is_anchor)
    anchor = next(s for s in net.plan.stitches if s.is_anchor and s.route[0].anchor == stitch.route[-1].anchor)
    from composer.train import _live_teachers, resolve
    x = torch.randn(2, *net.anchors[0].pretrained_cfg["input_size"])
    teacher = _live_teachers(net, resolve(TrainConfig(steps=1), net))
    net.train()
    with torch.no_grad():
        got = teacher(stitch.id)(x)
        assert net.training            # back in training mode for the student's step
        net.eval()
        want = net.run(anchor, x)
    assert torch.equal(got, want)


def test_macs_grouped_sampling_is_balanced_over_groups(vit_family, tmp_path):
    net = load_run(make_run(tmp_path, vit_family)).net
    sampler = StitchSampler(net, "macs_grouped", 3, seed=0)
    by_macs = sorted(range(len(net.plan.stitches)), key=lambda i: net.plan.cost(i).macs)
    groups = [set(g.tolist()) for g in np.array_split(by_macs, 3)]
    picks = [sampler.pick(s) for s in range(3000)]
    shares = [sum(p in g for p in picks) / len(picks) for g in groups]
    assert all(abs(s - 1 / 3) < 0.04 for s in shares)
    assert set(picks) == set(range(len(net.plan.stitches)))
    # with frozen anchors, anchors (ids 0..A-1) have nothing to train and are never drawn
    frozen = StitchSampler(net, "uniform", 1, seed=0, anchors=False)
    assert set(frozen.pick(s) for s in range(500)) == set(range(len(VIT), len(net.plan.stitches)))


def test_defaults_per_family(vit_family, cnn_family, tmp_path):
    vit = load_run(make_run(tmp_path, vit_family, "v")).net
    cnn = load_run(make_run(tmp_path, cnn_family, "c")).net
    v, c = resolve(TrainConfig(steps=1), vit), resolve(TrainConfig(steps=1), cnn)
    assert (v.optimizer, v.anchor_lr_scale, v.freeze_bn, v.distill, v.sampling, v.anchor_share) == (
        "adamw", 1.0, False, "anchors", "uniform", None)
    assert (c.optimizer, c.anchor_lr_scale, c.freeze_bn, c.distill, c.sampling, c.anchor_share) == (
        "adamw", 0.3, True, "anchors", "need", 0.3)
    assert (v.average, c.average) == (1.0, 0.8)
    # the batch follows the device: a CPU's time budget buys steps in proportion to it
    assert resolve(TrainConfig(steps=1, device="cpu"), cnn).batch_size == 32
    assert resolve(TrainConfig(steps=1, device="cuda:0"), vit).batch_size == 64
    assert resolve(TrainConfig(steps=1, device="cpu", batch_size=8), cnn).batch_size == 8
    assert resolve(TrainConfig(steps=1, sampling="uniform", anchor_share=0.1), cnn).sampling == "uniform"   # as asked
    assert resolve(TrainConfig(steps=1, sampling="uniform"), cnn).anchor_share is None    # SN-Net's uniform, exactly
    assert resolve(TrainConfig(steps=1), cnn, teachers=False).distill == "off"   # random anchors: nothing to learn from
    assert resolve(TrainConfig(steps=1, lr=0.5, distill="none"), cnn).lr == 0.5
    assert resolve(TrainConfig(steps=1, distill=""), cnn).distill == "off"
    assert resolve(TrainConfig(steps=1), cnn, "starter").hflip == 0.0
    with pytest.raises(TrainError, match="steps or a time budget"):
        resolve(TrainConfig(), vit)
    with pytest.raises(TrainError, match="sampling"):
        resolve(TrainConfig(steps=1, sampling="random"), vit)


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_train_json_and_errors(tmp_path, vit_family, capsys):
    run = make_run(tmp_path, vit_family)
    code = cli.main(["train", str(run), "--data", vit_family[1], "--eval-data", vit_family[2], "--steps", "2",
                     "--batch-size", "4", "--eval-limit", "8", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and out["step"] == 2 and len(out["top1"]) == len(load_run(run).plan.stitches)

    assert cli.main(["train", str(run), "--data", str(tmp_path / "nope"), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "does not exist" in err
    assert cli.main(["train", str(run), "--data", vit_family[1]]) == 2
    assert "steps or a time budget" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "norun"), "--data", vit_family[1], "--steps", "1"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):       # argparse's own one-line error
        cli.main(["train", str(run), "--data", vit_family[1], "--steps", "3", "--average", "0"])
    assert "--average: must be greater than 0" in capsys.readouterr().err
    assert checkpoint_step(run) == 2      # nothing lost by the failed calls


def test_need_sampling_draws_stitches_by_how_far_their_loss_lies_above_the_anchors_line(vit_family, tmp_path):
    from composer.judge import anchor_ids, line_ends
    from composer.train import NEED_SHARE, NeedScores
    net = load_run(make_run(tmp_path, vit_family)).net
    plan = net.plan
    sampler = StitchSampler(net, "need", 1, seed=0)
    sampler.need = scores = NeedScores(net)
    stitches = [s.id for s in plan.stitches if not s.is_anchor]
    assert len(stitches) >= 3
    # before any loss is known: uniform
    assert set(sampler.pick(s) for s in range(400)) == set(range(len(plan.stitches)))
    ids = anchor_ids(plan)
    for a in ids.values():
        scores.observe(a, 1.0)
    # by hand: the line between the anchors' losses is 1.0 everywhere; needs 0.5, 0 (below the line), 1.5
    hungry, fine, hungriest = stitches[:3]
    for sid, loss in ((hungry, 1.5), (fine, 0.7), (hungriest, 2.5)):
        scores.observe(sid, loss)
    assert (scores.need(hungry), scores.need(fine), scores.need(hungriest)) == (0.5, 0.0, 1.5)
    # an exponential average: a second observation moves the score by (1 - DECAY) of the difference
    scores.observe(fine, 0.2)
    assert scores.loss[fine] == pytest.approx(NeedScores.DECAY * 0.7 + (1 - NeedScores.DECAY) * 0.2)
    # the line interpolates in MACs between a stitch's two anchors
    lo, hi = line_ends(plan, plan.stitches[hungry])
    scores.observe(ids[hi], 3.0)          # anchor losses 1.0 (lo) and 1 -> 0.8 + 0.2 * 3 = 1.4 (hi)
    m = [plan.cost(i).macs for i in (ids[lo], hungry, ids[hi])]
    line = 1.0 + (m[1] - m[0]) / (m[2] - m[0]) * (1.4 - 1.0)
    assert scores.need(hungry) == pytest.approx(max(0.0, 1.5 - line))
    # the draws: half uniform, half in proportion to need (unmeasured routes count as the average need)
    needs = {i: scores.need(i) for i in range(len(plan.stitches))}
    known = [n for n in needs.values() if n is not None]
    w = {i: (sum(known) / len(known) if n is None else n) for i, n in needs.items()}
    total = sum(w.values())
    n = 6000
    picks = [sampler.pick(s) for s in range(n)]
    for sid in (hungry, fine, hungriest):
        expect = (1 - NEED_SHARE) / len(w) + NEED_SHARE * w[sid] / total
        se = (expect * (1 - expect) / n) ** 0.5
        assert abs(picks.count(sid) / n - expect) < 4 * se, sid
    # anchor_share: anchors' own routes drawn apart with that probability
    share = StitchSampler(net, "uniform", 1, seed=1, anchor_share=0.5)
    drawn = [share.pick(s) for s in range(4000)]
    frac = sum(d in set(ids.values()) for d in drawn) / len(drawn)
    assert abs(frac - 0.5) < 4 * (0.25 / len(drawn)) ** 0.5


def test_need_sampling_resumes_as_one_run(tmp_path, vit_family):
    cfg = dict(seed=3, sampling="need", checkpoint_every=2)
    straight = make_run(tmp_path, vit_family, "straight")
    train(straight, vit_family[1], small(steps=6, **cfg))
    resumed = make_run(tmp_path, vit_family, "resumed")
    cancel = threading.Event()
    first = train(resumed, vit_family[1], small(steps=6, **cfg), cancel=cancel,
                  events=lambda e: e["type"] == "step" and e["step"] == 3 and cancel.set())
    assert first["step"] == 3
    train(resumed, vit_family[1], small(steps=6, **cfg))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(next((resumed / "checkpoint").glob("trainer-*.pt")), weights_only=True)
    assert saved["sampler"]["need"]     # the scores travel with the checkpoint
