"""The fronts at scale (issue 14): --device / --precision on every command that runs networks, and
torchrun's ranks sharing the images of `fit` and `evaluate`.

The family is two tiny local-dir ViTs with random heads (so that predictions differ from image to
image) and a 3-class ImageFolder. Two-rank runs start torchrun (gloo, CPU) as a subprocess, as
tests/test_ddp.py does for training. Checks that need a GPU skip without CUDA, saying so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.cli import main, parser
from tests.engine_models import mixed_size_cifar_zoo, tiny_vit_zoo

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False here)"
ON_DEVICE = ("fit", "evaluate", "train", "export", "elastic", "shrink", "fold", "latency-fit")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny ViT anchors (random heads), 30 images in 3 classes, and a run RUN fitted on 24 of them."""
    root = tmp_path_factory.mktemp("fronts")
    specs, data = tiny_vit_zoo(root, per_class=10, random_heads=True)
    run = root / "RUN"
    assert main(["fit", *specs, "--data", str(data), "--calib", "24", "--batch-size", "4", "--out", str(run),
                 "--device", "cpu"]) == 0
    return {"specs": specs, "data": str(data), "run": run, "root": root}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "composer", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# --- the flags --------------------------------------------------------------------------------------

def test_every_command_that_runs_networks_takes_device_and_precision():
    sub = next(a for a in parser()._actions if a.dest == "command")
    for name in ON_DEVICE:
        options = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"--device", "--precision"} <= options, name
        assert sub.choices[name].get_default("device") == "auto" and sub.choices[name].get_default("precision") == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv, says", [
    (["evaluate", "{run}", "--data", "{data}", "--device", "cuda"], "CUDA is not available"),
    (["evaluate", "{run}", "--data", "{data}", "--device", "cuda:1"], "CUDA is not available"),
    (["evaluate", "{run}", "--data", "{data}", "--device", "tpu"], "not one of auto, cpu, cuda"),
    (["evaluate", "{run}", "--data", "{data}", "--precision", "fp64"], "not one of auto, fp32, bf16, fp16"),
    (["fit", "{a}", "{b}", "--data", "{data}", "--out", "{root}/never", "--device", "cuda"], "CUDA is not available"),
    (["train", "{run}", "--data", "{data}", "--steps", "1", "--device", "cuda:0"], "CUDA is not available"),
    (["export", "{run}", "--all", "--latency", "--out", "{root}/never", "--device", "cuda"], "CUDA is not available"),
    (["latency-fit", "{run}", "--remeasure", "--device", "cuda"], "CUDA is not available"),
    (["fold", "{run}", "--anchor", "0", "--data", "{data}", "--out", "{root}/never", "--device", "cuda"],
     "CUDA is not available"),
    (["shrink", "{run}", "--anchor", "0", "--data", "{data}", "--target-macs", "1M", "--device", "cuda"],
     "CUDA is not available"),
    (["elastic", "{run}", "--anchor", "0", "--data", "{data}", "--device", "cuda"], "CUDA is not available"),
])
def test_a_device_this_machine_lacks_is_one_error_line(world, capsys, argv, says):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in world["run"].iterdir())
    fill = {"run": str(world["run"]), "data": world["data"], "a": world["specs"][0], "b": world["specs"][1],
            "root": str(world["root"])}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in world["run"].iterdir()) == before
    assert not (world["root"] / "never").exists()


# --- precision ----------------------------------------------------------------------------------------

def test_bf16_evaluation_agrees_with_fp32(world):
    """The CLI in bf16 on the CPU: top-1 within a few points of fp32; the predictions of most images equal."""
    from composer import data as data_mod
    from composer.evaluate import evaluate_all
    from composer.run import load_run
    run, d = str(world["run"]), world["data"]
    cmd = [sys.executable, "-m", "composer", "evaluate", run, "--data", d, "--device", "cpu", "--json"]
    bf16 = subprocess.run(cmd + ["--precision", "bf16"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    got = _json_lines(bf16.stdout)
    assert len(got) == 1 and got[0]["precision"] == "bf16" and got[0]["device"] == "cpu"
    fp32 = subprocess.run(cmd + ["--precision", "fp32"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    want = _json_lines(fp32.stdout)[0]
    assert want["precision"] == "fp32" and got[0]["images"] == want["images"] == 30
    for g, w in zip(got[0]["stitches"], want["stitches"]):
        assert abs(g["top1"] - w["top1"]) <= 10.0, (g, w)   # 30 images: one image is 3.3 points
    # the predictions themselves, image by image
    net = load_run(world["run"]).net
    ds = data_mod.open_dataset(d, data_mod.data_config(net.anchors[0]), split="validation")
    a = evaluate_all(net, data_mod.loader(ds, 8), precision="fp32").predictions
    b = evaluate_all(net, data_mod.loader(ds, 8), precision="bf16").predictions
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(len(a[k]) for k in a)
    assert same >= 0.85, same
    assert len({int(p) for k in a for p in a[k]}) > 1   # not a constant prediction: the check means something


# --- torchrun: shards and sums ----------------------------------------------------------------------------

@pytest.mark.slow   # two interpreters importing torch, twice: ~40-60 s on 2 busy cores
def test_two_ranks_evaluate_as_one_process(world, tmp_path):
    run = tmp_path / "RUN"
    import shutil
    shutil.copytree(world["run"], run)
    one = _json_lines(subprocess.run([sys.executable, "-m", "composer", "evaluate", str(run), "--data", world["data"],
                                      "--batch-size", "4", "--device", "cpu", "--json"], cwd=ROOT, env=_env(),
                                     capture_output=True, text=True, timeout=300).stdout)[0]
    (run / "evaluation.json").unlink()
    proc = _torchrun("evaluate", str(run), "--data", world["data"], "--batch-size", "4", "--device", "cpu", "--json")
    lines = _json_lines(proc.stdout)
    assert len(lines) == 1, proc.stdout                 # rank 0 alone prints
    two = lines[0]
    assert two["processes"] == 2 and one["processes"] == 1 and two["images"] == one["images"] == 30
    assert [s["top1"] for s in two["stitches"]] == [s["top1"] for s in one["stitches"]]
    saved = json.loads((run / "evaluation.json").read_text())   # written once, by rank 0
    assert [s["top1"] for s in saved["stitches"]] == [s["top1"] for s in one["stitches"]]


@pytest.mark.slow   # as above
def test_two_ranks_fit_the_layers_of_one_process(world, tmp_path):
    from composer.run import LAYERS, read_manifest
    out = tmp_path / "RUN2"
    proc = _torchrun("fit", *world["specs"], "--data", world["data"], "--calib", "24", "--batch-size", "4",
                     "--out", str(out), "--device", "cpu", "--json")
    lines = _json_lines(proc.stdout)
    assert len(lines) == 1, proc.stdout
    one, two = load_file(world["run"] / LAYERS), load_file(out / LAYERS)
    assert one.keys() == two.keys() and one
    for k in one:   # the float64 sums in another order only
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), (k, (one[k] - two[k]).abs().max())
    m1, m2 = read_manifest(world["run"])["fit"], read_manifest(out)["fit"]
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert (m2["calib"], m2["held_out"]) == (m1["calib"], m1["held_out"]) == (24, 4)
    assert m2["r2"].keys() == m1["r2"].keys()
    for k in m1["r2"]:
        assert m2["r2"][k] == pytest.approx(m1["r2"][k], abs=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staged folder left by a rank


# --- devices named where they were timed ---------------------------------------------------------------

def test_latency_and_export_name_the_device(world, tmp_path):
    import shutil
    run = tmp_path / "RUN"
    shutil.copytree(world["run"], run)
    assert main(["latency-fit", str(run), "--remeasure", "--repeats", "1", "--device", "cpu", "--json"]) == 0
    assert json.loads((run / "latency.json").read_text())["device"] == "cpu"
    out = tmp_path / "whole"
    assert main(["export", str(run), "--all", "--latency", "--device", "cpu", "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["latency_device"].startswith("cpu") and "Latency measured on cpu" in (out / "README.md").read_text()


def test_train_takes_device_and_precision(world, tmp_path):
    import shutil

    from composer.run import read_manifest
    run = tmp_path / "RUN"
    shutil.copytree(world["run"], run)
    assert main(["train", str(run), "--data", world["data"], "--steps", "1", "--batch-size", "4", "--eval-limit", "6",
                 "--device", "cpu", "--precision", "bf16", "--json"]) == 0
    config = read_manifest(run)["train"]["config"]
    assert (config["device"], config["precision"]) == ("cpu", "bf16")


def test_fold_takes_device(world, tmp_path):
    """fold on the CPU, asked for bf16: it runs (the certificate stays fp32) and refuses the ViT with the usual reason."""
    code = main(["fold", str(world["run"]), "--anchor", "0", "--data", world["data"], "--out", str(tmp_path / "f"),
                 "--device", "cpu", "--precision", "bf16", "--images", "4", "--no-latency"])
    assert code == 2   # the starter-like ViT has nothing to fold: refused in one line, not a device error


# --- on a GPU --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_evaluate_on_the_gpu_in_bf16(world, tmp_path, capsys):
    import shutil
    run = tmp_path / "RUN"
    shutil.copytree(world["run"], run)
    assert main(["evaluate", str(run), "--data", world["data"], "--json"]) == 0   # auto: the GPU, bf16 where it has it
    got = json.loads(capsys.readouterr().out)
    assert got["device"].startswith("cuda:0 (")
    assert got["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert main(["evaluate", str(run), "--data", world["data"], "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    for g, c in zip(got["stitches"], cpu["stitches"]):
        assert abs(g["top1"] - c["top1"]) <= 10.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_fit_on_the_gpu_matches_the_cpu(world, tmp_path):
    from composer.run import LAYERS
    out = tmp_path / "gpu"
    assert main(["fit", *world["specs"], "--data", world["data"], "--calib", "24", "--batch-size", "4",
                 "--out", str(out), "--device", "cuda", "--precision", "fp32"]) == 0
    one, gpu = load_file(world["run"] / LAYERS), load_file(out / LAYERS)
    for k in one:
        assert torch.allclose(one[k], gpu[k], rtol=1e-3, atol=1e-4), k


# --- one resolution for a family trained at several (--resolution) -------------------------------------

def test_plan_refuses_mixed_resolutions_and_resolution_runs_them_at_one(capsys):
    """EfficientNet-B0 (224 px) and B1 (240 px, another mean/std), offline on the meta device."""
    assert main(["plan", "efficientnet_b0", "efficientnet_b1"]) == 2
    assert "anchors disagree on preprocessing" in capsys.readouterr().err
    macs = {}
    for n in (192, 224):
        assert main(["plan", "efficientnet_b0", "efficientnet_b1", "--resolution", str(n), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["resolution"] == n and out["input_size"] == [3, n, n] and out["stitches"]
        macs[n] = {s["id"]: s["macs"] for s in out["stitches"]}
    assert all(macs[192][i] < macs[224][i] for i in macs[224])   # costs counted at the chosen size
    assert main(["plan", "efficientnet_b0", "efficientnet_b1", "--resolution", "224"]) == 0
    assert "224x224 px with the first anchor's normalisation" in capsys.readouterr().out


def test_resolution_refuses_a_fixed_size_vit(capsys):
    assert main(["plan", "deit_tiny_patch16_224", "deit_small_patch16_224", "--resolution", "160"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fixed input size 224x224" in err[0]


def test_resolution_is_kept_by_the_run_and_the_export(tmp_path, capsys):
    """Two CIFAR ResNets, one saved as if trained at 40 px: refused as they are; `fit --resolution 32`
    runs both at 32, and evaluate / export read it from the manifest."""
    from composer.run import read_manifest
    specs, data = mixed_size_cifar_zoo(tmp_path, image_size=36)
    run = tmp_path / "RUN"
    base = ["fit", *specs, "--data", str(data), "--calib", "12", "--batch-size", "4", "--out", str(run), "--device", "cpu"]
    assert main(base) == 2 and "disagree on preprocessing" in capsys.readouterr().err
    assert main(base + ["--resolution", "32"]) == 0
    manifest = read_manifest(run)
    assert manifest["resolution"] == 32 and manifest["data_config"]["input_size"] == [3, 32, 32]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(data), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12
    out = tmp_path / "stitch"
    assert main(["export", str(run), "--stitch", "5", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "resolution 32 x 32" in card and "(3, 32, 32)" in card
    assert json.loads((out / "config.json").read_text())["preprocessing"]["input_size"] == [3, 32, 32]
