"""zoo.hub: grouping, offline behaviour, and Hub listing/downloads against a real local HTTP server.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, and conftest.py makes this
process offline. So every check that talks to the (fake) Hub runs in a fresh Python subprocess
with its own environment, exactly as a user's process would.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.hub_server import FakeHub, FakeModel
from zoo.hub import Family, HubUnavailable, family_key, group_families, hub_status, list_hub_families, local_families

DEIT = [f"timm/deit_{s}_patch16_224.fb_in1k" for s in ("base", "tiny", "small")]


# ---------------------------------------------------------------------------------------------
# group_families: pure
# ---------------------------------------------------------------------------------------------
def test_groups_size_tokens_and_orders_small_to_large():
    fams = group_families(DEIT)
    assert fams == [Family(
        name="deit_*_patch16_224.fb_in1k", tag="fb_in1k", source="hub",
        members=[f"hf-hub:timm/deit_{s}_patch16_224.fb_in1k" for s in ("tiny", "small", "base")])]


def test_different_tags_are_different_families_and_singletons_dropped():
    ids = ["timm/resnet18.a1_in1k", "timm/resnet50.a1_in1k", "timm/resnet34.a1_in1k",
           "timm/resnet50.tv_in1k",  # only one tv_in1k model: nothing to stitch
           "timm/vit_tiny_patch16_224.augreg_in21k", "timm/vit_small_patch16_224.augreg_in21k",
           "timm/vit_small_patch16_224.augreg_in1k"]
    fams = {f.name: f.members for f in group_families(ids)}
    assert fams == {
        "resnet*.a1_in1k": ["hf-hub:timm/resnet18.a1_in1k", "hf-hub:timm/resnet34.a1_in1k",
                            "hf-hub:timm/resnet50.a1_in1k"],
        "vit_*_patch16_224.augreg_in21k": ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
                                           "hf-hub:timm/vit_small_patch16_224.augreg_in21k"],
    }


@pytest.mark.parametrize("arch, key", [
    ("cifar_resnet20", "cifar_resnet*"),
    ("resnet50d", None),  # "50d" is not a bare depth number
    ("densenet121", "densenet*"),
    ("vgg16_bn", "vgg*_bn"),
    ("convnext_atto", "convnext_*"),
    ("swin_base_patch4_window7_224", "swin_*_patch4_window7_224"),
    ("mobilenetv3_large_100", "mobilenetv3_*_100"),  # the "v3" is a version, not a depth
    ("eva02_tiny_patch14_224", "eva02_*_patch14_224"),
    ("deit_tiny_patch16_224", "deit_*_patch16_224"),  # patch16/224 stay: only the size varies
    ("regnety_040", None),
])
def test_family_key(arch, key):
    got = family_key(arch)
    assert (got[0] if got else None) == key


def test_same_name_other_owner_is_another_family():
    ids = DEIT[:2] + ["someone/deit_tiny_patch16_224.fb_in1k", "someone/deit_base_patch16_224.fb_in1k"]
    names = sorted(f.name for f in group_families(ids))
    assert names == ["deit_*_patch16_224.fb_in1k", "someone/deit_*_patch16_224.fb_in1k"]


def test_sort_key_overrides_size_order():
    macs = {"hf-hub:timm/deit_tiny_patch16_224.fb_in1k": 3.0, "hf-hub:timm/deit_small_patch16_224.fb_in1k": 1.0,
            "hf-hub:timm/deit_base_patch16_224.fb_in1k": 2.0}
    (fam,) = group_families(DEIT, sort_key=macs.__getitem__)
    assert [macs[m] for m in fam.members] == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------
# local folders (no network)
# ---------------------------------------------------------------------------------------------
def _fake_local_model(folder: Path, arch: str) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 10}))
    (folder / "model.safetensors").write_bytes(b"")


def test_local_families(tmp_path):
    for name, arch in [("cifar_resnet56", "cifar_resnet56"), ("cifar_resnet20", "cifar_resnet20"),
                       ("r32.c10", "cifar_resnet32"), ("r44.c10", "cifar_resnet44")]:
        _fake_local_model(tmp_path / name, arch)
    (tmp_path / "broken").mkdir()  # no config.json: ignored
    fams = local_families(tmp_path)
    assert [(f.name, f.source) for f in fams] == [("cifar_resnet*", "local"), ("cifar_resnet*.c10", "local")]
    assert fams[0].members == [f"local-dir:{(tmp_path / n).resolve()}" for n in ("cifar_resnet20", "cifar_resnet56")]
    assert local_families(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# offline (this process: conftest sets HF_HUB_OFFLINE=1)
# ---------------------------------------------------------------------------------------------
def test_offline_mode_answers_at_once_with_clear_message():
    start = time.perf_counter()
    msg = hub_status()
    assert msg and "offline" in msg.lower() and "HF_HUB_OFFLINE" in msg
    with pytest.raises(HubUnavailable, match="offline"):
        list_hub_families()
    assert time.perf_counter() - start < 5


def test_unreachable_hub_fails_fast_with_message(monkeypatch):
    # zoo.hub reads huggingface_hub.constants at call time, so patching them here is enough.
    from huggingface_hub import constants
    with FakeHub([]) as hub:
        dead = hub.url  # the port is closed once the server stops
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    start = time.perf_counter()
    with pytest.raises(HubUnavailable, match="unreachable") as err:
        list_hub_families()
    assert dead in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------------------
# against the fake Hub: one fresh Python process, as a user's would be (huggingface_hub reads
# HF_ENDPOINT and HF_HUB_OFFLINE at import, and this process is offline)
# ---------------------------------------------------------------------------------------------
_CLIENT = """
import dataclasses, json, timm
import zoo.cifar_resnet
from zoo.hub import cached_families, hub_status, list_hub_families
out = {"status": hub_status(), "lists": {}, "sums": {}}
for label, kwargs in LISTINGS.items():
    out["lists"][label] = [dataclasses.asdict(f) for f in list_hub_families(**kwargs)]
for d in (20, 32):
    m = timm.create_model(f"hf-hub:timm/cifar_resnet{d}.fake_c10", pretrained=True)
    out["sums"][d] = float(m.linear.weight.sum())
out["cached"] = [dataclasses.asdict(f) for f in cached_families()]
print(json.dumps(out))
"""
LISTINGS = {"all": {}, "search": {"search": "deit"}, "other": {"author": "other"},
            "tagged": {"tags": ["dataset:imagenet-21k"]}, "limited": {"limit": 3}}


def _model_files(arch: str) -> dict:
    """config.json + model.safetensors as timm would publish them, for a random-init model."""
    import safetensors.torch
    import timm
    import torch
    from timm.models._hub import save_config_for_hf

    import zoo.cifar_resnet  # noqa: F401  (registers the architecture)
    torch.manual_seed(0)
    model = timm.create_model(arch)
    with tempfile.TemporaryDirectory() as d:
        save_config_for_hf(model, f"{d}/config.json")
        config = Path(d, "config.json").read_bytes()
    return {"config.json": config,
            "model.safetensors": safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})}


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """Serve a small fake Hub, run a client process against it; return what it saw."""
    files = {d: _model_files(f"cifar_resnet{d}") for d in (20, 32)}
    models = [FakeModel(f"timm/deit_{s}_patch16_224.fb_in1k") for s in ("tiny", "small", "base")]
    models += [FakeModel(f"timm/cifar_resnet{d}.fake_c10", files=files[d]) for d in (20, 32)]
    models += [FakeModel(f"other/convnext_{s}.in1k") for s in ("tiny", "small")]
    models += [FakeModel(f"timm/vit_{s}_patch16_224.augreg_in21k", tags=["timm", "dataset:imagenet-21k"])
               for s in ("tiny", "small")]
    models += [FakeModel(f"timm/bert_{s}.x", tags=["transformers"]) for s in ("tiny", "base")]  # not timm
    hf_home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), PYTHONPATH=str(ROOT),
               NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    code = f"LISTINGS = {LISTINGS!r}\n" + _CLIENT
    with FakeHub(models, page_size=2) as hub:  # small pages: the client must follow Link headers
        env["HF_ENDPOINT"] = hub.url
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(requests=hub.requests, files=files, hf_home=hf_home)
    return out


@pytest.mark.slow   # a fresh interpreter lists and downloads from the fake Hub (module fixture): ~15 s
def test_hub_reachable(hub_run):
    assert hub_run["status"] is None


@pytest.mark.slow   # a fresh interpreter lists and downloads from the fake Hub (module fixture): ~15 s
def test_hub_families_grouped_from_server_answers(hub_run):
    fams = hub_run["lists"]["all"]
    assert [f["name"] for f in fams] == [
        "cifar_resnet*.fake_c10", "deit_*_patch16_224.fb_in1k", "vit_*_patch16_224.augreg_in21k"]
    assert fams[1]["members"] == [f"hf-hub:timm/deit_{s}_patch16_224.fb_in1k" for s in ("tiny", "small", "base")]
    assert {f["source"] for f in fams} == {"hub"}


@pytest.mark.slow   # a fresh interpreter lists and downloads from the fake Hub (module fixture): ~15 s
def test_hub_search_author_tags_limit_honoured(hub_run):
    names = lambda key: [f["name"] for f in hub_run["lists"][key]]
    assert names("search") == ["deit_*_patch16_224.fb_in1k"]
    assert names("other") == ["other/convnext_*.in1k"]
    assert names("tagged") == ["vit_*_patch16_224.augreg_in21k"]
    assert names("limited") == ["cifar_resnet*.fake_c10"]  # first 3 ids (2 cifar + 1 deit): one family


@pytest.mark.slow   # a fresh interpreter lists and downloads from the fake Hub (module fixture): ~15 s
def test_client_sent_library_filter_and_followed_pages(hub_run):
    listing = [q for m, p, q in hub_run["requests"] if p == "/api/models" and q.get("limit") != ["1"]]
    assert any(q.get("filter") == ["timm"] and q.get("author") == ["timm"] for q in listing)
    assert any("cursor" in q for q in listing)  # page 2+ requested via the Link header


@pytest.mark.slow   # a fresh interpreter lists and downloads from the fake Hub (module fixture): ~15 s
def test_timm_downloads_from_server_and_cache_lists_family(hub_run):
    import safetensors.torch
    for d in (20, 32):  # the weights timm loaded are the ones the server sent
        served = safetensors.torch.load(hub_run["files"][d]["model.safetensors"])["linear.weight"].sum()
        assert hub_run["sums"][str(d)] == pytest.approx(float(served))
    assert hub_run["cached"] == [{"name": "cifar_resnet*.fake_c10", "tag": "fake_c10", "source": "cache",
                                  "members": [f"hf-hub:timm/cifar_resnet{d}.fake_c10" for d in (20, 32)]}]
    # the same cache, read from this offline process
    from zoo.hub import cached_families
    assert [f.name for f in cached_families(hub_run["hf_home"] / "hub")] == ["cifar_resnet*.fake_c10"]


def test_cached_families_of_missing_cache_is_empty(tmp_path):
    from zoo.hub import cached_families
    assert cached_families(tmp_path / "nothing") == []


def test_listing_error_after_probe_becomes_hub_unavailable(monkeypatch):
    # The Hub answered the probe but the listing itself fails (network dropped, 5xx): same clear error.
    import httpx2
    import huggingface_hub
    import zoo.hub
    monkeypatch.setattr(zoo.hub, "hub_status", lambda: None)

    def boom(**kwargs):
        raise httpx2.ConnectError("connection reset")
        yield  # a generator, like the real list_models

    monkeypatch.setattr(huggingface_hub, "list_models", boom)
    with pytest.raises(HubUnavailable, match="connection reset"):
        list_hub_families()
