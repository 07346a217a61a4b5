"""The accuracy curve: Pareto front, figure content, `python -m composer curve`."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from composer.curve import best_under, curve_figure, curve_rows, pareto_front, read_top1
from composer.plan import build_plan
from composer.run import load_anchors

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ["cifar_resnet20", "cifar_resnet32"]


def _dominated(p, q) -> bool:
    """q beats p: no more cost, no less accuracy, better in one (the definition, spelled out)."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


def test_pareto_front_small_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 50.0)]) == [0]
    # (2, 40) is beaten by (1, 50); (3, 70) and (5, 80) extend the front; (4, 60) is beaten by (3, 70)
    pts = [(2, 40), (1, 50), (3, 70), (4, 60), (5, 80)]
    assert pareto_front(pts) == [1, 2, 4]
    # equal x: only the better y; exact duplicates: the first one
    assert pareto_front([(1, 10), (1, 20), (1, 20)]) == [1]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 10), rng.randint(0, 10)) for _ in range(rng.randint(1, 15))]
        got = pareto_front(pts)
        undominated = {p for p in pts if not any(_dominated(p, q) for q in pts)}
        assert {pts[i] for i in got} == undominated
        assert len(got) == len(undominated)          # one index per distinct front point
        assert [pts[i][0] for i in got] == sorted(pts[i][0] for i in got)


def test_best_under_budget():
    pts = [(1, 50), (2, 70), (3, 65), (4, 90)]
    assert best_under(pts, 0.5) is None
    assert best_under(pts, 1) == 0
    assert best_under(pts, 3.5) == 1
    assert best_under(pts, 10) == 3


@pytest.fixture(scope="module")
def plan():
    _, infos = load_anchors(ANCHORS, pretrained=False, device="meta")
    return build_plan(infos)


def _top1(plan) -> dict[int, float]:
    # accuracy grows with MACs except for a few stitches, so the front is a strict subset
    macs = {s.id: plan.cost(s).macs for s in plan.stitches}
    order = sorted(macs, key=macs.get)
    return {sid: 60.0 + 2 * rank - (5.0 if rank % 3 == 1 else 0.0) for rank, sid in enumerate(order)}


def test_figure_has_every_stitch_with_route_and_id(plan):
    top1 = _top1(plan)
    fig = curve_figure(plan, top1, "macs", highlight=3)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"Pareto front", "stitches", "anchors", "selected"}
    ids = list(by_name["stitches"].customdata) + list(by_name["anchors"].customdata)
    assert sorted(ids) == [s.id for s in plan.stitches]
    assert list(by_name["anchors"].customdata) == [0, 1]
    for t in (by_name["stitches"], by_name["anchors"]):
        for sid, x, y, text in zip(t.customdata, t.x, t.y, t.text):
            assert x == pytest.approx(plan.cost(sid).macs / 1e6)
            assert y == top1[sid]
            assert plan.describe_route(sid) in text
    assert list(by_name["selected"].customdata) == [3]
    # the drawn front is exactly the undominated points, computed here by brute force
    pts = {sid: (plan.cost(sid).macs, top1[sid]) for sid in top1}
    undominated = sorted((p for p in pts.values() if not any(_dominated(p, q) for q in pts.values())))
    front = by_name["Pareto front"]
    assert [(x * 1e6, y) for x, y in zip(front.x, front.y)] == pytest.approx(undominated)
    assert "1 multiply-add = 1" in fig.layout.xaxis.title.text


def test_figure_other_axes_and_missing_latency(plan):
    top1 = _top1(plan)
    fig = curve_figure(plan, top1, "params")
    stitches = next(t for t in fig.data if t.name == "stitches")
    assert list(stitches.x) == pytest.approx([plan.cost(i).params / 1e6 for i in stitches.customdata])
    lat = {sid: float(sid) for sid in top1}
    fig = curve_figure(plan, top1, "latency", latency=lat)
    stitches = next(t for t in fig.data if t.name == "stitches")
    assert list(stitches.x) == [float(i) for i in stitches.customdata]
    from composer.curve import CurveError
    with pytest.raises(CurveError, match="latency"):
        curve_figure(plan, top1, "latency")
    with pytest.raises(CurveError, match="one of"):
        curve_figure(plan, top1, "flops")


def _write_run(run: Path, plan, top1) -> None:
    """A run folder as `fit` + `evaluate` leave it (weights are not needed to draw the curve)."""
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"anchors": plan.anchors, "pretrained": False}))
    plan.save(run / "plan.json")
    rows = [{"id": s.id, "top1": top1[s.id]} for s in plan.stitches]
    (run / "evaluation.json").write_text(json.dumps({"data": "x", "images": 10, "stitches": rows}))


def _cli(*args) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "composer", "curve", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _main(capsys, *args) -> tuple[int, str]:
    """The same CLI in this process (a fresh interpreter per call costs seconds on 2 cores)."""
    from composer.cli import main
    code = main(["curve", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_curve_json_and_offline_html(plan, tmp_path, capsys):
    top1 = _top1(plan)
    run = tmp_path / "run"
    _write_run(run, plan, top1)
    r = _cli(run, "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data == json.loads(json.dumps(curve_rows(plan, top1, "macs")))
    assert {s["id"]: s["top1"] for s in data["stitches"]} == top1

    code, err = _main(capsys, run, "--x", "activations", "--out", tmp_path / "c.html")
    assert code == 0, err
    html = (tmp_path / "c.html").read_text()
    assert "<script src=" not in html and 'src="http' not in html   # plotly.js is inline, no CDN
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    last = len(plan.stitches) - 1
    assert f"stitch {last}: " + plan.describe_route(last).replace(">", "\\u003e") in html


def test_cli_curve_reads_latest_training_eval(plan, tmp_path):
    run = tmp_path / "run"
    _write_run(run, plan, _top1(plan))
    newer = {str(s.id): 10.0 + s.id for s in plan.stitches}
    lines = [{"type": "step", "step": 1, "loss": 2.0},
             {"type": "eval", "step": 5, "top1": {"0": 1.0}},
             {"type": "eval", "step": 10, "top1": newer}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    top1, source = read_top1(run)
    assert top1 == {int(k): v for k, v in newer.items()} and "step 10" in source


def test_cli_curve_errors_are_one_line(plan, tmp_path, capsys):
    code, err = _main(capsys, tmp_path / "nope", "--out", tmp_path / "c.html")
    assert code == 2 and err.startswith("error:") and "not a run folder" in err
    run = tmp_path / "run"
    _write_run(run, plan, _top1(plan))
    code, err = _main(capsys, run, "--out", tmp_path / "c.svg")
    assert code == 2 and ".html, .png or .json" in err
    code, err = _main(capsys, run, "--x", "latency", "--out", tmp_path / "c.html")
    assert code == 2 and "latency" in err
    code, err = _main(capsys, run, "--out", tmp_path / "c.png")   # kaleido is not installed here
    if code == 2:
        assert err.count("\n") == 1 and "png" in err and "kaleido" in err
    else:
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "c.html").exists() and not (tmp_path / "c.svg").exists()
