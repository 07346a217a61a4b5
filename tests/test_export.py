"""composer.export: standalone stitches (safetensors + torch.export program), the whole SN-Net, select."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_exported_stitch_matches_the_snnet(family, vit_run, cnn_run, tmp_path):
    run_dir = vit_run if family == "vit" else cnn_run
    net = load_run(run_dir).net.eval()
    sid = _cross_stitch(net.plan)
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
    assert config["cost"] == net.plan.cost(sid).to_dict() and config["top1"] is not None
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


@pytest.mark.skipif(not (ROOT / "tests" / "hub_server.py").exists(), reason="needs the local fake Hub (tests/hub_server.py)")
def test_push_to_hub_is_wired(vit_run, tmp_path, monkeypatch):
    """Only the wiring: the folder reaches huggingface_hub's upload_folder with the repo name."""
    import huggingface_hub
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.setdefault("upload", kw) and None)
    assert cli.main(["export", str(vit_run), "--stitch", "0", "--out", str(tmp_path / "h"),
                     "--push-to-hub", "me/stitched"]) == 0
    assert calls["repo"] == "me/stitched" and calls["upload"]["folder_path"] == str(tmp_path / "h")
