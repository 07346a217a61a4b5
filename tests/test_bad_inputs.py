"""Every bad input to the CLI ends the same way: exactly one line `error: ...` on stderr, exit code
2, no traceback, and the run folder byte for byte as it was (issue 12's probe, kept as a table).

Each case runs `composer.cli.main` in this process on a tiny fitted run and a briefly trained one.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.engine_models import tiny_vit_zoo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny ViT anchors (local-dir), a 3-class ImageFolder, a fitted run RUN, a trained run TRUN,
    a local-dir anchor whose config.json is not JSON, and an existing plain file."""
    from composer.cli import main
    root = tmp_path_factory.mktemp("bad")
    specs, data = tiny_vit_zoo(root)
    run, trun = root / "RUN", root / "TRUN"
    assert main(["fit", *specs, "--data", str(data), "--calib", "12", "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--data", str(data)]) == 0
    shutil.copytree(run, trun)
    assert main(["train", str(trun), "--data", str(data), "--steps", "2", "--batch-size", "4", "--eval-limit", "6",
                 "--checkpoint-every", "1"]) == 0
    broken = root / "broken"
    shutil.copytree(Path(specs[0][len("local-dir:"):]), broken)
    (broken / "config.json").write_text("{not json")
    (root / "a_file").write_text("something of the user's")
    (root / "a_dir.html").mkdir()
    return {"A": specs[0], "B": specs[1], "DATA": str(data), "RUN": str(run), "TRUN": str(trun),
            "BROKEN": f"local-dir:{broken}", "ANCHOR_DIR": specs[0][len("local-dir:"):], "FILE": str(root / "a_file"),
            "DIR_HTML": str(root / "a_dir.html"), "ROOT": str(root)}


# (name, argv with {PLACEHOLDERS}, what the one error line must mention)
CASES = [
    # plan and the anchors it reads
    ("plan-no-anchors", "plan", "anchors"),
    ("plan-unknown-model", "plan no_such_model_xyz", "unknown model"),
    ("plan-hub-path", "plan hf-hub:/etc/passwd", "hf-hub:ORG/REPO"),
    ("plan-hub-dotdot", "plan hf-hub:a/../../b", "hf-hub:ORG/REPO"),
    ("plan-local-missing", "plan local-dir:/nonexistent/x", "config.json"),
    ("plan-config-not-json", "plan {BROKEN} {B}", "not valid JSON"),
    ("plan-same-anchor-twice", "plan {A} {A}", "twice"),
    ("plan-kernel-0", "plan {A} {B} --kernel 0", "kernel"),
    ("plan-kernel-text", "plan {A} {B} --kernel abc", "kernel"),
    ("plan-stride-float", "plan {A} {B} --stride 1.5", "stride"),
    ("plan-points-not-json", "plan {A} {B} --points notjson", "JSON"),
    ("plan-points-block-range", "plan {A} {B} --points [[[0,99],[1,0]]]", "blocks"),
    ("plan-points-shape", "plan {A} {B} --points [1,2,3]", "stitch point"),
    ("plan-points-wrong-way", "plan {A} {B} --points [[[1,0],[0,1]]]", "smaller to a larger"),
    ("plan-two-way-points", "plan {A} {B} --two-way --points [[[0,0],[1,1]]]", "two-way"),
    ("plan-two-way-one-anchor", "plan {A} --two-way", "two anchors"),
    ("unknown-command", "stitchify {RUN}", "invalid choice"),
    # fit
    ("fit-calib-0", "fit {A} {B} --data {DATA} --calib 0 --out {ROOT}/new1", "calib"),
    ("fit-calib-negative", "fit {A} {B} --data {DATA} --calib -5 --out {ROOT}/new1", "calib"),
    ("fit-ridge-nan", "fit {A} {B} --data {DATA} --ridge nan --out {ROOT}/new1", "ridge"),
    ("fit-ridge-inf", "fit {A} {B} --data {DATA} --ridge inf --out {ROOT}/new1", "ridge"),
    ("fit-ridge-negative", "fit {A} {B} --data {DATA} --ridge -1 --out {ROOT}/new1", "ridge"),
    ("fit-data-missing", "fit {A} {B} --data /nonexistent/images --out {ROOT}/new1", "/nonexistent/images"),
    ("fit-batch-0", "fit {A} {B} --data {DATA} --batch-size 0 --out {ROOT}/new1", "batch-size"),
    ("fit-workers-negative", "fit {A} {B} --data {DATA} --workers -1 --out {ROOT}/new1", "workers"),
    ("fit-seed-text", "fit {A} {B} --data {DATA} --seed abc --out {ROOT}/new1", "seed"),
    ("fit-out-file", "fit {A} {B} --data {DATA} --out {FILE}", "a_file"),
    ("fit-over-trained-run", "fit {A} {B} --data {DATA} --calib 12 --out {TRUN}", "--force"),
    ("fit-over-anchor", "fit {A} {B} --data {DATA} --calib 12 --out {ANCHOR_DIR}", "--force"),
    # evaluate and broken run folders
    ("evaluate-no-run", "evaluate /nonexistent/run --data {DATA}", "not a run folder"),
    ("evaluate-not-a-run", "evaluate {ROOT} --data {DATA}", "not a run folder"),
    ("evaluate-limit-0", "evaluate {RUN} --data {DATA} --limit 0", "limit"),
    ("evaluate-batch-nan", "evaluate {RUN} --data {DATA} --batch-size nan", "batch-size"),
    ("evaluate-plan-list", "evaluate {BAD:plan=[]} --data {DATA}", "plan"),
    ("evaluate-manifest-list", "evaluate {BAD:manifest=[]} --data {DATA}", "manifest"),
    ("evaluate-manifest-no-anchors", "evaluate {BAD:manifest-no-anchors} --data {DATA}", "anchors"),
    ("evaluate-anchors-swapped", "evaluate {BAD:anchors-swapped} --data {DATA}", "belong together"),
    ("evaluate-duplicate-stitch", "evaluate {BAD:duplicate-id} --data {DATA}", "stitch ids"),
    ("evaluate-block-out-of-range", "evaluate {BAD:block-range} --data {DATA}", "blocks"),
    ("evaluate-weights-missing", "evaluate {BAD:no-weights} --data {DATA}", "weights"),
    # curve
    ("curve-bad-suffix", "curve {RUN} --out {ROOT}/c.txt", ".html"),
    ("curve-out-proc", "curve {RUN} --out /proc/zoo-composer/c.html", "cannot write"),
    ("curve-out-directory", "curve {RUN} --out {DIR_HTML}", "folder"),
    ("curve-bad-axis", "curve {RUN} --x speed --out {ROOT}/c.html", "invalid choice"),
    ("curve-no-accuracy", "curve {BAD:no-evaluation} --out {ROOT}/c.html", "no accuracies"),
    # train
    ("train-no-stop", "train {RUN} --data {DATA} --batch-size 4", "--steps"),
    ("train-steps-0", "train {RUN} --data {DATA} --batch-size 4 --steps 0", "steps"),
    ("train-steps-fraction", "train {RUN} --data {DATA} --batch-size 4 --steps 2.5", "steps"),
    ("train-lr-nan", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --lr nan", "lr"),
    ("train-lr-negative", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --lr -1", "lr"),
    ("train-weight-decay-nan", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --weight-decay nan", "weight-decay"),
    ("train-time-budget-nan", "train {RUN} --data {DATA} --batch-size 4 --time-budget nan", "time-budget"),
    ("train-time-budget-negative", "train {RUN} --data {DATA} --batch-size 4 --time-budget -1", "time-budget"),
    ("train-batch-larger-than-data", "train {RUN} --data {DATA} --steps 2 --batch-size 200000", "batch"),
    ("train-distill-weight-nan", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --distill-weight nan", "distill-weight"),
    ("train-min-crop-2", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --min-crop 2", "min-crop"),
    ("train-hflip-1.5", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --hflip 1.5", "hflip"),
    ("train-eval-limit-0", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --eval-limit 0", "eval-limit"),
    ("train-warmup-negative", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --warmup-steps -1", "warmup"),
    ("train-anchor-lr-nan", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --anchor-lr-scale nan", "anchor-lr-scale"),
    ("train-groups-0", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --groups 0", "groups"),
    ("train-eval-every-negative", "train {RUN} --data {DATA} --batch-size 4 --steps 2 --eval-every -5", "eval-every"),
    # export
    ("export-stitch-range", "export {RUN} --stitch 999 --out {ROOT}/e1", "999"),
    ("export-stitch-negative", "export {RUN} --stitch -1 --out {ROOT}/e1", "-1"),
    ("export-into-anchor", "export {RUN} --stitch 1 --out {ANCHOR_DIR}", "--force"),
    ("export-onto-file", "export {RUN} --stitch 1 --out {FILE}", "a_file"),
    ("export-into-proc", "export {RUN} --stitch 1 --out /proc/zoo-composer-export", "cannot write"),
    ("export-candidate-unknown", "export {RUN} --candidate nope --out {ROOT}/e1", "nope"),
    ("export-nothing-chosen", "export {RUN} --out {ROOT}/e1", "one of the arguments"),
    # the other builders
    ("shrink-target-0", "shrink {RUN} --anchor 0 --data {DATA} --target-macs 0", "target"),
    ("shrink-target-nan", "shrink {RUN} --anchor 0 --data {DATA} --target-macs nan", "target"),
    ("shrink-lr-nan", "shrink {RUN} --anchor 0 --data {DATA} --target-macs 1M --lr nan", "learning rate"),
    ("shrink-steps-0", "shrink {RUN} --anchor 0 --data {DATA} --target-macs 1M --steps 0", "steps"),
    ("shrink-anchor-range", "shrink {RUN} --anchor 9 --data {DATA} --target-macs 1M", "anchor"),
    ("elastic-budget-nan", "elastic {RUN} --anchor 0 --data {DATA} --budget-macs nan", "budget"),
    ("elastic-budget-huge", "elastic {RUN} --anchor 0 --data {DATA} --budget-macs 1e30", "budget"),
    ("elastic-budget-negative", "elastic {RUN} --anchor 0 --data {DATA} --budget-macs -5", "budget"),
    ("elastic-samples-0", "elastic {RUN} --anchor 0 --data {DATA} --samples 0", "samples"),
    ("elastic-stitch-range", "elastic {RUN} --stitch 999 --data {DATA}", "999"),
    ("scale-factor-huge", "scale {RUN} --factor 1e300", "factor"),
    ("scale-factor-nan", "scale {RUN} --factor nan", "factor"),
    ("scale-factor-0", "scale {RUN} --factor 0", "factor"),
    ("scale-alpha-2", "scale {RUN} --factor 2 --alpha 2", "alpha"),
    ("scale-anchor-range", "scale {RUN} --factor 2 --anchor 7", "anchor"),
    ("fold-anchor-range", "fold {RUN} --anchor 9 --data {DATA} --out {ROOT}/f1", "anchor"),
    ("fold-tolerance-nan", "fold {RUN} --anchor 0 --data {DATA} --out {ROOT}/f1 --tolerance nan", "tolerance"),
    ("quote-macs-nan", "quote {RUN} --method snnet --name x --source y --macs nan --top1 50", "macs"),
    ("quote-top1-101", "quote {RUN} --method snnet --name x --source y --macs 1M --top1 101", "top1"),
    ("families-local-missing", "families --local /nonexistent/models", "/nonexistent/models"),
    ("latency-fit-repeats-0", "latency-fit {RUN} --repeats 0", "repeats"),
]


def _digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _broken_run(world, kind: str, where: Path) -> str:
    """A copy of RUN with one file made wrong, as a hand edit or a crash elsewhere would."""
    run = where / f"run-{kind.replace('=', '-').replace('[', '').replace(']', '')}"
    shutil.copytree(world["RUN"], run)
    plan = json.loads((run / "plan.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    if kind == "plan=[]":
        (run / "plan.json").write_text("[]")
    elif kind == "manifest=[]":
        (run / "manifest.json").write_text("[]")
    elif kind == "manifest-no-anchors":
        manifest.pop("anchors")
        (run / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "anchors-swapped":
        manifest["anchors"] = manifest["anchors"][::-1]
        (run / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "duplicate-id":
        plan["stitches"].append(dict(plan["stitches"][-1]))
        (run / "plan.json").write_text(json.dumps(plan))
    elif kind == "block-range":
        plan["stitches"][-1]["route"][-1]["blocks"][1] = 99
        (run / "plan.json").write_text(json.dumps(plan))
    elif kind == "no-weights":
        (run / "stitch_layers.safetensors").unlink()
    elif kind == "no-evaluation":
        (run / "evaluation.json").unlink(missing_ok=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
    else:
        raise AssertionError(kind)
    return str(run)


@pytest.mark.parametrize("name, argv, mention", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(world, main, tmp_path, name, argv, mention):
    words = []
    for w in argv.split():
        if w.startswith("{BAD:"):
            w = _broken_run(world, w[5:-1], tmp_path)
        words.append(w.format(**world) if "{" in w and not w.startswith("[") else w)
    before = {k: _digest(Path(world[k])) for k in ("RUN", "TRUN", "ANCHOR_DIR")}
    r = main(*words)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, f"{name}: exit {r.returncode}\n{r.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {r.stderr[-2000:]}"
    assert mention.lower() in lines[0].lower(), f"{name}: {lines[0]}"
    assert "Traceback" not in r.stderr
    assert {k: _digest(Path(world[k])) for k in before} == before, f"{name} changed a folder it was refused"
    for leftover in ("new1", "e1", "f1"):
        assert not (Path(world["ROOT"]) / leftover).exists(), f"{name} left {leftover} behind"


def test_the_table_covers_sixty_bad_inputs():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
