"""composer.builders.progressive: masks that run a sub-network inside the full model exactly, a fine-tune
that lowers the sub-networks' loss, weights the run keeps and the elastic search uses."""
import json
import random
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

import zoo  # noqa: F401  (registers the CIFAR ResNets)
from composer.builders import elastic as el
from composer.run import read_candidates
from composer.builders.progressive import arch_masks, progressive_shrink, save_finetuned
from composer.builders.subnet import masked


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def anchor():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", pretrained=False)
    for m in model.modules():   # non-trivial BatchNorm statistics, so that a wrong mask shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return el.prepare_anchor(model, "cifar_resnet20")


def _vit_anchor():
    torch.manual_seed(0)
    args = {"img_size": 32, "depth": 3, "num_classes": 10}
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **args)
    return el.prepare_anchor(model, "deit_tiny_patch16_224", input_size=(3, 32, 32), model_args=args)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_masks_run_exactly_the_extracted_sub_network(anchor, kind):
    anchor = anchor if kind == "cnn" else _vit_anchor()
    x = torch.randn(4, 3, 32, 32)
    for arch in el.sample_archs(anchor.space, 6, seed=1):
        width_masks, depth_masks = arch_masks(anchor.space, arch)
        with torch.no_grad(), masked(anchor.model, anchor.space, width_masks, depth_masks):
            got = anchor.model(x)
        want = el.build_subnet(anchor, arch.config(anchor.space))(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # ~5 s
def test_fine_tune_lowers_the_loss_and_changes_only_weights(anchor):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    before = {k: v.clone() for k, v in anchor.model.state_dict().items()}
    events = []
    r = progressive_shrink(anchor, batches, 30, lr=0.05, events=events.append)
    assert r["steps"] == 30 and r["last_loss"] < 0.8 * r["first_loss"]
    assert [e["phase"] for e in events][:15] == ["fine-tune (depth)"] * 15
    assert events[-1]["phase"] == "fine-tune (width)" and events[-1]["done"] == 30
    after = anchor.model.state_dict()
    assert not anchor.model.training and set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_cancel_before_a_step_is_an_error_and_keeps_the_weights(anchor):
    import threading
    cancel = threading.Event()
    cancel.set()
    before = {k: v.clone() for k, v in anchor.model.state_dict().items()}
    with pytest.raises(el.ElasticError, match="cancelled"):
        progressive_shrink(anchor, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], 5, cancel=cancel)
    assert all(torch.equal(v, anchor.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow   # ~19 s
def test_cli_fine_tunes_then_searches_with_the_saved_weights(tiny_run, tmp_path, main):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    images = tiny_run[1]
    args = ["elastic", run, "--anchor", 0, "--data", images, "--budget-macs", "25M", "--samples", 8,
            "--eval-limit", 8, "--bn-images", 8, "--population", 8, "--generations", 1, "--check", 1,
            "--batch-size", 8]
    r = main(*args, "--finetune-steps", 4, "--json")
    assert r.returncode == 0, r.stderr
    assert "progressive shrinking: 4 steps" in r.stderr
    saved = el.finetuned_path(run, 0)
    [cand] = [c for c in read_candidates(run) if c.method == "elastic"]
    digest = cand.config["finetuned"]
    assert saved.is_file() and digest
    # the run's anchor now comes with those weights, whatever the spec would build
    torch.manual_seed(123)
    anchor = el.anchor_of_run(run, 0)
    weights = load_file(str(saved))
    assert anchor.finetuned == digest
    assert all(torch.equal(v, weights[k]) for k, v in anchor.model.state_dict().items())
    # a later search uses them without fine-tuning again, and its candidate exports
    r = main(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert "using the progressive-shrinking weights" in r.stderr
    name = json.loads(r.stdout)["candidates"][0]["name"]
    assert el.export_candidate(run, name, tmp_path / "ok", program=False).is_dir()
    # weights changed since the candidate was measured: export refuses instead of exporting other numbers
    anchor = el.anchor_of_run(run, 0)
    progressive_shrink(anchor, [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))], 1, lr=0.5)
    save_finetuned(run, anchor)
    with pytest.raises(el.ElasticError, match="other weights"):
        el.export_candidate(run, name, tmp_path / "stale", program=False)
    r = main(*args[:2], "--anchor", 0, "--data", images, "--budget-macs", "25M", "--finetune-steps", -1)
    assert r.returncode == 2 and "--finetune-steps" in r.stderr


def test_phase_archs_keep_widths_whole_while_depth_shrinks(anchor):
    from composer.builders.progressive import _phase_arch
    rnd = random.Random(0)
    for _ in range(10):
        assert set(_phase_arch(anchor.space, "depth", rnd, el.WIDTH_CHOICES).width) == {1.0}
    small = _phase_arch(anchor.space, "width", None, el.WIDTH_CHOICES)
    assert small == el.smallest_arch(anchor.space)
    assert _phase_arch(anchor.space, "depth", None, el.WIDTH_CHOICES).depth == small.depth
