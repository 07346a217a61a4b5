"""composer.builders.fold: every fold equals the model it came from (checked against the original model's
outputs, computed independently), refused folds say why, the certificate measures, not trusts."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import save_for_hf
from torch import nn

import zoo  # noqa: F401  (registers the CIFAR ResNets with timm)
from composer.run import read_candidates
from composer.export import anchor_entry
from composer.builders.fold import (ActOnly, AnnealedReLU, FoldError, PassThrough, anneal, apply_fold, compose_serial,
                           fold_conv_bn, fold_model, fold_parallel, fold_serial, load_folded, mark_foldable,
                           save_folded, serial_exact)
from composer.plan import LayerSpec
from composer.snnet import StitchLayer
from tests.conftest import need_shared
from tests.test_train import image_folder, make_run


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine far from the defaults, so that a fold that ignores any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def conv(cin, cout, k, stride=1, padding=0, bias=True, seed=0) -> nn.Conv2d:
    torch.manual_seed(seed)
    c = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    if bias:
        with torch.no_grad():
            c.bias.uniform_(-1, 1)
    return c.eval()


# --- conv + BN -------------------------------------------------------------------------------------

def test_conv_bn_fold_on_cifar_resnet_equals_the_original():
    model = randomise_bn(timm.create_model("cifar_resnet20", pretrained=False))
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    folded, cert = fold_model(model, x, latency=False)
    with torch.no_grad():
        got = folded(x)
        assert torch.equal(model(x), want)   # the caller's model is untouched
    assert rel_diff(got, want) < 1e-5
    # stem + 2 per BasicBlock x 9 blocks, every one folded, no BN left
    assert [f.kind for f in cert.folds] == ["conv+bn"] * 19 and all(f.exact for f in cert.folds)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # the certificate's numbers are the measured ones
    assert cert.max_abs == pytest.approx(float((got - want).abs().max()), rel=1e-6, abs=1e-12)
    assert cert.max_rel == pytest.approx(cert.max_abs / float(want.abs().max()), rel=1e-6)
    # params: each BN's weight and bias (2C) go, each conv gains a bias (C)
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert cert.cost_before.params - cert.cost_after.params == bn_channels
    # per-fold deltas add up to the whole model's change; a bias adds a MAC per output element
    for k in ("macs", "params", "activations"):
        assert sum(f.cost_delta[k] for f in cert.folds) == getattr(cert.cost_after, k) - getattr(cert.cost_before, k)
    assert cert.cost_after.macs - cert.cost_before.macs == (16 * 32 * 32 * 7 + 32 * 16 * 16 * 6 + 64 * 8 * 8 * 6)


def test_batchnormact2d_folds_and_keeps_its_activation():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                       BatchNormAct2d(8, act_layer=nn.Hardswish), nn.Conv2d(8, 4, 1)))
    x = torch.randn(4, 3, 16, 16)
    folded, cert = fold_model(model, x, latency=False)
    assert [f.where for f in cert.applied] == [["0", "1"]]
    assert isinstance(folded[1], ActOnly) and isinstance(folded[1].act, nn.Hardswish)
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-5
        # independent: the activation really is still applied after the folded conv
        assert torch.allclose(folded(x), model[2](F.hardswish(folded[0](x))))


def test_mobilenet_with_batchnormact2d_and_timm_resnet18():
    x = torch.randn(4, 3, 32, 32)
    for name, kwargs in (("mobilenetv3_small_050", {}), ("resnet18", dict(channels=(8, 16, 32, 64), stem_width=8))):
        model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
        folded, cert = fold_model(model, x, latency=False)
        with torch.no_grad():
            assert rel_diff(folded(x), model(x)) < 1e-5, name
        assert cert.applied and not cert.refused, name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name


def test_fold_conv_bn_function():
    c = conv(3, 6, 3, padding=1, bias=False)
    bn = randomise_bn(nn.BatchNorm2d(6))
    x = torch.randn(2, 3, 8, 8)
    r = fold_conv_bn(c, bn, x)
    assert r.exact and r.max_rel < 1e-6
    with torch.no_grad():
        assert torch.allclose(r.module(x), bn(c(x)), atol=1e-5)


# --- parallel and serial -----------------------------------------------------------------------------

def test_repvgg_style_three_branches_fold_into_one_conv():
    branches = [nn.Sequential(conv(8, 8, 3, padding=1, bias=False, seed=1), randomise_bn(nn.BatchNorm2d(8), 1)),
                nn.Sequential(conv(8, 8, 1, bias=False, seed=2), randomise_bn(nn.BatchNorm2d(8), 2)),
                randomise_bn(nn.BatchNorm2d(8), 3)]
    x = torch.randn(2, 8, 10, 10)
    r = fold_parallel(branches, x)
    assert r.exact and isinstance(r.module, nn.Conv2d) and r.module.kernel_size == (3, 3)
    with torch.no_grad():
        want = sum(b(x) for b in branches)
        assert rel_diff(r.module(x), want) < 1e-5
    # a 1x1 branch padded by 1 reads other pixels than the 3x3's centre: refused, not merged
    shifted = fold_parallel([branches[0], conv(8, 8, 1, padding=1)], None)
    assert not shifted.exact and "centred" in shifted.reason


def test_serial_3x3_then_1x1_is_one_exact_3x3():
    x = torch.randn(2, 4, 11, 11)
    for stride in (1, 2):
        a, b = conv(4, 8, 3, stride=stride, padding=1, seed=1), conv(8, 5, 1, seed=2)
        r = fold_serial(a, b, x)
        assert r.exact and r.module.kernel_size == (3, 3) and r.module.stride == (stride, stride)
        with torch.no_grad():
            assert rel_diff(r.module(x), b(a(x))) < 1e-5


def test_3x3_then_3x3_into_5x5_is_refused_on_the_border():
    a, b = conv(4, 6, 3, padding=1, seed=1), conv(6, 5, 3, padding=1, seed=2)
    x = torch.randn(2, 4, 12, 12)
    r = fold_serial(a, b, x)
    assert not r.exact and r.module is None and "border" in r.reason
    assert r.max_rel > 1e-3                      # the measured evidence comes with the refusal
    # independent check that the refusal is right: the 5x5 agrees inside, not on the border
    with torch.no_grad():
        merged, want = compose_serial(a, b)(x), b(a(x))
    assert merged.shape == (2, 5, 12, 12) and merged.shape == want.shape
    assert rel_diff(merged[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2]) < 1e-5
    assert rel_diff(merged, want) > 1e-3
    # without padding the two valid convs are exactly one 5x5
    a0, b0 = conv(4, 6, 3, seed=1), conv(6, 5, 3, seed=2)
    r0 = fold_serial(a0, b0, x)
    assert r0.exact and r0.module.kernel_size == (5, 5)
    with torch.no_grad():
        assert rel_diff(r0.module(x), b0(a0(x))) < 1e-5


def test_1x1_with_bias_before_a_padded_3x3_is_refused():
    b = conv(6, 5, 3, padding=1, seed=2)
    reason = serial_exact(conv(4, 6, 1, bias=True, seed=1), b)
    assert reason and "border" in reason and "bias" in reason
    a = conv(4, 6, 1, bias=False, seed=1)
    assert serial_exact(a, b) is None
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert rel_diff(fold_serial(a, b, x).module(x), b(a(x))) < 1e-5


# --- the certificate catches what it is not told ------------------------------------------------------

def test_a_wrong_fold_is_measured_refused_and_reverted():
    model = randomise_bn(timm.create_model("cifar_resnet20", pretrained=False))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        c, bn = model.conv1, model.bn1
        wrong = nn.Conv2d(3, 16, 3, padding=1)   # forgets the running mean: a classic folding bug
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        wrong.weight.copy_(c.weight * scale[:, None, None, None])
        wrong.bias.copy_(bn.bias)
    r = apply_fold(model, {"conv1": wrong, "bn1": PassThrough()}, x, kind="conv+bn")
    assert not r.exact and "tolerance" in r.reason and not r.edits
    assert model.conv1 is c and model.bn1 is bn                      # reverted
    with torch.no_grad():
        assert torch.equal(model(x), want)
        model.conv1, model.bn1 = wrong, PassThrough()                # the same error, measured by hand
        diff = float((model(x) - want).abs().max())
        model.conv1, model.bn1 = c, bn
    assert r.max_abs == pytest.approx(diff, rel=1e-6)
    # and the right fold passes, with its (tiny) difference measured
    ok = apply_fold(model, {"conv1": fold_conv_bn(c, bn).module, "bn1": PassThrough()}, x, kind="conv+bn")
    assert ok.exact and 0 <= ok.max_rel < 1e-5 and ok.edits[1] == {"module": "bn1", "type": "pass"}


# --- stitching layers -----------------------------------------------------------------------------------

def _stitch(cin: int, cout: int) -> StitchLayer:
    return StitchLayer(LayerSpec("k", 0, 1, cin, cout, "nchw", "nchw"))


class _Stitched(nn.Module):
    """conv+BN -> 1x1 stitch -> ReLU -> 1x1 stitch -> conv: where a stitch can fold, both ways."""

    def __init__(self, second: nn.Conv2d, bias: bool = True):
        super().__init__()
        self.conv, self.bn = conv(3, 8, 3, padding=1, bias=False, seed=1), randomise_bn(nn.BatchNorm2d(8))
        self.s1, self.s2 = _stitch(8, 6), _stitch(6, second.in_channels)
        torch.manual_seed(3)
        with torch.no_grad():
            for s in (self.s1, self.s2):
                s.weight.normal_()
                s.bias.uniform_(-1, 1) if bias else s.bias.zero_()
        self.after = second

    def forward(self, x):
        return self.after(self.s2(F.relu(self.s1(self.bn(self.conv(x)), None)), None))


def test_stitch_layers_fold_where_exact_and_say_why_not_elsewhere():
    x = torch.randn(3, 3, 12, 12)
    # s1 folds back into conv+BN (kxk then 1x1); s2 (with a bias) into a 1x1 after it
    model = _Stitched(conv(4, 5, 1, seed=4)).eval()
    folded, cert = fold_model(model, x, latency=False)
    assert [(f.kind, f.where) for f in cert.applied] == [("conv+bn", ["conv", "bn"]), ("stitch", ["conv", "s1"]),
                                                         ("stitch", ["s2", "after"])]
    assert isinstance(folded.s1, PassThrough) and isinstance(folded.s2, PassThrough)
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-5
    assert cert.cost_after.params < cert.cost_before.params
    # s2 has a bias and the next conv pads: the border rule refuses it
    padded = _Stitched(conv(4, 5, 3, padding=1, seed=4)).eval()
    _, cert = fold_model(padded, x, latency=False)
    refused = [f for f in cert.refused if "s2" in f.where]
    assert len(refused) == 1 and "border" in refused[0].reason
    # without a bias it is exact, but 6 -> 4 -> 3x3 costs less than one 3x3 from 6 channels: kept
    _, cert = fold_model(_Stitched(conv(4, 5, 3, padding=1, seed=4), bias=False).eval(), x, latency=False)
    assert "not cheaper" in next(f for f in cert.refused if "s2" in f.where).reason
    # ... and a widening stitch without bias folds into the padded conv exactly
    unbiased = _Stitched(conv(12, 5, 3, padding=1, seed=4), bias=False).eval()
    folded, cert = fold_model(unbiased, x, latency=False)
    assert ["s2", "after"] in [f.where for f in cert.applied]
    with torch.no_grad():
        assert rel_diff(folded(x), unbiased(x)) < 1e-5


# --- timm's reparameterize_model ----------------------------------------------------------------------

def test_timm_reparameterize_is_used_and_certified():
    model = randomise_bn(timm.create_model("repvgg_a0", pretrained=False, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    folded, cert = fold_model(model, x, latency=False)
    assert cert.folds[0].kind == "reparameterize" and cert.folds[0].exact
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-4
    assert cert.cost_after.params < cert.cost_before.params and cert.cost_after.macs < cert.cost_before.macs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


# --- activation annealing (VanillaNet) ---------------------------------------------------------------

def _vanilla_block() -> nn.Sequential:
    """VanillaNet's block shape: kxk conv + BN, activation, 1x1 conv + BN."""
    return nn.Sequential(conv(3, 8, 3, padding=1, bias=False, seed=1), randomise_bn(nn.BatchNorm2d(8), 1), nn.ReLU(),
                         conv(8, 8, 1, bias=False, seed=2), randomise_bn(nn.BatchNorm2d(8), 2), nn.ReLU())


def test_annealing_blends_relu_to_identity_then_folds():
    model = nn.Sequential(_vanilla_block(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        want = model(x)
    block = model[0]
    assert mark_foldable(model, ["0"]) == ["0.2", "0.5"]
    with torch.no_grad():
        assert torch.equal(model(x), want)                                  # lambda 0: still ReLU
        assert anneal(model, 0.5) == 2
        by_hand = nn.Sequential(*[nn.LeakyReLU(0.5) if isinstance(m, AnnealedReLU) else m for m in block])
        # leaky_relu(x, lambda): the same values by another formula, so ~1 ulp apart before the last conv
        assert torch.allclose(model(x), model[1](by_hand(x)), rtol=1e-5, atol=1e-6)
        anneal(model, 1.0)
        linear = model(x)
        assert torch.allclose(linear, model[1](block[4](block[3](block[1](block[0](x))))), rtol=1e-5, atol=1e-6)
    folded, cert = fold_model(model, x, latency=False)
    assert ("serial", ["0.0", "0.3"]) in [(f.kind, f.where) for f in cert.applied]
    with torch.no_grad():
        assert rel_diff(folded(x), linear) < 1e-5
    assert cert.cost_after.params < cert.cost_before.params
    with pytest.raises(FoldError, match="lambda"):
        anneal(model, 1.5)
    # the CIFAR BasicBlock calls F.relu: nothing to anneal, said so
    with pytest.raises(FoldError, match="no nn.ReLU"):
        mark_foldable(timm.create_model("cifar_resnet20", pretrained=False), ["layer1.0"])


# --- saving, loading, the CLI ----------------------------------------------------------------------------

def test_folded_model_saves_and_loads_with_safetensors(tmp_path):
    model = randomise_bn(timm.create_model("cifar_resnet20", pretrained=False))
    x = torch.randn(2, 3, 32, 32)
    folded, cert = fold_model(model, x, latency=False)
    save_folded(tmp_path, folded, cert, {"kind": "anchor", "entry": anchor_entry(0, "cifar_resnet20", model)})
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "certificate.json"}
    loaded = load_folded(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
    assert json.loads((tmp_path / "certificate.json").read_text())["max_abs"] == cert.max_abs
    with pytest.raises(FoldError, match="not a folded model"):
        load_folded(tmp_path / "missing")


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """A fitted CIFAR-ResNet run whose anchors have non-default BN statistics."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("foldrun")
    specs = []
    for i, arch in enumerate(("cifar_resnet20", "cifar_resnet32")):
        torch.manual_seed(i)
        save_for_hf(randomise_bn(timm.create_model(arch), seed=i), str(tmp / arch), safe_serialization=True)
        specs.append(f"local-dir:{tmp / arch}")
    val = image_folder(tmp / "val", 16, 32, seed=1)
    return make_run(tmp, (specs, image_folder(tmp / "train", 16, 32), val)), val


@pytest.mark.slow   # fits a CIFAR-ResNet run first: ~5 s
def test_cli_fold_anchor_and_stitch(bn_run, tmp_path, main, monkeypatch):
    run, val = bn_run
    # the exported stitch's torch.export program (most of an export's time) plays no part in folding
    monkeypatch.setattr("composer.export.save_program", lambda *a: {"file": None, "kind": None, "errors": ["test"]})
    r = main("fold", run, "--anchor", 0, "--data", val, "--out", tmp_path / "a", "--images", 8, "--no-latency", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["certificate"]["within_tolerance"] and len(out["certificate"]["folds"]) == 19
    (cand,) = [c for c in read_candidates(run) if c.name == "cifar_resnet20 folded"]
    assert cand.method == "fold" and cand.status == "measured" and cand.config["changed_predictions"] == 0
    # top-1 measured independently: the run's anchor (its own weights) on the same 16 images
    from composer import data
    from composer.run import load_run
    anchor = load_run(run).net.anchors[0]
    ds = data.open_dataset(val, data.data_config(anchor))
    with torch.no_grad():
        correct = sum(int((anchor(x).argmax(-1) == y).sum()) for x, y in data.loader(ds, 8))
    assert cand.top1 == pytest.approx(100 * correct / len(ds)) == pytest.approx(cand.config["source_top1"])
    loaded = load_folded(tmp_path / "a")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(loaded(x), anchor(x)) < 1e-5

    # a stitch between two blocks: BN folds, the stitching layer is refused with the residual named
    r = main("fold", run, "--stitch", 2, "--data", val, "--out", tmp_path / "s", "--images", 4, "--no-latency")
    assert r.returncode == 0, r.stderr
    assert "REFUSED stitch" in r.stdout and "shortcut" in r.stdout and "BasicBlock" in r.stdout
    cert = json.loads((tmp_path / "s" / "certificate.json").read_text())
    assert cert["within_tolerance"] and any(f["kind"] == "conv+bn" and f["exact"] for f in cert["folds"])
    # the folded stitch computes what the run's stitch computes (its own BN statistics folded in)
    net = load_run(run).net.eval()
    with torch.no_grad():
        assert rel_diff(load_folded(tmp_path / "s")(x), net.select(2)(x)) < 1e-5

    # bad input: one line, exit 2
    for args in (("--anchor", 7), ("--stitch", 999)):
        r = main("fold", run, *args, "--data", val, "--out", tmp_path / "bad", "--no-latency")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_real_cifar_resnet20_folds_exactly_on_real_images():
    need_shared()
    from bench.cifar10 import cifar10_splits, cifar_anchor_specs
    from composer import data
    from zoo.sources import create_anchor
    model = create_anchor(cifar_anchor_specs()[0])
    ds = data.subset(data.open_dataset(str(cifar10_splits().eval), data.data_config(model)), 32, seed=0)
    x, y = next(iter(data.loader(ds, 32)))
    folded, cert = fold_model(model, x, latency=False)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert cert.within_tolerance and rel_diff(got, want) < 1e-5 and len(cert.applied) == 19
    assert torch.equal(got.argmax(-1), want.argmax(-1))
