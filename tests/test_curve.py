"""The accuracy curve: Pareto front, figure content, `python -m composer curve`."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from composer.curve import best_under, curve_figure, curve_rows, pareto_front
from composer.run import read_top1
from composer.plan import build_plan
from composer.run import load_anchors

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


def _main(capsys, *args) -> tuple[int, str]:
    """The same CLI in this process (a fresh interpreter per call costs seconds on 2 cores)."""
    from composer.cli import main
    code = main(["curve", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_curve_json_and_offline_html(plan, tmp_path, capsys):
    top1 = _top1(plan)
    run = tmp_path / "run"
    _write_run(run, plan, top1)
    code, err = _main(capsys, run, "--out", tmp_path / "c.json")
    assert code == 0, err
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


# --- candidates of the other curve builders on the same curve ----------------------------------

def _candidates(plan, top1):
    from composer.candidates import Candidate
    best = max(top1.values())
    big = plan.cost(len(plan.stitches) - 1)
    small = plan.cost(0)
    return [
        # cheaper than every stitch (less accurate than all): must join the front
        Candidate("elastic", "sub-a", "stitch 1", small.macs // 2, small.params // 2, small.activations // 2,
                  top1=min(top1.values()) - 1.0, status="measured", latency_ms=0.5),
        Candidate("elastic", "sub-b", "stitch 1", big.macs, big.params, big.activations, top1=1.0, status="measured"),
        # predicted and quoted points that would dominate everything: never on the front
        Candidate("shrink", "dms-50", "anchor 1", small.macs // 4, small.params // 4, small.activations // 4,
                  top1=best + 20.0, status="predicted", latency_ms=0.25),
        Candidate("fold", "paper", "anchor 0", small.macs // 3, small.params // 3, small.activations // 3,
                  top1=best + 10.0, status="quoted"),
        # no accuracy: listed, not drawn
        Candidate("scale", "resnet20 x2", "cifar_resnet20", 2 * small.macs, 2 * small.params, small.activations,
                  status="predicted"),
    ]


def test_figure_draws_candidates_by_method_and_status(plan):
    top1 = _top1(plan)
    cands = _candidates(plan, top1)
    fig = curve_figure(plan, top1, "macs", candidates=cands)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"Pareto front (measured)", "stitches", "anchors", "elastic", "shrink", "fold"}
    assert list(by_name["elastic"].customdata) == ["elastic:sub-a", "elastic:sub-b"]
    assert list(by_name["elastic"].marker.symbol) == ["circle", "circle"]       # measured: filled
    assert list(by_name["shrink"].marker.symbol) == ["circle-open"]             # predicted: open
    assert list(by_name["fold"].marker.symbol) == ["x-thin-open"]               # quoted: a cross
    colours = {by_name[m].marker.color for m in ("elastic", "shrink", "fold")}
    assert len(colours) == 3 and not colours & {"#1f3b73", "#7aa6d8"}        # own colours, not the stitches'
    for c, x, y, text in zip(cands, by_name["elastic"].x, by_name["elastic"].y, by_name["elastic"].text):
        assert x == pytest.approx(c.macs / 1e6) and y == c.top1
        assert all(s in text for s in ("elastic", c.name, "measured", "MACs", "activations"))
    assert "predicted" in by_name["shrink"].text[0] and "quoted" in by_name["fold"].text[0]
    # stitches keep their int ids (the app selects a stitch by clicking); no candidate id is an int
    ids = list(by_name["stitches"].customdata) + list(by_name["anchors"].customdata)
    assert sorted(ids) == [s.id for s in plan.stitches]
    assert all(isinstance(i, str) for m in ("elastic", "shrink", "fold") for i in by_name[m].customdata)
    # the front: brute force over the stitches and the *measured* candidates only
    pts = [(plan.cost(sid).macs / 1e6, top1[sid]) for sid in top1]
    pts += [(c.macs / 1e6, c.top1) for c in cands if c.status == "measured"]
    undominated = sorted(p for p in pts if not any(_dominated(p, q) for q in pts))
    front = by_name["Pareto front (measured)"]
    assert list(zip(front.x, front.y)) == pytest.approx(undominated)
    assert front.x[0] == pytest.approx(cands[0].macs / 1e6)                     # sub-a leads it
    assert cands[2].top1 not in front.y and cands[3].top1 not in front.y


def test_rows_list_every_candidate(plan):
    top1 = _top1(plan)
    cands = _candidates(plan, top1)
    rows = curve_rows(plan, top1, "activations", candidates=cands)
    got = {r["key"]: r for r in rows["candidates"]}
    assert list(got) == [f"{c.method}:{c.name}" for c in cands]
    for c in cands:
        r = got[f"{c.method}:{c.name}"]
        assert (r["method"], r["name"], r["status"], r["top1"]) == (c.method, c.name, c.status, c.top1)
        assert r["x"] == pytest.approx(c.activations / 1e6) and r["macs"] == c.macs
    assert got["scale:resnet20 x2"]["top1"] is None and not got["scale:resnet20 x2"]["pareto"]
    assert got["elastic:sub-a"]["pareto"] and not got["shrink:dms-50"]["pareto"]
    assert rows["pareto"][0] == "elastic:sub-a"
    assert {p for p in rows["pareto"] if isinstance(p, int)} == {s["id"] for s in rows["stitches"] if s["pareto"]}
    xs = {**{s["id"]: s["x"] for s in rows["stitches"]}, **{c["key"]: c["x"] for c in rows["candidates"]}}
    assert [xs[p] for p in rows["pareto"]] == sorted(xs[p] for p in rows["pareto"])   # in increasing x
    assert json.loads(json.dumps(rows)) == rows


def test_candidates_on_the_latency_axis(plan):
    top1 = _top1(plan)
    cands = _candidates(plan, top1)
    lat = {sid: 1.0 + sid for sid in top1}
    fig = curve_figure(plan, top1, "latency", latency=lat, candidates=cands)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["elastic"].customdata) == ["elastic:sub-a"] and list(by_name["elastic"].x) == [0.5]
    assert list(by_name["shrink"].x) == [0.25] and "fold" not in by_name      # no latency_ms: not drawn
    rows = curve_rows(plan, top1, "latency", lat, cands)
    assert {r["key"]: r["x"] for r in rows["candidates"]}["fold:paper"] is None


def test_cli_curve_shows_the_runs_candidates(plan, tmp_path, capsys):
    from composer.run import add_candidates
    top1 = _top1(plan)
    run = tmp_path / "run"
    _write_run(run, plan, top1)
    cands = _candidates(plan, top1)
    add_candidates(run, cands)
    code, err = _main(capsys, run, "--out", tmp_path / "c.json")
    assert code == 0, err
    data = json.loads((tmp_path / "c.json").read_text())
    assert data == json.loads(json.dumps(curve_rows(plan, top1, "macs", candidates=cands)))
    assert "elastic:sub-a" in data["pareto"]
    code, err = _main(capsys, run, "--out", tmp_path / "c.html")
    assert code == 0, err
    assert "elastic:sub-a" in (tmp_path / "c.html").read_text()


def test_cli_quote_adds_a_published_point_that_never_joins_the_front(plan, tmp_path, capsys):
    from composer.run import read_candidates
    from composer.cli import main
    top1 = _top1(plan)
    run = tmp_path / "run"
    _write_run(run, plan, top1)
    smallest = min(plan.cost(s).macs for s in plan.stitches)
    best = max(top1.values())
    args = ["quote", str(run), "--method", "snnet", "--name", "SN-Net paper", "--source", "arXiv:2302.06586 Fig. 4",
            "--macs", str(smallest), "--top1", str(best + 5), "--params", "1.5M"]
    assert main(args) == 0
    assert "added quoted point 'snnet:SN-Net paper'" in capsys.readouterr().out
    assert main(args) == 0                        # quoting the same name again replaces it
    [c] = read_candidates(run)
    assert (c.status, c.macs, c.params, c.top1, c.source) == ("quoted", smallest, 1_500_000, best + 5,
                                                              "arXiv:2302.06586 Fig. 4")
    code, err = _main(capsys, run, "--out", tmp_path / "c.json")
    assert code == 0, err
    data = json.loads((tmp_path / "c.json").read_text())
    [row] = data["candidates"]
    assert row["status"] == "quoted" and row["top1"] == best + 5 and not row["pareto"]   # dominates, yet off the front
    assert data["pareto"] == json.loads(json.dumps(curve_rows(plan, top1, "macs")))["pareto"]


@pytest.mark.parametrize("change, message", [
    (["--top1", "120"], "percentage"),
    (["--macs", "0"], "positive"),
    (["--name", " "], "1 to 120 characters"),
])
def test_cli_quote_bad_input_is_one_line(plan, tmp_path, capsys, change, message):
    from composer.cli import main
    run = tmp_path / "run"
    _write_run(run, plan, _top1(plan))
    args = {"--method": "elastic", "--name": "x", "--source": "paper", "--macs": "1M", "--top1": "70"}
    args.update(dict(zip(change[::2], change[1::2])))
    assert main(["quote", str(run), *[a for kv in args.items() for a in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0 and message in err, err
    assert main(["quote", str(tmp_path / "nope"), "--method", "fold", "--name", "x", "--source", "s",
                 "--macs", "1M", "--top1", "1"]) == 2
    assert "not a run folder" in capsys.readouterr().err
