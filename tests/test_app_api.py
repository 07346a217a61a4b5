"""The app through its API (gradio_client), as a script would drive it: browse, plan, edit, fit,
fine-tune, curve, select, download; plus the security rules and bad input."""
from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import need_shared

gradio_client = pytest.importorskip("gradio_client")
# Every test here drives an app on the starter family, which the first one trains (~1 min): the whole
# module is slow (python -m pytest -m "not slow" leaves it out; the default run includes it).
pytestmark = pytest.mark.slow

NEAREST_DEFAULT = 3 + 2 * 10   # starter: 3 anchors, depth 4, kernel 2 stride 1 -> 10 stitches per pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def starter(request, tmp_path_factory):
    """The starter family (conftest's shared build if there is one), and data specs pointing at it."""
    try:
        fam = request.getfixturevalue("starter_family")
    except pytest.FixtureLookupError:
        from zoo.starter import ensure_starter
        cache = os.environ.get("ZOO_COMPOSER_CACHE") or tmp_path_factory.mktemp("starter-cache")
        fam = ensure_starter(cache, progress=False)
    old = os.environ.get("ZOO_COMPOSER_CACHE")
    os.environ["ZOO_COMPOSER_CACHE"] = str(Path(fam.root).parent)   # the "starter" data spec reads it
    yield fam
    if old is None:
        os.environ.pop("ZOO_COMPOSER_CACHE", None)
    else:
        os.environ["ZOO_COMPOSER_CACHE"] = old


@pytest.fixture(scope="module")
def app(starter, tmp_path_factory):
    from composer.ui import build_app, launch
    from composer.ui.session import AppConfig
    tmp = tmp_path_factory.mktemp("app")
    data_root = tmp / "data"
    _image_folder(data_root / "tiny", classes=2, per_class=3)
    (tmp / "outside").mkdir()
    (data_root / "escape").symlink_to(tmp / "outside")     # a link out of the root must not count as inside
    config = AppConfig(runs_root=tmp / "runs", exports_dir=tmp / "exports", data_roots=[data_root],
                       model_roots=[tmp / "models"], eval_limit=100)
    demo = build_app(config)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    yield demo, url, config
    demo.close()


def _image_folder(root: Path, classes: int, per_class: int) -> None:
    from PIL import Image
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * c, 10 * i, 0)).save(root / str(c) / f"{i}.png")


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[1], verbose=False)


def _new(client) -> str:
    key = client.predict(api_name="/new_session")
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", key)
    return key


def _starter_session(client) -> str:
    key = _new(client)
    out = client.predict(key, "starter", api_name="/choose_family")
    assert "⚠" not in out[-1], out[-1]
    return key


def _graph_of(client, key) -> dict:
    # /set_axis is cheap and has no side effect on the plan: use /restore to read the graph
    return client.predict(key, api_name="/restore")[4]


def test_every_event_has_an_explicit_api_name(app):
    demo = app[0]
    names = [fn.api_name for fn in demo.fns.values() if fn.fn is not None]
    assert all(names) and len(names) == len(set(names))
    info = gradio_client.Client(app[1], verbose=False).view_api(return_format="dict", print_info=False)
    documented = set(info["named_endpoints"])
    for name in ("new_session", "restore", "list_families", "choose_family", "set_anchors", "set_options",
                 "reset_plan", "add_stitch", "move_stitch", "remove_stitch", "fit", "train_start", "train_poll",
                 "train_cancel", "select_stitch", "set_axis", "pick_under_budget", "measure_latency",
                 "export_stitch", "export_snnet", "export_candidate", "open_starter", "open_run"):
        assert f"/{name}" in documented


def test_browse_members_match_an_independent_count(client, starter):
    from composer.costs import model_cost
    from zoo.sources import create_anchor
    key = _new(client)
    choices, line, status = client.predict(key, "", api_name="/list_families")
    assert "starter" in [c[1] for c in choices["choices"]]
    assert line                                     # one status line about the Hub, online or not
    out = client.predict(key, "starter", api_name="/choose_family")
    table = out[2]
    by_name = {row[0]: row for row in table["data"]}
    assert list(by_name) == ["starter_vit_tiny", "starter_vit_small", "starter_vit_base"]   # by MACs
    for spec in starter.anchors:
        cost = model_cost(create_anchor(spec))       # with weights, on the CPU: a separate measurement
        row = by_name[spec.rsplit("/", 1)[-1]]
        assert row[1] == pytest.approx(cost.params / 1e6, abs=1e-3)
        assert row[2] == pytest.approx(cost.macs / 1e6, abs=1e-3)
        assert row[3] == "16x16" and row[4] == 4 and "digits" in row[5]
    graph = out[4]
    assert [a["name"] for a in graph["anchors"]] == list(by_name)
    assert [a["macs"] for a in graph["anchors"]] == sorted(a["macs"] for a in graph["anchors"])
    assert len(graph["edges"]) == NEAREST_DEFAULT - 3
    # every edge joins neighbours in MACs, front block -> back block, with a shape label on blocks
    assert all(e["point"][2] == e["point"][0] + 1 for e in graph["edges"])
    assert all(b["shape"] for a in graph["anchors"] for b in a["blocks"])


def test_plan_edits_and_refusals(client):
    key = _starter_session(client)
    g = client.predict(key, 1, 0, 0, 3, api_name="/add_stitch")           # larger -> smaller
    assert g["error"] and "wrong way" in g["message"]
    assert len(g["edges"]) == NEAREST_DEFAULT - 3                         # nothing changed
    g = client.predict(key, 0, 0, 1, 0, api_name="/add_stitch")           # a default one
    assert g["error"] and "already exists" in g["message"]
    g = client.predict(key, 0, 0, 0, 2, api_name="/add_stitch")
    assert g["error"] and "two different anchors" in g["message"]
    g = client.predict(key, 0, 9, 1, 0, api_name="/add_stitch")
    assert g["error"] and "blocks 0..3" in g["message"]
    g = client.predict(key, 0, 0, 1, 3, api_name="/add_stitch")
    assert not g["error"] and [0, 0, 1, 3] in [e["point"] for e in g["edges"]]
    assert len(g["edges"]) == NEAREST_DEFAULT - 3 + 1
    g = client.predict(key, [0, 0, 1, 3], "back", [1, 2], api_name="/move_stitch")
    points = [e["point"] for e in g["edges"]]
    assert not g["error"] and [0, 0, 1, 2] in points and [0, 0, 1, 3] not in points
    g = client.predict(key, [0, 0, 1, 2], "front", [2, 1], api_name="/move_stitch")   # 2 -> 1: wrong way
    assert g["error"] and [0, 0, 1, 2] in [e["point"] for e in g["edges"]]
    g = client.predict(key, [0, 0, 1, 2], api_name="/remove_stitch")
    assert not g["error"] and len(g["edges"]) == NEAREST_DEFAULT - 3
    g = client.predict(key, [0, 0, 1, 2], api_name="/remove_stitch")
    assert g["error"] and "not in the plan" in g["message"]
    # kernel 1: only j == k inside each window of one block -> 4 per pair
    out = client.predict(key, 1, 1, False, api_name="/set_options")
    assert len(out[0]["edges"]) == 2 * 4 and "11 stitches" in out[1]
    out = client.predict(key, 2, 1, True, api_name="/set_options")        # all pairs: 3 pairs x 10
    assert len(out[0]["edges"]) == 3 * 10
    out = client.predict(key, 0, 1, False, api_name="/set_options")
    assert out[0]["error"] and "kernel" in out[0]["message"]
    g = client.predict(key, ["local-dir:/etc"], api_name="/set_anchors")
    assert g["error"] and "not a member" in g["message"]
    g = client.predict(key, [], api_name="/set_anchors")
    assert g["error"] and "at least two anchors" in g["message"]
    specs = [a["spec"] for a in g["anchors"]]
    g = client.predict(key, specs[::2], api_name="/set_anchors")        # tiny + base: one pair
    assert not g["error"] and len(g["anchors"]) == 2 and len(g["edges"]) == 10


def test_bad_sessions_and_paths_are_refused(client, app, tmp_path):
    _, url, config = app
    out = client.predict("not-a-session", "", api_name="/list_families")
    assert "no session" in out[-1]
    out = client.predict("x" * 20, "starter", api_name="/choose_family")
    assert "expired" in out[-1]
    key = _starter_session(client)
    for bad, why in (("/etc", "is outside the data folder roots"), ("../../etc", "is not a folder under"),
                     ("escape", "is not a folder under"), ("nonexistent", "does not exist"),
                     ("", "choose calibration data")):
        out = client.predict(key, bad, 8, 8, "macs", api_name="/fit")
        assert why in out[-1], (bad, out[-1])
    out = client.predict(key, "tiny", 6, 6, "macs", api_name="/fit")       # inside the data root: fine
    assert "fitted" in out[-1]
    out = client.predict(key, "0", api_name="/custom_family")
    assert "⚠" in out[-1]
    out = client.predict(key, "local-dir:/etc/passwd, local-dir:/etc", api_name="/custom_family")
    assert "is outside the model folder roots" in out[-1] and "--model-root" in out[-1]
    # files the app did not export are never served
    manifest = next(Path(config.runs_root).rglob("manifest.json"))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}gradio_api/file={manifest}")
    assert e.value.code == 403


def _poll_until(client, key, states, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        html = client.predict(key, "macs", api_name="/train_poll")[0]
        m = re.search(r"data-state='(\w+)' data-step='(\d+)'", html)
        if m and m.group(1) in states:
            return m.group(1), int(m.group(2)), html
        time.sleep(0.3)
    raise AssertionError(f"training did not reach {states} in {timeout} s: {html}")


@pytest.mark.slow
def test_full_flow_fit_finetune_select_download(client, app, tmp_path):
    from composer import load_stitched
    from composer.run import load_run
    _, url, config = app
    key = _starter_session(client)
    g = client.predict(key, 0, 1, 1, 3, api_name="/add_stitch")
    assert not g["error"]
    added = NEAREST_DEFAULT          # the new stitch gets the next id
    graph, curve, budget, picked, runs, progress, status, fit_status = client.predict(key, "starter", 64, 100, "macs",
                                                                                     api_name="/fit")
    assert "fitted 7 stitching layers on 64 images" in fit_status
    assert all(e["r2"] is not None and e["colour"] != "#8c96a8" for e in graph["edges"])
    ids = sorted(i for t in curve["data"] for i in (t.get("customdata") or []) if t["name"] in ("stitches", "anchors"))
    assert ids == list(range(NEAREST_DEFAULT + 1))
    run_dir = next((Path(config.runs_root) / key).glob("run-*"))
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["images"] == 100

    # fine-tune a few steps; bad input meanwhile is refused and does not disturb the job
    progress, timer, status = client.predict(key, 6, 0, 16, "uniform", "none", 3, "starter", api_name="/train_start")
    assert "started" in status
    g = client.predict(key, 0, 0, 1, 3, api_name="/add_stitch")
    assert g["error"] and "fine-tune is running" in g["message"]
    assert "running" in client.predict(key, "starter", 8, 8, "macs", api_name="/fit")[-1]
    state, step, progress_html = _poll_until(client, key, {"done", "error"})
    assert state == "done" and step == 6, progress_html
    curve = client.predict(key, "macs", api_name="/set_axis")[0]
    assert "fine-tuning" in curve["layout"]["title"]["text"]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # step 0: the weights before the fine-tune, on the same held-out images
    evals = {m["step"]: m for m in metrics if m["type"] == "eval"}
    assert list(evals) == [0, 3, 6]
    # the curve draws the original anchors' line (dashed) from the step-0 evaluation ...
    ref = next(t for t in curve["data"] if t["name"].startswith("original anchors"))
    assert ref["line"]["dash"] == "dash"
    anchors = [s for s in load_run(run_dir).plan.stitches if s.is_anchor]
    assert sorted(ref["y"]) == sorted(evals[0]["top1"][str(a.id)] for a in anchors)
    # ... and the progress says how many stitches lie within 1 point of it, as judged at step 6
    j = evals[6]["judged"]
    assert f"{j['within']} of {j['stitches_judged']} stitches within 1 point of the original line" in progress_html

    # resume: two more steps continue from step 6
    client.predict(key, 2, 0, 16, "uniform", "none", 0, "starter", api_name="/train_start")
    state, step, html = _poll_until(client, key, {"done", "error"})
    assert (state, step) == ("done", 8) and "resumed from step 6" in html, html

    # select the hand-made stitch, pick under a budget, export and load it
    graph, curve, picked, status = client.predict(key, added, "macs", api_name="/select_stitch")
    assert graph["route"]["stitch"] == added and graph["route"]["edges"] == [[0, 1, 1, 3]]
    assert f"stitch {added}" in picked
    selected = [t for t in curve["data"] if t["name"] == "selected"]
    assert selected and selected[0]["customdata"] == [added]
    graph, curve, picked, status = client.predict(key, "macs", 0.3, api_name="/pick_under_budget")
    assert graph["route"]["stitch"] == 0          # only the smallest anchor costs under 0.3 M MACs
    client.predict(key, added, "macs", api_name="/select_stitch")
    files, status = client.predict(key, api_name="/export_stitch")
    assert "exported" in status and len(files) == 1
    zip_path = Path(files[0])
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        z.extractall(tmp_path)
    folder = tmp_path / names[0].split("/")[0]
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    model = load_stitched(folder)
    net = load_run(run_dir).net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.select(added)(x))
    files, status = client.predict(key, api_name="/export_snnet")
    assert len(files) == 2
    with zipfile.ZipFile(next(f for f in files if "snnet-" in Path(f).name)) as z:
        assert any(n.endswith("snnet.safetensors") for n in z.namelist())


@pytest.mark.slow
def test_cancel_then_resume_and_two_sessions(client):
    a, b = _starter_session(client), _new(client)
    client.predict(a, "starter", 32, 50, "macs", api_name="/fit")
    client.predict(a, 100000, 0, 8, "macs_grouped", "none", 0, "starter", api_name="/train_start")
    _poll_until(client, a, {"running"})
    restored = client.predict(a, api_name="/restore")          # a reloaded page finds the job again
    assert "reattached" in restored[-1] and restored[10]["active"] is True
    # the other session has its own (empty) state and cannot see or stop a's job
    assert "no fine-tune is running" in client.predict(b, api_name="/train_cancel")
    assert client.predict(b, api_name="/restore")[4]["anchors"] == []
    assert "cancelling" in client.predict(a, api_name="/train_cancel")
    state, step, html = _poll_until(client, a, {"cancelled", "error"})
    assert state == "cancelled" and 0 < step < 100000, html
    client.predict(a, 2, 0, 8, "macs_grouped", "none", 0, "starter", api_name="/train_start")   # 2 more steps
    state, step2, html = _poll_until(client, a, {"done", "error"})
    assert (state, step2) == ("done", step + 2), html
    assert f"resumed from step {step}" in html


def _builder_until_done(client, key, timeout=300) -> tuple[str, str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        line, result, plot, curve, timer = client.predict(key, "macs", api_name="/builder_poll")
        if line.startswith(("✓", "⚠")):
            return line, result
        time.sleep(0.3)
    raise AssertionError(f"builder did not end in {timeout} s: {line}")


def _candidate_traces(client, key) -> dict[str, list]:
    curve = client.predict(key, "macs", api_name="/set_axis")[0]
    return {t["name"]: t for t in curve["data"] if str((t.get("customdata") or [""])[0]).count(":")}


@pytest.mark.slow
def test_other_builders_join_the_curve(client, app, tmp_path):
    """Scale, shrink and elastic from the app on the starter run: each adds its candidates to the
    run, and the curve draws the measured ones; bad input is refused without disturbing a job.
    Shrink and elastic candidates download as zips (/export_candidate). Fold says why it has nothing
    to fold, scale_fill fills the biggest gap, latency_fit gives R^2."""
    from composer.run import read_candidates
    from composer.run import load_plan_of_run
    _, _, config = app
    key = _starter_session(client)
    assert "⚠" in client.predict(key, 0, 2.0, 0.8, "macs", api_name="/scale")[-1]   # nothing fitted yet
    client.predict(key, "starter", 32, 100, "macs", api_name="/fit")
    run_dir = next((Path(config.runs_root) / key).glob("run-*"))

    report, curve, status = client.predict(key, 0, 2.0, 0.8, "macs", api_name="/scale")
    assert "predicted" in report and "⚠" not in status
    assert "⚠" in client.predict(key, 0, -1, 0.8, "macs", api_name="/scale")[-1]

    timer, line, status = client.predict(key, 2, 50, 6, api_name="/shrink_start")
    assert "started" in status
    assert "is running" in client.predict(key, 2, "macs", "30", 8, 0, 0, api_name="/elastic_start")[-1]   # one job at a time
    line, shrink_report = _builder_until_done(client, key)
    assert line.startswith("✓ shrink"), line
    assert "MACs counted" in shrink_report

    # from a stitch: section 7 lists the anchors, then the run's stitches as "stitch ID"
    plan = app[0].store.get(key).plan
    sid = next(st.id for st in plan.stitches if not st.is_anchor and st.route[-1].anchor == 2)
    listed = next(fn.fn for fn in app[0].fns.values() if fn.api_name == "builder_anchors")(key, None)
    values = [v for _, v in listed.choices]
    assert values[:3] == [0, 1, 2] and values[3:] == [f"stitch {st.id}" for st in plan.stitches if not st.is_anchor]
    assert any(label.startswith(f"stitch {sid}: {plan.describe_route(sid)}") for label, _ in listed.choices)
    timer, line, status = client.predict(key, f"stitch {sid}", 50, 6, api_name="/shrink_start")
    assert "started" in status
    # bad choices while it runs: one line each, nothing started, and the job goes on
    for endpoint, args, why in (
            ("/elastic_start", (f"stitch {sid}", "macs", "70", 8, 0, 2), "progressive shrinking works on an anchor, "
                                                                         f"not on a stitch yet: set its steps to 0"),
            ("/shrink_start", (f"stitch {len(plan.stitches)}", 50, 6), f"stitch {len(plan.stitches)} does not exist"),
            ("/shrink_start", ("anchor 1", 50, 6), "start from an anchor index or 'stitch ID', not 'anchor 1'"),
            ("/scale", (f"stitch {sid}", 2.0, 0.8, "macs"), "scaling works from an anchor's configuration")):
        status = client.predict(key, *args, api_name=endpoint)[-1]
        assert "⚠" in status and why in status and "\n" not in status and "Traceback" not in status, (endpoint, status)
    assert app[0].store.get(key).builder.kind == "shrink"
    line, report = _builder_until_done(client, key)
    assert line.startswith("✓ shrink"), line
    # and elastic from the same stitch (no progressive shrinking), MACs budgets of the stitch's own
    timer, line, status = client.predict(key, f"stitch {sid}", "macs", "60", 8, 0, 0, api_name="/elastic_start")
    assert "started" in status, status
    line, report = _builder_until_done(client, key)
    assert line.startswith("✓ elastic"), line

    # latency budgets: a latency table is measured first, budgets are % of the anchor's own latency;
    # two progressive-shrinking steps first, their weights kept in the run
    timer, line, status = client.predict(key, 1, "latency", "90, 100", 8, 512, 2, api_name="/elastic_start")
    line, report = _builder_until_done(client, key)
    assert line.startswith("✓ elastic"), line
    assert "rank correlation" in report and "no BatchNorm layers" in report   # the starter ViTs have none
    assert "progressive shrinking: 2 steps" in report and (run_dir / "elastic" / "anchor1.safetensors").is_file()

    stored = read_candidates(run_dir)
    assert {c.method for c in stored} == {"scale", "shrink", "elastic"}
    anchor_macs = load_plan_of_run(run_dir).infos[2].total.macs
    shrunk = next(c for c in stored if c.method == "shrink" and c.config["stitch"] is None)
    from_stitch = [c for c in stored if c.config.get("stitch") == sid]
    assert sorted(c.method for c in from_stitch) == ["elastic", "shrink"]
    for c in from_stitch:   # the source names the stitch; the budget is the stitch's own MACs
        assert c.source == f"stitch {sid}: {plan.describe_route(sid)}" and c.name.startswith(f"stitch {sid} ")
        assert c.status == "measured" and c.macs <= (0.5 if c.method == "shrink" else 0.6) * plan.cost(sid).macs * 1.02
    assert shrunk.macs <= 0.5 * anchor_macs * 1.02 and shrunk.status == "measured"
    assert shrunk.latency_ms > 0 and f"latency here {shrunk.latency_ms:.3f} ms" in shrink_report   # like fold's
    elastic = [c for c in stored if c.method == "elastic" and c.config["stitch"] is None]
    assert elastic and all(c.config["budget"]["metric"] == "latency" for c in elastic)
    assert all(c.config["latency_predicted_ms"] <= c.config["budget"]["value"] * 1.0001 for c in elastic)
    traces = _candidate_traces(client, key)
    drawn = {cd for t in traces.values() for cd in t["customdata"]}
    measured = {f"{c.method}:{c.name}" for c in stored if c.top1 is not None}
    assert measured and measured <= drawn
    assert not any(cd.startswith("scale:") for cd in drawn)       # predicted costs only: not on the accuracy axis
    described = app[0].store.get(key).candidate_md(f"shrink:{shrunk.name}")   # what a click on the point shows
    assert shrunk.name in described and "measured" in described
    # a click on a candidate's point (the page's point_click event) describes it and names it for the download
    import gradio as gr
    click = next(fn.fn for fn in app[0].fns.values() if fn.api_name == "curve_point_click")
    *_, described, status, named = click(key, "macs", gr.EventData(None, {"id": f"shrink:{shrunk.name}"}))
    assert named == f"shrink:{shrunk.name}" and "⚠" not in status
    assert shrunk.name.replace("<", "&lt;") in described    # '<' escaped: Gradio's Markdown keeps the bold around it
    for n, c in enumerate((shrunk, min(elastic, key=lambda c: c.macs), *from_stitch)):
        _downloaded_candidate_equals_the_masked_anchor(client, key, run_dir, c, tmp_path / str(n))
    for bad, why in (("", "click an elastic or shrink point"), ("nope", "no candidate 'nope'"),
                     (f"scale:{next(c.name for c in stored if c.method == 'scale')}", "not an elastic or shrink")):
        files, status = client.predict(key, bad, api_name="/export_candidate")
        assert why in status and "⚠" in status, (bad, status)

    # fold: the starter ViTs have nothing linear to merge; the job ends saying so and adds nothing
    timer, line, status = client.predict(key, 0, api_name="/fold_start")
    assert "started" in status
    line, report = _builder_until_done(client, key)
    assert line.startswith("⚠ fold: nothing folds in") and "LayerNorm" in line, line
    assert not any(c.method == "fold" for c in read_candidates(run_dir))
    # from a stitch, the exported stitch is what is folded: the job names the stitch, whatever it finds
    client.predict(key, f"stitch {sid}", api_name="/fold_start")
    line, report = _builder_until_done(client, key)
    assert f"stitch {sid}" in line and line.startswith(("✓ fold", "⚠ fold: nothing folds in")), line

    # scale_fill: a dWr size inside the biggest MACs ratio between neighbouring anchors, with the
    # MACs that the scaled model counts
    from composer.costs import model_cost
    from composer.builders.scaling import anchor_config, build, dwr_scale
    before = {c.name for c in read_candidates(run_dir) if c.method == "scale"}
    report, curve, status = client.predict(key, 0, 1.0, 0.8, "macs", api_name="/scale_fill")
    assert "predicted" in report and "⚠" not in status, status
    [fill] = [c for c in read_candidates(run_dir) if c.method == "scale" and c.name not in before]
    macs = sorted(info.total.macs for info in load_plan_of_run(run_dir).infos)
    gaps = [hi / lo for lo, hi in zip(macs, macs[1:])]
    i = gaps.index(max(gaps))
    assert macs[i] < fill.macs < macs[i + 1] and fill.status == "predicted" and fill.top1 is None
    scaled = dwr_scale(anchor_config(fill.source), fill.config["s"], 0.8)
    assert scaled.to_dict() == fill.config["scaled"]
    assert model_cost(build(scaled, "cpu"), (3, scaled.resolution, scaled.resolution)).macs == fill.macs

    # latency_fit: refused before latency is measured; then R^2 of the straight lines through every
    # point with a latency (stitches, and the elastic candidates timed under their latency budgets)
    assert "measure latency first" in client.predict(key, api_name="/latency_fit")[-1]
    client.predict(key, api_name="/measure_latency")
    report, status = client.predict(key, api_name="/latency_fit")
    session = app[0].store.get(key)
    plan = session.plan
    points = [(plan.cost(plan.stitches[sid]), ms) for sid, ms in session.latency.items()]
    points += [(c, c.latency_ms) for c in read_candidates(run_dir) if c.latency_ms is not None]
    assert len(points) > len(session.latency) and f"through {len(points)} measured points" in report, report
    r2 = [float(v) for v in re.findall(r"\*\*([0-9.]+)\*\*", report)]
    lat = [ms for _, ms in points]
    for got, what in zip(r2, ("macs", "activations")):
        want = np.corrcoef([getattr(c, what) for c, _ in points], lat)[0, 1] ** 2
        assert 0 <= got <= 1 and got == pytest.approx(want, abs=6e-4)
    assert len(r2) == 2


def _downloaded_candidate_equals_the_masked_anchor(client, key: str, run_dir: Path, c, tmp_path: Path) -> None:
    """/export_candidate of a stored candidate: the zip's sub-network loads with composer.builders.elastic's
    loader and gives the logits of the run's anchor computing the candidate's configuration with
    masks (no extraction): for shrink after its permutation, for elastic with its importance order
    and the progressive-shrinking weights kept in the run. A stitch's candidate is compared with the
    stitch's route (composer.export.route_of). The starter ViTs have no BatchNorm, so no statistics
    differ between the two."""
    from composer.builders.elastic import anchor_of_run, load_subnet, stitch_of_run
    from composer.export import route_of
    from composer.run import load_run
    from composer.builders.subnet import SubnetConfig, config_masks, elastic_space, masked, permute_
    files, status = client.predict(key, f"{c.method}:{c.name}", api_name="/export_candidate")
    assert "⚠" not in status, status
    exported_name = re.search(r"exported (\S+\.zip)", status).group(1)   # this export's zip among the session's
    zip_path = Path(next(f for f in files if Path(f).name == exported_name))
    assert exported_name.startswith(f"{c.method}-")
    out = tmp_path / c.method
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(out)
    [folder] = list(out.iterdir())
    assert {"model.safetensors", "config.json"} <= {f.name for f in folder.iterdir()}
    exported = load_subnet(folder)
    sid = c.config.get("stitch")
    if c.method == "shrink":
        net = load_run(run_dir).net
        if sid is None:
            anchor = net.anchors[c.config["anchor_index"]].eval()
            space = elastic_space(anchor)
        else:
            anchor = route_of(net, sid)[0]
            space = elastic_space(anchor, tuple(net.plan.infos[net.plan.stitches[sid].route[0].anchor].input_size))
        permute_(anchor, space, c.config["order"])
    elif sid is not None:
        a = stitch_of_run(run_dir, sid)
        anchor, space = a.model.eval(), a.space
    else:
        a = anchor_of_run(run_dir, c.config["anchor"])
        anchor, space = a.model.eval(), a.space
    config = SubnetConfig.from_dict(c.config["subnet"])
    x = torch.randn(4, *space.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked(anchor, space, *config_masks(space, config)):
        want = anchor(x)
    with torch.no_grad():
        assert not torch.allclose(anchor(x), want, atol=1e-4)     # something is cut
        torch.testing.assert_close(exported(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_app_builders_on_the_real_cifar_resnets(tmp_path):
    """The app's session on the real ResNet-20/32 of ../shared: custom anchors, fit on 64 JPEGs,
    then shrink and fold as the app's jobs run them (composer.builders.build, here in one thread) and
    the download of the shrunk network. Cross-checks: the anchors' top-1 that each builder measures
    before changing anything equals the fit's evaluation of the same 64 images; the downloaded
    network counts the candidate's MACs and measures its top-1 again."""
    need_shared()
    from bench.cifar10 import cifar10_splits, cifar_anchor_specs
    from composer import data as data_mod
    from composer.run import read_candidates
    from composer.costs import model_cost
    from composer.builders.elastic import load_subnet, top1
    from composer.builders import build
    from composer.ui.session import AppConfig, Session
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # a second thread only waits on a busy 2-core machine
    try:
        cache = tmp_path / "cache"
        splits = cifar10_splits(cache)
        specs = cifar_anchor_specs(cache)[:2]
        config = AppConfig(runs_root=tmp_path / "runs", exports_dir=tmp_path / "exports", data_roots=[splits.root],
                           model_roots=[cache / "cifar10-resnet"], eval_limit=64)
        s = Session("cifar-session-key-0", config)
        s.custom_family(", ".join(specs))
        s.choose_family("custom")
        s.fit("calib", 64, 64)
        anchor_top1 = {st.route[0].anchor: s.top1[st.id] for st in s.plan.stitches if st.is_anchor}
        assert min(anchor_top1.values()) > 70          # real weights (chance is 10 %)
        run, eval_spec, i = s.run_dir, s.data, 1   # what the app's jobs pass: the session's run and data
        full = s.plan.infos[1].total.macs
        result = build("shrink", run, anchor=i, data=eval_spec, eval_data=eval_spec, target_macs=0.6 * full, steps=5,
                       eval_limit=config.eval_limit, latency=True)
        assert result.summary.startswith("shrink: ")
        [shrunk] = [c for c in read_candidates(run) if c.method == "shrink"]
        assert shrunk.macs <= 0.6 * full and shrunk.latency_ms > 0 and shrunk.top1 > 30
        assert shrunk.config["top1_before"] == pytest.approx(anchor_top1[1])
        result = build("fold", run, anchor=0, data=eval_spec, limit=config.eval_limit)
        assert result.summary.startswith("fold: ") and (run / "folded" / "anchor0" / "model.safetensors").is_file()
        [folded] = [c for c in read_candidates(run) if c.method == "fold"]
        assert folded.config["source_top1"] == pytest.approx(anchor_top1[0]) and folded.config["images"] == 64
        assert abs(folded.top1 - anchor_top1[0]) <= 100 / 64 and folded.config["folds"] == 19   # conv+BN pairs

        zip_path = s.export("candidate", candidate=f"shrink:{shrunk.name}")
        assert zip_path.resolve() in s.exports
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp_path / "download")
        net = load_subnet(next((tmp_path / "download").iterdir()))
        assert model_cost(net).macs == shrunk.macs
        ds = data_mod.open_dataset(eval_spec, data_mod.data_config(net), split="validation")
        assert top1(net, data_mod.loader(data_mod.subset(ds, 64, seed=0), 64)) == pytest.approx(shrunk.top1)
    finally:
        torch.set_num_threads(before)
