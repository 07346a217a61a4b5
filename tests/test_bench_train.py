"""bench/bench_train.py's judgement and table on made-up accuracies (no ../shared needed): every
run is judged against the ORIGINAL anchors (the least-squares row), with the same-run line beside."""
from __future__ import annotations

import pytest

from bench.bench_train import combine, judged, table
from composer.judge import line_gaps
from composer.plan import build_plan
from composer.run import load_anchors


@pytest.fixture(scope="module")
def plan():
    _, infos = load_anchors(["cifar_resnet20", "cifar_resnet32"], pretrained=False, device="meta")
    return build_plan(infos)


def test_rows_are_judged_against_the_least_squares_anchors(plan):
    base_top1 = {s.id: 80.0 if s.is_anchor else 79.5 for s in plan.stitches}
    base_top1[1] = 84.0
    base = {"name": "least squares", "steps": 0, **judged(plan, base_top1, base_top1)}
    tuned = {k: v - 1.0 for k, v in base_top1.items()}
    row = {"name": "default budget_min=2", "steps": 10, "steps_per_cpu_s": 1.5,
           **judged(plan, tuned, {int(k): v for k, v in base["top1"].items()})}
    assert row["original"]["anchor_change"] == [-1.0, -1.0]
    assert row["original"]["median_gap"] == pytest.approx(line_gaps(plan, tuned, base_top1).median)
    assert row["same_run"]["median_gap"] == pytest.approx(base["original"]["median_gap"])   # all fell alike
    assert "anchor_change" not in row["same_run"]
    results = {"recipe": "default", "eval_images": 100, "protocol": "training set", "runs": [base, row]}
    text = table(combine([results]))
    assert "ORIGINAL anchors" in text and "-1.0/-1.0" in text and "default budget_min=2" in text
    assert "original anchors' top-1 (%): test JPEGs 80.00 / 84.00" in text
