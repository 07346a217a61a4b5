"""composer.export: standalone stitches (safetensors + torch.export program), the whole SN-Net, select."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import composer
from composer import cli
from composer.export import ExportError, export_snnet, export_stitch, load_snnet, load_stitched, select
from composer.run import load_run
from composer.train import train
from tests.test_train import CNN, VIT, make_family, make_run, small

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    torch.set_num_threads(1)   # module fixtures run before the per-test thread setting
    tmp = tmp_path_factory.mktemp("vit")
    family = make_family(tmp, VIT)
    run = make_run(tmp, family)
    train(run, family[1], small(steps=2, checkpoint_every=1), eval_data=family[2])  # writes evaluation.json
    return run


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cnn")
    family = make_family(tmp, CNN)
    run = make_run(tmp, family)
    # a few steps so that BatchNorm statistics are the trained ones, not the defaults
    train(run, family[1], small(steps=3, lr=0.05), eval_data=family[2])
    return run


def _cross_stitch(plan) -> int:
    """A stitch whose route uses two anchors, the second one from a middle block."""
    return next(s.id for s in plan.stitches if not s.is_anchor and s.route[1].first > 1)


@pytest.mark.parametrize("family", ["vit", pytest.param("cnn", marks=pytest.mark.slow)])   # cnn: ~5 s more
def test_exported_stitch_matches_the_snnet(family, request, tmp_path):
    run_dir = request.getfixturevalue(f"{family}_run")   # only the run this case needs
    net = load_run(run_dir).net.eval()
    sid = _cross_stitch(net.plan)
    if family == "cnn":   # the stitch runs its own BatchNorm statistics, not its back anchor's
        stats, name = net.route_stats[str(sid)], net.route_bn_names(net.plan.stitches[sid])[0]
        assert not torch.allclose(stats.mean(0), net.get_submodule(name).running_mean)
    out = export_stitch(run_dir, sid, tmp_path / "stitch")
    config = json.loads((out / "config.json").read_text())
    x = torch.randn(3, *config["preprocessing"]["input_size"])
    with torch.no_grad():
        want = net.select(sid)(x)
        via_library = composer.load_stitched(out)(x)
        via_torch = torch.export.load(out / "model.pt2").module()(x)   # plain torch, no project code
    assert config["program"]["kind"] == "torch.export"
    assert (via_library - want).abs().max() <= 1e-5
    assert (via_torch - want).abs().max() <= 1e-5

    # only what the route runs: exactly the SN-Net tensors under the route's prefixes
    stitch = net.plan.stitches[sid]
    prefixes = tuple(net.route_prefixes(stitch))
    expected = {k for k in net.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    assert set(load_file(out / "model.safetensors")) == expected
    module = load_stitched(out)
    assert sum(p.numel() for p in module.parameters()) == net.plan.cost(sid).params
    assert set(module.state_dict()) == expected        # unused units are gone, not kept with random weights
    assert config["cost"] == net.plan.cost(sid).to_dict()
    # its top-1 is the run's evaluation of this stitch, and the exported module scores it again on the
    # same images (the trainer's final evaluation: eval_limit=8 of the held-out folder, seed 0)
    from composer import data
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert config["top1"] == next(r["top1"] for r in evaluation["stitches"] if r["id"] == sid)
    ds = data.subset(data.open_dataset(evaluation["data"], data.data_config(net.anchors[0]), split="validation"), 8)
    with torch.no_grad():
        correct = sum(int((module(x).argmax(-1) == y).sum()) for x, y in data.loader(ds, 4))
    assert evaluation["images"] == 8 and config["top1"] == pytest.approx(100 * correct / 8)
    card = (out / "README.md").read_text()
    assert config["anchors"][0]["spec"] in card and "load_stitched" in card and "torch.export.load" in card


def test_anchor_export_and_bad_ids(vit_run, tmp_path):
    net = load_run(vit_run).net.eval()
    out = export_stitch(vit_run, 0, tmp_path / "a0")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load_stitched(out)(x), net.anchors[0](x), atol=1e-6)
    assert [a["index"] for a in json.loads((out / "config.json").read_text())["anchors"]] == [0]
    with pytest.raises(ExportError, match="does not exist"):
        export_stitch(vit_run, 999, tmp_path / "bad")
    with pytest.raises(ExportError, match="not an exported stitch"):
        load_stitched(tmp_path / "nothing")


def test_export_snnet_table_and_reload(vit_run, tmp_path):
    out = export_snnet(vit_run, tmp_path / "all")
    net = load_run(vit_run).net.eval()
    table = json.loads((out / "table.json").read_text())
    evaluation = {s["id"]: s["top1"] for s in json.loads((vit_run / "evaluation.json").read_text())["stitches"]}
    assert [r["id"] for r in table["stitches"]] == list(range(len(net.plan.stitches)))
    assert all(r["top1"] == evaluation[r["id"]] and r["macs"] == net.plan.cost(r["id"]).macs for r in table["stitches"])
    again = load_snnet(out)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for sid in range(len(net.plan.stitches)):
            assert torch.equal(again.select(sid)(x), net.select(sid)(x))
    best = select(out, budget=max(r["macs"] for r in table["stitches"]))
    assert best["top1"] == max(evaluation.values())


def test_select_by_hand():
    rows = [{"id": 0, "macs": 10, "params": 5, "top1": 70.0, "latency_ms": 1.0},
            {"id": 1, "macs": 20, "params": 9, "top1": 75.0, "latency_ms": 3.0},
            {"id": 2, "macs": 15, "params": 7, "top1": 75.0, "latency_ms": 2.5},
            {"id": 3, "macs": 30, "params": 12, "top1": 80.0, "latency_ms": 2.0}]
    assert select({"stitches": rows}, 25)["id"] == 2          # tie on top-1: the cheaper one
    assert select(rows, 30)["id"] == 3
    assert select(rows, 2.6, metric="latency")["id"] == 3
    assert select(rows, 8, metric="params")["id"] == 2
    with pytest.raises(ExportError, match="cheapest .*stitch 0.* needs 10"):
        select(rows, 5)
    with pytest.raises(ExportError, match="unknown metric"):
        select(rows, 5, metric="flops")


def test_cli_export(vit_run, tmp_path, capsys):
    assert cli.main(["export", str(vit_run), "--stitch", "1", "--out", str(tmp_path / "one"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model.safetensors", "config.json", "README.md", "model.pt2"} <= set(out["files"])
    assert cli.main(["export", str(vit_run), "--all", "--out", str(tmp_path / "all")]) == 0
    assert "table.json" in capsys.readouterr().out
    assert cli.main(["export", str(vit_run), "--stitch", "99", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: stitch 99 does not exist")


_PUSH_AND_PULL = """
import json, sys, torch
from huggingface_hub import hf_hub_download
import composer
from composer.cli import main
rc = main(["export", RUN, "--stitch", "1", "--out", OUT, "--push-to-hub", "me/stitched"])
if rc == 0:
    for name in ("config.json", "model.safetensors"):
        hf_hub_download("me/stitched", name, local_dir=PULLED)
    torch.manual_seed(0)
    x = torch.randn(2, *json.load(open(OUT + "/config.json"))["preprocessing"]["input_size"])
    with torch.no_grad():
        diff = (composer.load_stitched(PULLED)(x) - composer.load_stitched(OUT)(x)).abs().max().item()
    print(json.dumps({"diff": diff}))
sys.exit(rc)
"""


def _push(run_dir: Path, tmp_path: Path, hub) -> subprocess.CompletedProcess:
    """`export --push-to-hub` in a fresh process (huggingface_hub reads HF_ENDPOINT at import, and
    this test process is offline), then download the pushed files back and load them."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=hub.url,
               HF_TOKEN="hf_fake_token_for_tests", NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    code = (f"RUN, OUT, PULLED = {str(run_dir)!r}, {str(tmp_path / 'out')!r}, {str(tmp_path / 'pulled')!r}\n"
            + _PUSH_AND_PULL)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow   # a fresh interpreter exports and pushes: ~14 s
def test_push_to_hub_uploads_a_loadable_stitch(vit_run, tmp_path):
    """Against the local fake Hub: the repo is created, every exported file arrives byte for byte,
    and the files downloaded back load into the same model."""
    from tests.hub_server import FakeHub
    with FakeHub([]) as hub:
        r = _push(vit_run, tmp_path, hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pushed to" in r.stdout
    out = tmp_path / "out"
    local = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and not f.name.startswith(".")}
    assert {"model.safetensors", "config.json", "README.md"} <= set(local)
    assert hub.models["me/stitched"].files == local
    assert [c["repo"] for c in hub.commits] == ["me/stitched"]
    # the client's own calls: create the repo, announce the files, one commit; every write carries the token
    posts = [p for m, p, _ in hub.requests if m == "POST" and p != "/api/validate-yaml"]
    assert posts == ["/api/repos/create", "/api/models/me/stitched/preupload/main", "/api/models/me/stitched/commit/main"]
    assert set(hub.authorizations) == {"Bearer hf_fake_token_for_tests"}
    assert json.loads(r.stdout.strip().splitlines()[-1])["diff"] == 0.0


@pytest.mark.slow   # a fresh interpreter exports and pushes: ~13 s
def test_push_to_hub_refused_is_one_line_error(vit_run, tmp_path):
    from tests.hub_server import FakeHub
    with FakeHub([], reject_writes=True) as hub:
        r = _push(vit_run, tmp_path, hub)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not push to the Hub repo me/stitched"), r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()   # the export itself is kept
