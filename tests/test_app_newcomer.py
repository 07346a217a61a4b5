"""The app as a newcomer meets it (issue 13), through its API as a script drives it (gradio_client):
nothing fitted or trained is lost silently, and every message is true. One test per numbered
problem of the issue, each failing on the behaviour the issue describes; the browser side (the
page opens on the starter family, the status line and the graph's banner agree, typed numbers are
not rounded, the members table fits) is in test_browser.py.

The app fixture (starter family, a data root with a tiny ImageFolder) is test_app_api.py's.
"""
from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import pytest

from tests.test_app_api import _new, _poll_until, _starter_session, app, client, starter  # noqa: F401

pytestmark = pytest.mark.slow

# /restore and the family endpoints answer `everything` in this order (docs/app_api.md)
GRAPH, CURVE, PICKED, PROGRESS, TIMER, KERNEL, STRIDE, ALL_PAIRS, RUNS, FILES = 4, 6, 8, 9, 10, 13, 14, 15, 16, 17
FORM = slice(18, 24)


def _fit(client, key, calib=32, images=50) -> list:
    out = client.predict(key, "starter", calib, images, "macs", api_name="/fit")
    assert "⚠" not in out[-1], out[-1]
    return out


def _train(client, key, steps, lr=0, distill="none", every=0, batch=16) -> str:
    status = client.predict(key, steps, lr, batch, "uniform", distill, every, "starter", api_name="/train_start")[-1]
    assert "⚠" not in status, status
    return status


def _until_ended(client, key, timeout=300) -> tuple[str, int, str, str]:
    """(state, step, progress HTML, the status line the poll gave when the job ended)."""
    t0, ended = time.time(), None
    while time.time() - t0 < timeout:
        html, curve, budget, timer, status = client.predict(key, "macs", api_name="/train_poll")
        if status:
            ended = status
        m = re.search(r"data-state='(\w+)' data-step='(\d+)'", html)
        if m and m.group(1) not in ("starting", "running") and ended is not None:
            return m.group(1), int(m.group(2)), html, ended
        time.sleep(0.3)
    raise AssertionError(f"the fine-tune did not end in {timeout} s: {html}")


def _run_dirs(config, key) -> list[Path]:
    return sorted((Path(config.runs_root) / key).glob("run-*"))


# --- 1 · a plan edit never discards a fit or a fine-tune silently -------------------------------------

def test_1_plan_edits_keep_the_trained_run_which_reopens_as_it_was(client, app):
    _, _, config = app
    key = _starter_session(client)
    _fit(client, key)
    _train(client, key, 6)
    assert _until_ended(client, key)[:2] == ("done", 6)
    client.predict(key, 5, "macs", api_name="/select_stitch")
    before = client.predict(key, api_name="/restore")
    assert "step 6" in before[CURVE]["layout"]["title"]["text"]

    # one click on two blocks: a new plan beside the run, and the status says which run is kept and where
    graph = client.predict(key, 0, 1, 1, 3, api_name="/add_stitch")
    assert not graph["error"] and "run-1 (fine-tuned to step 6) is kept" in graph["message"]
    assert "earlier runs" in graph["message"]
    restored = client.predict(key, api_name="/restore")
    assert "data" not in restored[CURVE]                                      # a new plan: not fitted yet
    assert [v for _, v in restored[RUNS]["choices"]] == ["run-1"] and restored[RUNS]["value"] is None
    assert "No fine-tune yet" in restored[PROGRESS]
    # export says what to do instead of "nothing to export"
    files, status = client.predict(key, api_name="/export_snnet")
    assert "⚠" in status and "reopen an earlier run" in status, status
    # an x on an edge and an unticked anchor say the same while a run is shown
    g = client.predict(key, [0, 1, 1, 3], api_name="/remove_stitch")
    assert not g["error"]
    out = client.predict(key, "run-1", api_name="/open_run")
    assert "reopened run-1 (fine-tuned to step 6)" in out[-1], out[-1]
    specs = [a["spec"] for a in out[GRAPH]["anchors"]]
    g = client.predict(key, specs[1:], api_name="/set_anchors")
    assert not g["error"] and "run-1 (fine-tuned to step 6) is kept" in g["message"]

    # reopened: plan, fit quality, curve (the fine-tuned accuracies), selection and fine-tune state as left
    out = client.predict(key, "run-1", api_name="/open_run")
    assert out[GRAPH]["anchors"] == before[GRAPH]["anchors"] and out[GRAPH]["edges"] == before[GRAPH]["edges"]
    assert out[CURVE]["data"] == before[CURVE]["data"] and "after 6 steps" in out[CURVE]["layout"]["title"]["text"]
    assert "Selected stitch 5" in out[PICKED] and out[GRAPH]["route"]["stitch"] == 5
    assert "data-state='done' data-step='6'" in out[PROGRESS]
    assert out[RUNS]["value"] == "run-1"
    files, status = client.predict(key, api_name="/export_snnet")
    assert "exported snnet-" in status, status
    # the export is the fine-tuned run's
    with zipfile.ZipFile(files[-1]) as z:
        card = next(z.read(n).decode() for n in z.namelist() if n.endswith("README.md"))
    assert "fine-tuned for 6 steps" in card
    # and a fine-tune continues it
    _train(client, key, 2)
    assert _until_ended(client, key)[:2] == ("done", 8)
    assert len(_run_dirs(config, key)) == 1


# --- 2 · distillation "none" is what runs and what is recorded ----------------------------------------

def test_2_the_recipe_shown_is_the_recipe_run_and_recorded(client, app):
    key = _starter_session(client)
    _fit(client, key)
    _train(client, key, 2, distill="none")
    state, step, html, _ = _until_ended(client, key)
    assert state == "done" and "no distillation" in html
    run = _run_dirs(app[2], key)[0]
    assert json.loads((run / "manifest.json").read_text())["train"]["config"]["distill"] == "off"
    client.predict(key, 0, "macs", api_name="/select_stitch")
    files, status = client.predict(key, api_name="/export_stitch")
    with zipfile.ZipFile(files[-1]) as z:
        card = next(z.read(n).decode() for n in z.namelist() if n.endswith("README.md"))
    assert "distillation off" in card and "distillation anchors" not in card
    # the family default is named in words as the trainer resolved it, and recorded the same
    _train(client, key, 2, distill="default")
    state, step, html, _ = _until_ended(client, key)
    assert state == "done" and "distillation from each route's own anchor" in html
    assert json.loads((run / "manifest.json").read_text())["train"]["config"]["distill"] == "anchors"


# --- 3 · the app opens on the starter family -------------------------------------------------------

def test_3_a_new_page_opens_on_the_starter_family(client):
    key = _new(client)
    restored = client.predict(key, api_name="/restore")
    assert "starter" in restored[GRAPH]["message"].lower() and "opening" in restored[-1]
    out = client.predict(key, api_name="/open_starter")
    assert out[0]["value"] == "starter" and len(out[GRAPH]["anchors"]) == 3 and len(out[GRAPH]["edges"]) == 20
    assert "23 stitches" in out[-1] and "⚠" not in out[-1]
    assert [r[0] for r in out[2]["data"]] == ["starter_vit_tiny", "starter_vit_small", "starter_vit_base"]
    # a session that shows a family keeps it
    client.predict(key, 1, 1, False, api_name="/set_options")
    client.predict(key, api_name="/open_starter")
    restored = client.predict(key, api_name="/restore")
    assert restored[KERNEL] == 1 and len(restored[GRAPH]["edges"]) == 2 * 4


# --- 4 · steps are steps to add; a reload shows the server's job ----------------------------------------

def test_4_steps_to_add_and_a_reload_shows_the_job_and_its_form(client):
    key = _starter_session(client)
    _fit(client, key)
    status = _train(client, key, 6, batch=16, every=3)
    assert "6 steps, step 0 → 6" in status
    assert _until_ended(client, key)[:2] == ("done", 6)
    # the form after a reload: what was started, so Start / resume continues the same recipe
    restored = client.predict(key, api_name="/restore")
    assert list(restored[FORM]) == [6, 0, 16, "uniform", "none", 3]
    assert "data-state='done' data-step='6'" in restored[PROGRESS]
    status = _train(client, key, 4, batch=16)
    assert "4 steps, step 6 → 10 (resuming from its checkpoint)" in status, status
    state, step, html, ended = _until_ended(client, key)
    assert (state, step) == ("done", 10) and "step 10 / 10" in html and "4 steps trained" in html
    assert "resumed from step 6" in html and "fine-tune done" in ended
    # a reload while it runs reattaches to it
    _train(client, key, 100000, batch=16)
    _poll_until(client, key, {"running"})
    restored = client.predict(key, api_name="/restore")
    assert restored[TIMER]["active"] is True and "reattached" in restored[-1]
    assert re.search(r"data-state='running'", restored[PROGRESS]) and "/ 100010" in restored[PROGRESS]
    client.predict(key, api_name="/train_cancel")
    assert _until_ended(client, key)[0] == "cancelled"


# --- 5 · a diverged fine-tune is reported as such ------------------------------------------------------

def test_5_divergence_stops_the_job_with_a_clear_message(client, app):
    key = _starter_session(client)
    fitted = _fit(client, key)
    fit_curve = client.predict(key, "macs", api_name="/set_axis")[0]
    _train(client, key, 40, lr=1e9)
    state, step, html, ended = _until_ended(client, key)
    assert state == "diverged", html
    assert ended.startswith("<span") and "⚠" in ended and "diverged at step" in ended
    assert "lower the learning rate" in ended.lower() and "finished" not in ended
    assert "· loss nan" not in html           # no NaN loss reported as the run's result (the reason names it)
    run = _run_dirs(app[2], key)[0]
    from composer.run import CHECKPOINT
    from composer.train import checkpoint_step
    kept = checkpoint_step(run) or 0
    if kept:
        from safetensors.torch import load_file
        import torch
        assert all(bool(torch.isfinite(v).all()) for v in load_file(run / CHECKPOINT / "snnet.safetensors").values()
                   if v.is_floating_point())
    # the curve shows what was measured of the weights kept (the fit here): no stitch at chance from NaNs
    curve = client.predict(key, "macs", api_name="/set_axis")[0]
    if not kept:
        assert [t["y"] for t in curve["data"]] == [t["y"] for t in fit_curve["data"]]
    # start again at the default lr: resumes from what was kept, and says the last one diverged
    _train(client, key, 2)
    state, step, html, _ = _until_ended(client, key)
    assert state in ("done", "diverged") and "previous fine-tune diverged" in html, html
    assert fitted


# --- 6 · data-path refusals say how to fix them ---------------------------------------------------------

def test_6_data_refusals_say_what_to_do(client, app, tmp_path, monkeypatch):
    key = _starter_session(client)
    msgs = {bad: client.predict(key, bad, 8, 8, "macs", api_name="/fit")[-1]
            for bad in ("/nonexistent/imagenet", "/etc", "nonexistent")}
    assert "does not exist" in msgs["/nonexistent/imagenet"] and "--data-root" in msgs["/nonexistent/imagenet"]
    assert "outside" in msgs["/etc"] and "--data-root /etc" in msgs["/etc"]
    assert "does not exist" in msgs["nonexistent"] and "ImageFolder" in msgs["nonexistent"]
    assert len(set(msgs.values())) == 3
    # a data set by name that is not downloaded: what to do, not torchvision's "download=True"
    monkeypatch.setenv("ZOO_COMPOSER_DATA", str(tmp_path / "empty"))
    out = client.predict(key, "torch/cifar10", 8, 8, "macs", api_name="/fit")[-1]
    assert "not downloaded" in out and "download=True" in out and "You can use" not in out, out
    assert "never downloads" in out
    # a data root that does not exist yet is named so, with the flag
    from composer.ui.session import AppConfig, AppError, Session
    s = Session("x" * 20, AppConfig(runs_root=tmp_path / "r", exports_dir=tmp_path / "e",
                                    data_roots=[tmp_path / "not-yet"]))
    with pytest.raises(AppError, match=r"not-yet \(not created yet\).*--data-root"):
        s.resolve_data("/etc")
    s = Session("y" * 20, AppConfig(runs_root=tmp_path / "r", exports_dir=tmp_path / "e", data_roots=[]))
    with pytest.raises(AppError, match="restart it with --data-root"):
        s.resolve_data("/etc")


# --- 7 · export before a pick -----------------------------------------------------------------------------

def test_7_export_before_picking_says_pick_first(client):
    key = _starter_session(client)
    _fit(client, key)
    files, status = client.predict(key, api_name="/export_stitch")
    assert "⚠" in status and "pick a stitch first" in status and "None" not in status


# --- 8 · no stale or contradicting message ----------------------------------------------------------------

def test_8_messages_are_about_the_latest_action(client, app):
    key = _starter_session(client)
    _fit(client, key)
    _train(client, key, 40, lr=1e9)
    assert _until_ended(client, key)[0] == "diverged"
    # the graph never says "fine-tuning started" (the status line does, while it is the latest news)
    assert "fine-tuning started" not in client.predict(key, api_name="/restore")[GRAPH]["message"]
    # a new fit: a new run, and the progress panel no longer shows the previous run's fine-tune
    out = client.predict(key, "starter", 32, 50, "macs", api_name="/fit")
    progress, status = out[5], out[-1]
    assert "No fine-tune yet" in progress and "nan" not in progress
    assert "run-1 (diverged at step" in status
    # a failed family: the family shown stays, and the dropdown names it again (not "custom")
    t0 = time.time()
    out = client.predict(key, "hf-hub:timm/not_downloaded_a, hf-hub:timm/not_downloaded_b", api_name="/custom_family")
    assert time.time() - t0 < 10
    assert out[0]["value"] == "starter" and "still showing Starter" in out[-1], out[-1]
    assert "not downloaded yet" in out[-1] and "\n" not in out[-1]
    assert len(client.predict(key, api_name="/restore")[GRAPH]["anchors"]) == 3


# --- 9 · reset restores every default ---------------------------------------------------------------------

def test_9_reset_restores_kernel_stride_and_pairs(client):
    key = _starter_session(client)
    out = client.predict(key, 99, 2, True, api_name="/set_options")
    assert list(out[5:8]) == [99, 2, True] and "kernel 99, stride 2, all pairs" in out[1]
    out = client.predict(key, api_name="/reset_plan")
    kernel, stride, all_pairs = out[5:8]
    assert (kernel, stride, all_pairs) == (2, 1, False), out[5:8]
    assert "kernel 2, stride 1, nearest pairs" in out[1] and "23 stitches" in out[1]
    restored = client.predict(key, api_name="/restore")
    assert (restored[KERNEL], restored[STRIDE], restored[ALL_PAIRS]) == (2, 1, False)
    # a refused option leaves the boxes on what the plan uses
    out = client.predict(key, 0, 3, True, api_name="/set_options")
    assert out[0]["error"] and "kernel" in out[0]["message"] and list(out[5:8]) == [2, 1, False]


# --- 10 · typed numbers are checked, never replaced ---------------------------------------------------------

def test_10_inputs_are_refused_not_changed(client, app):
    key = _starter_session(client)
    status = client.predict(key, "starter", 32, 0, "macs", api_name="/fit")[-1]
    assert "⚠" in status and "evaluation images" in status and "got 0" in status
    _fit(client, key, 32, 50)
    for steps in (2.5, 0, "x"):
        status = client.predict(key, steps, 0, 16, "uniform", "none", 0, "starter", api_name="/train_start")[-1]
        assert "⚠" in status and "steps to add" in status, (steps, status)
    for batch in (16.5, -1):    # 0 is the default batch (32 on a CPU, 64 on a GPU)
        assert "⚠" in client.predict(key, 2, 0, batch, "uniform", "none", 0, "starter", api_name="/train_start")[-1]
    assert "⚠" in client.predict(key, 2, -1, 16, "uniform", "none", 0, "starter", api_name="/train_start")[-1]
    assert "⚠" in client.predict(key, 1.5, 1, False, api_name="/set_options")[-1]
    graph, curve, picked, status = client.predict(key, 2.5, "macs", api_name="/select_stitch")
    assert "⚠" in status and "whole number" in status
    # a family of one anchor is no family to stitch
    out = client.predict(key, "resnet18", api_name="/custom_family")
    assert "⚠" in out[-1] and "at least two anchors" in out[-1] and "1 stitches" not in out[-1]
    specs = [a["spec"] for a in client.predict(key, api_name="/restore")[GRAPH]["anchors"]]
    g = client.predict(key, specs[:1], api_name="/set_anchors")
    assert g["error"] and "at least two anchors" in g["message"]
    assert len(g["anchors"]) == 3
    # a batch larger than the training set: one line, nothing started
    status = client.predict(key, 2, 0, 4000, "uniform", "none", 0, "starter", api_name="/train_start")[-1]
    assert "⚠" not in status     # the check is the trainer's: the job ends with its reason
    state, step, html, ended = _until_ended(client, key)
    assert state == "error" and "larger than the training set" in ended


# --- the smaller ones ----------------------------------------------------------------------------------------

def test_exports_made_through_the_api_are_listed_after_a_reload(client):
    key = _starter_session(client)
    _fit(client, key)
    client.predict(key, 3, "macs", api_name="/select_stitch")
    files, status = client.predict(key, api_name="/export_stitch")
    restored = client.predict(key, api_name="/restore")
    assert [Path(f).name for f in restored[FILES]] == [Path(f).name for f in files] and len(files) == 1


def test_markdown_with_less_than_signs_keeps_its_bold():
    from composer.ui.views import md_safe
    text = "**shrink: stitch 12 DMS <=0.5M**: 1.00 M -> 0.50 M MACs\n\n```\na <= b\n```"
    out = md_safe(text)
    assert "**shrink: stitch 12 DMS &lt;=0.5M**: 1.00 M -> 0.50 M" in out and "```\na <= b\n```" in out


def test_anchor_labels_do_not_share_a_place_on_a_crowded_axis():
    from composer.curve import CurvePoint, _label_positions
    pts = [CurvePoint(i, "", x, 50.0, i < 3) for i, x in enumerate([0.30, 0.31, 0.33, 0.1, 1.0])]
    anchors = [p for p in pts if p.is_anchor]
    places = _label_positions(anchors, pts)
    assert len(set(places)) == 3
    far = [CurvePoint(i, "", x, 50.0, True) for i, x in enumerate([0.1, 0.5, 1.0])]
    assert _label_positions(far, far) == ["top center"] * 3


def test_a_hub_family_offline_is_refused_at_once(tmp_path):
    from composer.ui.session import AppConfig, AppError, FamilyEntry, Session
    s = Session("z" * 20, AppConfig(runs_root=tmp_path / "r", exports_dir=tmp_path / "e"))
    s.families["hub:1"] = FamilyEntry("hub:1", "deit_*.fb_in1k", "hub",
                                      ["hf-hub:timm/deit_tiny_patch16_224.not_cached", "hf-hub:timm/deit_small_patch16_224.not_cached"])
    t0 = time.time()
    with pytest.raises(AppError) as e:
        s.choose_family("hub:1")
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert "needs the Hugging Face Hub" in msg and "starter" in msg and "\n" not in msg and len(msg) < 400


def test_readme_cli_section_starts_with_a_starter_example():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cli = readme.split("## The CLI", 1)[1]
    first_block = cli.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line.startswith("python -m composer")]
    assert commands and all("starter" in c for c in commands)
    assert not any(w in first_block for w in ("imagenet", "hf-hub:", "/data/"))
    assert {c.split()[3] for c in commands} >= {"fit", "train", "curve", "export"}
