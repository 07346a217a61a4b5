"""composer.train's guards (issues 5 and 12): a diverged run stops with status "diverged" and never
writes a checkpoint with non-finite weights (the CLI then ends with one `error:` line, exit 2; a
later resume continues from the last finite checkpoint and says so); a resumed run repeats no
record of metrics.jsonl; a batch larger than the training set is refused in one line before the
run's network is even loaded.

Uses test_train.py's tiny random-weight starter ViTs (local-dir: anchors) and random images.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composer import data
from composer.run import CHECKPOINT, METRICS, read_manifest, read_metrics, write_manifest
from composer.train import TrainConfig, TrainError, checkpoint_step, train
from tests.test_train import VIT, make_family, make_run, small, weights


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    torch.set_num_threads(1)
    return make_family(tmp_path_factory.mktemp("vit"), VIT)


def _finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_divergence_stops_keeps_the_last_finite_checkpoint_and_resume_says_so(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    _, train_dir, _ = vit_family
    r = train(run, train_dir, small(steps=4, eval_every=2, checkpoint_every=2))
    assert r["status"] == "done" and checkpoint_step(run) == 4
    before = weights(run)
    metrics_before = read_metrics(run)

    events = []
    r = train(run, train_dir, small(steps=60, lr=1e9, checkpoint_every=1, eval_every=1), events=events.append)
    assert r["status"] == "diverged", r
    kept = r["step"]      # the last checkpoint whose weights and optimizer state were all finite
    assert 4 <= kept < r["diverged_at"] and r["top1"] == {}
    assert events[-1]["type"] == "diverged"
    # nothing past the finite checkpoint: every weight on disk finite, one trainer state beside them
    assert checkpoint_step(run) == kept and _finite(weights(run))
    if kept == 4:
        assert all(torch.equal(weights(run)[k], before[k]) for k in before)
    assert len(list((run / CHECKPOINT).glob("trainer-*.pt"))) == 1
    state = torch.load(next((run / CHECKPOINT).glob("trainer-*.pt")), weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for st in state["optimizer"]["state"].values() for v in st.values()
               if torch.is_tensor(v) and v.is_floating_point())
    # metrics past the checkpoint describe weights that are gone: dropped, and the divergence said
    records = read_metrics(run)
    assert all(m.get("step", 0) <= kept for m in records[:-1])
    assert records[:len(metrics_before)] == metrics_before
    assert records[-1]["type"] == "diverged" and records[-1]["checkpoint_step"] == kept
    manifest = read_manifest(run)
    assert manifest["train"]["step"] == kept and manifest["train_diverged"]["checkpoint_step"] == kept

    # resume: refused nothing, continues from step 4 and says the previous run diverged
    events = []
    r = train(run, train_dir, small(steps=kept + 2, lr=1e-4), events=events.append)
    assert r["status"] in ("done", "diverged")
    start = next(e for e in events if e["type"] == "start")
    assert start["step"] == kept and start["after_divergence"]["at_step"] > kept
    if r["status"] == "diverged":    # the absurd finite weights of step `kept` may diverge again: that is said too
        return
    assert "train_diverged" not in read_manifest(run)     # a finite checkpoint past it replaces the record


def test_divergence_before_the_first_checkpoint_keeps_the_fitted_weights(tmp_path, vit_family):
    from safetensors.torch import load_file
    run = make_run(tmp_path, vit_family)
    _, train_dir, _ = vit_family
    fitted = load_file(run / "stitch_layers.safetensors")
    r = train(run, train_dir, small(steps=60, lr=1e9))       # no checkpoint due before it diverges
    assert r["status"] == "diverged" and r["step"] == 0
    assert not (run / CHECKPOINT / "snnet.safetensors").exists()
    assert all(torch.equal(load_file(run / "stitch_layers.safetensors")[k], v) for k, v in fitted.items())
    assert "train" not in read_manifest(run)              # the model card says: not fine-tuned


def test_cli_train_diverged_is_one_error_line(tmp_path, vit_family, main):
    run = make_run(tmp_path, vit_family)
    _, train_dir, _ = vit_family
    r = main("train", run, "--data", train_dir, "--steps", 60, "--lr", 1e9, "--batch-size", 4,
             "--eval-limit", 8, "--checkpoint-every", 1)
    assert r.returncode == 2, r
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "diverged at step" in lines[0] and "lower --lr" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def _keys(run: Path) -> list[tuple]:
    return [(m.get("type"), m.get("step")) for m in read_metrics(run)]


def test_a_resumed_run_repeats_no_metrics_record(tmp_path, vit_family):
    run = make_run(tmp_path, vit_family)
    _, train_dir, _ = vit_family
    train(run, train_dir, small(steps=4, eval_every=2))
    first = _keys(run)
    assert first.count(("eval", 4)) == 1 and ("eval", 2) in first
    # resumed with nothing left to do: the evaluation at step 4 is not logged again
    r = train(run, train_dir, small(steps=4, eval_every=2))
    assert r["status"] == "done" and r["top1"]
    assert _keys(run) == first
    # cancelled right after a periodic evaluation, then resumed: every (type, step) once
    import threading
    cancel = threading.Event()

    def stop_after_eval(e):
        if e["type"] == "eval" and e["step"] == 6:
            cancel.set()
    r = train(run, train_dir, small(steps=10, eval_every=2), events=stop_after_eval, cancel=cancel)
    assert r["status"] == "cancelled" and r["step"] == 6
    train(run, train_dir, small(steps=10, eval_every=2))
    keys = _keys(run)
    assert len(keys) == len(set(keys)), keys
    assert [s for t, s in keys if t == "eval"] == [0, 2, 4, 6, 8, 10]   # 0: before the fine-tune, once


def test_a_batch_larger_than_the_training_set_is_refused_before_loading(tmp_path, vit_family, main, monkeypatch):
    run = make_run(tmp_path, vit_family)
    specs, train_dir, _ = vit_family
    # the run's preprocessing, as `fit` records it: the training set is opened with it first
    from composer.run import load_run
    cfg = data.data_config(load_run(run).net.anchors[0])
    manifest = read_manifest(run)
    manifest["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    write_manifest(run, manifest)

    import composer.train as train_mod

    def no_loading(*a, **k):
        raise AssertionError("the run was loaded before the batch size was checked")
    monkeypatch.setattr(train_mod, "load_run", no_loading)
    with pytest.raises(TrainError) as e:
        train(run, train_dir, TrainConfig(steps=1, batch_size=33))
    assert "larger than the training set (32 images" in str(e.value) and "\n" not in str(e.value)
    r = main("train", run, "--data", train_dir, "--steps", 1, "--batch-size", 1000)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: the batch size (1000)")
    assert not (run / METRICS).exists() and not (run / CHECKPOINT).exists()
    monkeypatch.undo()
    # a run without a recorded preprocessing is refused too (after loading), in the same words
    manifest.pop("data_config")
    write_manifest(run, manifest)
    with pytest.raises(TrainError, match="larger than the training set"):
        train(run, train_dir, TrainConfig(steps=1, batch_size=33))
