"""composer.judge: every stitch against the line between the ORIGINAL anchors, the anchors' change,
a reference read from an evaluation.json, and the curve's dashed reference line. Plans on the meta
device (no weights), accuracies made up, so every expected number is worked out here by hand."""
from __future__ import annotations

import json
import statistics

import pytest

from composer.curve import curve_figure, curve_rows
from composer.judge import JudgeError, line_ends, line_gaps, read_reference
from composer.plan import build_plan
from composer.run import load_anchors, write_evaluation

ANCHORS = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44"]


@pytest.fixture(scope="module")
def plan():
    _, infos = load_anchors(ANCHORS, pretrained=False, device="meta")
    return build_plan(infos)


@pytest.fixture(scope="module")
def two_way():
    _, infos = load_anchors(ANCHORS[:2], pretrained=False, device="meta")
    return build_plan(infos, two_way=True)


def _macs(plan, sid):
    return plan.cost(sid).macs


def _anchor_id(plan, a):
    return next(s.id for s in plan.stitches if s.is_anchor and s.route[0].anchor == a)


def _by_hand(plan, top1, ref):
    """Each stitch's gap, spelled out: the line through (MACs, top-1) of its route's two anchors."""
    out = {}
    for s in plan.stitches:
        if s.is_anchor:
            continue
        f, b = s.route[0].anchor, s.route[-1].anchor
        x0, x1 = _macs(plan, _anchor_id(plan, f)), _macs(plan, _anchor_id(plan, b))
        y0, y1 = ref[_anchor_id(plan, f)], ref[_anchor_id(plan, b)]
        out[s.id] = top1[s.id] - (y0 + (y1 - y0) * (_macs(plan, s.id) - x0) / (x1 - x0))
    return out


def _made_up(plan, offset=0.0):
    """Anchors at 80 / 84 / 86, every stitch on its line plus a known offset per id."""
    anchors = {_anchor_id(plan, a): v for a, v in enumerate((80.0, 84.0, 86.0))}
    on_line = _by_hand(plan, {s.id: 0.0 for s in plan.stitches}, anchors)   # = -line
    top1 = dict(anchors)
    for sid, minus_line in on_line.items():
        top1[sid] = -minus_line + offset + (sid % 5) * 0.5 - 1.5   # offsets -1.5 .. +0.5
    return top1, anchors


def test_gaps_against_the_measurement_itself(plan):
    top1, anchors = _made_up(plan)
    j = line_gaps(plan, top1)
    stitches = [s for s in plan.stitches if not s.is_anchor]
    assert [g.id for g in j.stitches] == [s.id for s in stitches] and j.total == len(stitches) >= 20
    expected = {s.id: (s.id % 5) * 0.5 - 1.5 for s in stitches}
    for g in j.stitches:
        assert g.gap == pytest.approx(expected[g.id], abs=1e-9)
        assert g.line == pytest.approx(g.top1 - g.gap)
        lo, hi = g.ends
        assert plan.infos[lo].total.macs < plan.infos[hi].total.macs
    assert j.median == pytest.approx(statistics.median(expected.values()))
    assert j.worst.gap == pytest.approx(-1.5) and j.worst.id == min(i for i, v in expected.items() if v == -1.5)
    assert j.within == sum(v >= -1.0 for v in expected.values())
    assert j.share == pytest.approx(100.0 * j.within / j.total)
    assert not j.original and j.anchors == []   # no reference: no anchor changes


def test_the_original_line_does_not_move_with_the_anchors(plan):
    """Fine-tuned anchors 2 points lower and stitches 1 point lower: against their own (fallen) line
    the stitches gained a point; against the original anchors' line they lost the point they lost."""
    top1, original = _made_up(plan)
    tuned = {k: v - 1.0 for k, v in top1.items()}
    for sid in original:
        tuned[sid] = original[sid] - 2.0
    same = line_gaps(plan, tuned)
    honest = line_gaps(plan, tuned, original)
    hand = _by_hand(plan, tuned, original)
    for a, b in zip(same.stitches, honest.stitches):
        assert a.gap == pytest.approx(b.gap + 2.0)
        assert b.gap == pytest.approx((b.id % 5) * 0.5 - 1.5 - 1.0)
        assert b.gap == pytest.approx(hand[b.id])
    assert honest.original and [a.change for a in honest.anchors] == pytest.approx([-2.0] * 3)
    assert [a.anchor for a in honest.anchors] == [0, 1, 2]
    assert [a.reference for a in honest.anchors] == [80.0, 84.0, 86.0]
    assert honest.worst_anchor.change == pytest.approx(-2.0)
    # the tolerance decides "within"
    assert line_gaps(plan, tuned, original, tolerance=3.0).within == honest.total


def test_text_and_json(plan):
    top1, original = _made_up(plan)
    j = line_gaps(plan, top1, original)
    text = "\n".join(j.lines())
    assert "original anchors" in text and f"{j.within} of {j.total} stitches within 1 point" in text
    assert f"worst {j.worst.gap:+.2f}" in text and "resnet20 80.00 -> 80.00 (+0.00)" in text
    d = json.loads(json.dumps(j.to_dict()))
    assert d["within"] == j.within and d["stitches_judged"] == j.total and d["worst_stitch"] == j.worst.id
    assert d["median_gap"] == pytest.approx(j.median) and len(d["gaps"]) == j.total and len(d["anchors"]) == 3
    assert d["gaps"][0]["ends"] == list(j.stitches[0].ends)
    assert "anchors as measured here" in "\n".join(line_gaps(plan, top1).lines())


def test_unevaluated_stitches_are_left_out_but_anchors_are_needed(plan):
    top1, original = _made_up(plan)
    some = {k: v for k, v in top1.items() if k < 10}
    assert [g.id for g in line_gaps(plan, some).stitches] == [k for k in range(10) if not plan.stitches[k].is_anchor]
    del some[_anchor_id(plan, 1)]
    with pytest.raises(JudgeError, match="anchor 1"):
        line_gaps(plan, some)
    no_ref = {k: v for k, v in original.items() if k != _anchor_id(plan, 2)}
    with pytest.raises(JudgeError, match="the reference has no top-1 for anchor 2"):
        line_gaps(plan, top1, no_ref)
    only_anchors = {k: top1[k] for k in original}
    j = line_gaps(plan, only_anchors, original)
    assert j.total == 0 and j.median is None and j.worst is None and j.share is None
    assert "no stitches evaluated" in "\n".join(j.lines())


def test_routes_there_and_back_use_the_two_anchors_they_visit(two_way):
    plan = two_way
    three = [s for s in plan.stitches if len(s.route) == 3]
    back = [s for s in plan.stitches if len(s.route) == 2 and s.route[0].anchor == 1]
    assert three and back
    for s in three + back:
        assert line_ends(plan, s) == (0, 1)
    anchors = {_anchor_id(plan, 0): 80.0, _anchor_id(plan, 1): 90.0}
    top1 = {**anchors, **{s.id: 85.0 for s in plan.stitches if not s.is_anchor}}
    x0, x1 = _macs(plan, _anchor_id(plan, 0)), _macs(plan, _anchor_id(plan, 1))
    for g in line_gaps(plan, top1).stitches:
        assert g.line == pytest.approx(80.0 + 10.0 * (_macs(plan, g.id) - x0) / (x1 - x0))


# --- a reference read from an evaluation.json --------------------------------------------------

def test_reference_from_an_evaluation_file(plan, tmp_path):
    top1, original = _made_up(plan)
    run = tmp_path / "run"
    run.mkdir()
    write_evaluation(run, plan, top1, str(tmp_path), 500, step=0)
    for where in (run, run / "evaluation.json"):
        ref = read_reference(where, data=str(tmp_path))
        assert ref.images == 500 and ref.step == 0 and ref.top1_for(plan) == original
    tuned = {k: v - 0.5 for k, v in top1.items()}
    j = ref.judge(plan, tuned, 500)
    assert j.original and [a.change for a in j.anchors] == pytest.approx([-0.5] * 3)
    with pytest.raises(JudgeError, match="measured on 500 images, this evaluation on 400"):
        ref.judge(plan, tuned, 400)
    with pytest.raises(JudgeError, match="same images"):
        read_reference(run, data=str(tmp_path / "elsewhere"))
    # an anchors-only evaluation of the same anchors is a reference too
    _, infos = load_anchors(ANCHORS, pretrained=False, device="meta")
    alone = build_plan(infos, points=[])
    only = tmp_path / "anchors-only"
    only.mkdir()
    write_evaluation(only, alone, {s.id: 70.0 + s.id for s in alone.stitches}, "d", 500)
    assert read_reference(only).top1_for(plan) == {_anchor_id(plan, a): 70.0 + a for a in range(3)}


def test_unusable_references_are_refused(plan, tmp_path):
    with pytest.raises(JudgeError, match="no reference at"):
        read_reference(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(JudgeError, match="not an evaluation"):
        read_reference(bad)
    bad.write_text(json.dumps({"images": 5, "stitches": [{"id": 0, "route": [{"anchor": 0, "blocks": [0, 8]}]}]}))
    with pytest.raises(JudgeError, match="no anchor's top-1"):
        read_reference(bad)
    # other anchors (ResNet-20 and -56 instead of -20/32/44): refused by their costs
    _, infos = load_anchors(["cifar_resnet20", "cifar_resnet32", "cifar_resnet56"], pretrained=False, device="meta")
    other = build_plan(infos, points=[])
    write_evaluation(tmp_path, other, {s.id: 80.0 for s in other.stitches}, "d", 5)
    with pytest.raises(JudgeError, match="another anchor 2"):
        read_reference(tmp_path).top1_for(plan)


# --- the curve's reference line -----------------------------------------------------------------

def test_curve_draws_the_original_anchors_line(plan):
    top1, original = _made_up(plan)
    tuned = {k: v - 1.0 for k, v in top1.items()}
    plain = curve_figure(plan, tuned)
    fig = curve_figure(plan, tuned, reference=original)
    assert len(fig.data) == len(plain.data) + 1
    [line] = [t for t in fig.data if t.name and t.name.startswith("original anchors")]
    assert line.line.dash == "dash" and line.mode == "lines+markers" and line.customdata is None
    assert list(line.y) == [80.0, 84.0, 86.0]
    xs = {p["id"]: p["x"] for p in curve_rows(plan, tuned)["stitches"]}
    assert list(line.x) == [xs[_anchor_id(plan, a)] for a in range(3)]
    rows = curve_rows(plan, tuned, reference=original)
    assert [r["top1"] for r in rows["reference"]] == [80.0, 84.0, 86.0]
    assert "reference" not in curve_rows(plan, tuned)
    # params axis: same anchors, their params as x
    fig = curve_figure(plan, tuned, x="params", reference=original)
    [line] = [t for t in fig.data if t.name and t.name.startswith("original anchors")]
    assert list(line.x) == sorted(line.x) and len(line.x) == 3


# --- `python -m composer evaluate RUN --data D --reference FILE` -------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two tiny ViT anchors, a 3-class ImageFolder, a fitted run evaluated (the reference, kept as a
    copy), then fine-tuned for 3 steps (the anchors move)."""
    import shutil

    from composer.cli import main
    from tests.engine_models import tiny_vit_zoo
    root = tmp_path_factory.mktemp("judge")
    specs, data = tiny_vit_zoo(root)
    run = root / "run"
    assert main(["fit", *specs, "--data", str(data), "--calib", "12", "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--data", str(data)]) == 0
    shutil.copy(run / "evaluation.json", root / "before.json")
    assert main(["train", str(run), "--data", str(data), "--steps", "3", "--batch-size", "4", "--lr", "0.05",
                 "--eval-limit", "6"]) == 0
    return root, run, data


def test_cli_evaluate_judges_against_the_reference(tiny_run, main):
    from composer.run import load_plan_of_run
    root, run, data = tiny_run
    r = main("evaluate", run, "--data", data, "--reference", root / "before.json", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plan = load_plan_of_run(run)
    top1 = {s["id"]: s["top1"] for s in out["stitches"]}
    before = json.loads((root / "before.json").read_text())
    ref = {s["id"]: s["top1"] for s in before["stitches"]}
    want = line_gaps(plan, top1, ref).to_dict()
    assert out["judgement"] == json.loads(json.dumps(want))
    assert out["judgement"]["reference"] == "original anchors" and out["judgement"]["stitches_judged"] == len(plan.stitches) - 2
    assert [a["reference"] for a in out["judgement"]["anchors"]] == [ref[0], ref[1]]
    # the run's own evaluation.json as the reference: read before this evaluation replaces it
    r = main("evaluate", run, "--data", data, "--reference", run / "evaluation.json")
    assert r.returncode == 0, r.stderr
    assert "judged against the line (in MACs) between the original anchors" in r.stdout
    assert "anchors' top-1, reference -> now:" in r.stdout
    # without --reference: no judgement
    r = main("evaluate", run, "--data", data, "--json")
    assert r.returncode == 0 and "judgement" not in json.loads(r.stdout)


def test_cli_refuses_a_reference_of_other_images(tiny_run, main):
    root, run, data = tiny_run
    before = (run / "evaluation.json").read_bytes()
    for args, words in [(("--reference", root / "nothing.json"), "no reference at"),
                        (("--reference", root / "vit16" / "config.json"), "not an evaluation"),
                        (("--reference", root / "before.json", "--limit", "10"), "measured on 24 images, this evaluation on 10")]:
        r = main("evaluate", run, "--data", data, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], r.stderr
        if "nothing" in str(args[1]):
            assert (run / "evaluation.json").read_bytes() == before   # refused before evaluating
    # (the image count is known after evaluating: that evaluation was written, then judged and refused)
    before = (run / "evaluation.json").read_bytes()
    other = root / "other"
    import shutil
    shutil.copytree(data, other)
    r = main("evaluate", run, "--data", other, "--reference", root / "before.json")
    assert r.returncode == 2 and "the line must come from the same images" in r.stderr
    assert (run / "evaluation.json").read_bytes() == before


def test_cli_curve_draws_the_reference_anchors_dashed(tiny_run, main, tmp_path):
    from composer.run import load_plan_of_run
    root, run, data = tiny_run
    plan = load_plan_of_run(run)
    before = {s["id"]: s["top1"] for s in json.loads((root / "before.json").read_text())["stitches"]}
    r = main("curve", run, "--reference", root / "before.json", "--out", tmp_path / "c.html")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "c.html").read_text()
    # the figure's JSON inside the page: the reference trace, dashed, through the original anchors' top-1
    trace = html[html.index('"name":"original anchors (before fine-tuning)"') - 2000:]
    trace = trace[trace.rindex('{"hovertemplate"', 0, 2000):]
    data = json.JSONDecoder().raw_decode(trace)[0]
    assert data["line"]["dash"] == "dash"
    assert sorted(data["y"]) == sorted(before[s.id] for s in plan.stitches if s.is_anchor)
    assert main("curve", run, "--reference", root / "nothing.json", "--out", tmp_path / "d.json").returncode == 2
