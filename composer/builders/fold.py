"""Folding: merge what is linear at inference into fewer convs, each fold with a measured certificate.

What folds (VanillaNet's deep training strategy, ReduceNet, RepVGG):
- conv + BN with eval statistics (timm's BatchNormAct2d too: its BN goes into the conv, its
  activation stays as `ActOnly`), with torch's `fuse_conv_bn_eval` for the math;
- parallel linear branches summed (3x3 + 1x1 + identity -> one 3x3): `fold_parallel`;
- serial linear convs (kxk then 1x1 -> one kxk), including a 1x1 SN-Net stitching layer and a conv
  it touches; convs with an annealed activation between them once it is linear (`anneal`);
- timm's own `reparameterize_model` for the families that have it (RepVGG, MobileOne, FastViT).

When a serial fold is exact (zero padding; b follows a):
- b has no padding: always (b only reads real outputs of a, so one conv padding the input as a
  did computes the same on every pixel);
- b pads, a is a 1x1 without stride offset, padding and bias: a's value on b's zero ring is 0 too.
Otherwise it is refused: b zero-pads a's *output*, a merged conv can only zero-pad the *input*,
so the outputs near the border differ (two 3x3 -> one 5x5 is off by 0.37 there on resnet-like
weights, methods.md), and a 1x1 with a bias before a padded kxk sees its bias on that ring.

Where a stitching layer can fold: into the conv that produces its input when nothing else reads
that conv's output (kxk then 1x1: exact), or into the single conv that alone reads its output
(exact by the rule above). Between ResNet blocks neither holds: a block's output is
relu(bn2(conv2(x)) + shortcut(x)), so a ReLU and a sum sit between conv2 and the stitch, and the
next block reads its input twice (conv1 and the shortcut). Those stitches are refused, with the reason.

Finding what feeds what: one traced forward with hooks on every module, matching tensors by
identity (torch.fx cannot see through timm's BatchNormAct2d, and the models call F.relu as
functions). Modules that return their input unchanged (Identity, a folded-away module, an
annealed activation at lambda = 1) are see-through. Functional reuse that hooks cannot see (a
residual reading a conv's output) is caught by the certificate: every fold is applied, measured
on the given real inputs against the model before it, and reverted if the relative difference
exceeds the tolerance.

Certificate numbers: max_abs = max |folded - original| over all logits of all inputs; max_rel =
max_abs / max |original| (relative to the output scale: an elementwise ratio explodes near 0).
Costs follow composer.costs: a folded conv gains a bias, and a bias adds 1 MAC per output element
(pycls), so counted MACs go *up* slightly while BN's per-element work (not counted) disappears.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from composer import checks
from composer.candidates import Candidate
from composer.run import add_candidates
from composer.costs import Cost, measure_latency, model_cost
from composer.builders.source import BuildResult, resolve_source
from composer.errors import UserError
from composer.evaluate import accuracy, predictions
from composer.io import read_config, save_safetensors_atomic, write_json_atomic
from composer.snnet import StitchLayer

FORMAT = "zoo-composer-folded"
TOLERANCE = 1e-4            # relative (see max_rel above)
CHECK_IMAGES = 8            # images each single fold is measured on; the whole model uses all


class FoldError(UserError):
    """A fold that cannot be attempted as asked (bad input, unreadable folder); the message says why."""


# --- modules a fold leaves behind ------------------------------------------------------------------

class PassThrough(nn.Module):
    """What a folded-away module becomes. Extra arguments are ignored: a StitchLayer is called
    with (x, out_shape)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class ActOnly(nn.Module):
    """A BatchNormAct2d whose BN went into the conv before it: its dropout and activation stay."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


class AnnealedReLU(nn.Module):
    """VanillaNet's deep-training activation: (1 - lam) relu(x) + lam x = leaky_relu(x, lam).
    lam = 0 is ReLU; at lam >= 1 it is the identity and returns x itself, which is what lets the
    convs around it fold."""

    def __init__(self, lam: float = 0.0):
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.lam >= 1 else F.leaky_relu(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


def mark_foldable(model: nn.Module, blocks: Iterable[str]) -> list[str]:
    """Replace every nn.ReLU inside the named blocks by an AnnealedReLU (lam = 0: same outputs).
    Returns the names replaced. A block whose ReLUs are functional (F.relu, e.g. the CIFAR
    BasicBlock) has nothing to replace and is refused."""
    replaced = []
    for block in blocks:
        try:
            root = model.get_submodule(block)
        except AttributeError:
            raise FoldError(f"no module named '{block}' in the model") from None
        names = [f"{block}.{n}" if block else n for n, m in root.named_modules() if type(m) is nn.ReLU]
        if not names:
            raise FoldError(f"block '{block}' has no nn.ReLU module to anneal (its activations are "
                            "functional calls, or not ReLU)")
        for n in names:
            _set(model, n, AnnealedReLU(0.0))
        replaced += names
    return replaced


def anneal(model: nn.Module, lam: float) -> int:
    """Set lambda on every AnnealedReLU (schedule it 0 -> 1 over a fine-tune, e.g. step / steps);
    returns how many. At lam = 1 the marked activations are linear and `fold_model` merges the
    convs around them where that is exact."""
    if not 0.0 <= lam <= 1.0:
        raise FoldError(f"lambda must be in [0, 1], got {lam}")
    acts = [m for m in model.modules() if isinstance(m, AnnealedReLU)]
    for m in acts:
        m.lam = float(lam)
    return len(acts)


# --- results -----------------------------------------------------------------------------------------

@dataclass
class FoldResult:
    kind: str                       # conv+bn, serial, parallel, stitch, reparameterize, custom
    where: list[str]                # the modules involved
    exact: bool                     # True: applied and certified; False: refused (see reason)
    reason: str = ""
    max_abs: float | None = None    # measured on real inputs (None: not measured)
    max_rel: float | None = None
    cost_delta: dict | None = None  # change of the whole model's cost (macs, params, activations)
    edits: list[dict] = field(default_factory=list)            # how to redo it on a fresh source model
    module: nn.Module | None = field(default=None, repr=False)  # the merged module (fold_* functions)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "module"}


@dataclass
class Certificate:
    folds: list[FoldResult]
    images: int                     # real inputs the whole-model figures are measured on
    max_abs: float
    max_rel: float
    tolerance: float
    cost_before: Cost
    cost_after: Cost
    latency_before_ms: float | None = None   # batch 1, this device, measured interleaved
    latency_after_ms: float | None = None

    @property
    def applied(self) -> list[FoldResult]:
        return [f for f in self.folds if f.exact]

    @property
    def refused(self) -> list[FoldResult]:
        return [f for f in self.folds if not f.exact]

    @property
    def within_tolerance(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("folds", "cost_before", "cost_after")}
        return {**d, "within_tolerance": self.within_tolerance, "cost_before": self.cost_before.to_dict(),
                "cost_after": self.cost_after.to_dict(), "folds": [f.to_dict() for f in self.folds]}


def format_certificate(cert: Certificate) -> str:
    """The certificate as text: one line per fold, then the whole model."""
    lines = []
    for f in cert.folds:
        measured = f"  max abs {f.max_abs:.2e}, rel {f.max_rel:.2e}" if f.max_abs is not None else ""
        status = "folded " if f.exact else "REFUSED"
        lines.append(f"{status} {f.kind:<14} {' + '.join(f.where)}{measured}")
        if f.reason:
            lines.append(f"        {f.reason}")
    b, a = cert.cost_before, cert.cost_after
    lines.append(f"{len(cert.applied)} folds applied, {len(cert.refused)} refused; whole model on {cert.images} "
                 f"real images: max abs {cert.max_abs:.2e}, max rel {cert.max_rel:.2e} "
                 f"({'within' if cert.within_tolerance else 'OVER'} tolerance {cert.tolerance:g})")
    lines.append(f"MACs {b.macs / 1e6:.2f} M -> {a.macs / 1e6:.2f} M, params {b.params:,} -> {a.params:,}, "
                 f"activations {b.activations:,} -> {a.activations:,} (MACs: 1 multiply-add = 1; bias adds counted)")
    if cert.latency_before_ms is not None:
        lines.append(f"latency (batch 1, this device) {cert.latency_before_ms:.3f} ms -> {cert.latency_after_ms:.3f} ms "
                     f"({cert.latency_before_ms / cert.latency_after_ms:.2f}x)")
    return "\n".join(lines)


# --- measuring ---------------------------------------------------------------------------------------

@torch.no_grad()
def _outputs(model: nn.Module, inputs: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = [model(inputs[i:i + batch]) for i in range(0, len(inputs), batch)]
    if not all(isinstance(o, torch.Tensor) for o in out):
        raise FoldError("the model's output is not a tensor; folding certifies single-tensor outputs")
    return torch.cat(out)


def _difference(reference: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    if reference.shape != out.shape:
        return float("inf"), float("inf")
    diff = float((out - reference).abs().max())
    scale = float(reference.abs().max())
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _measure(fn: Callable, reference_fn: Callable, x: torch.Tensor | None) -> tuple[float | None, float | None]:
    if x is None:
        return None, None
    with torch.no_grad():
        return _difference(reference_fn(x), fn(x))


def interleaved_latency(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int = 5) -> tuple[float, float]:
    """Median batch latency (ms) of a and b, measured in alternating rounds (a b b a ...), so that a
    busy machine slows both alike and their ratio stays meaningful."""
    la, lb = [], []
    for r in range(rounds):
        pair = [(a, la), (b, lb)] if r % 2 == 0 else [(b, lb), (a, la)]
        for model, times in pair:
            times.append(measure_latency(model, x, warmup=2, repeats=5))
    return statistics.median(la), statistics.median(lb)


# --- the math of each fold (no model needed) ---------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=conv.weight.device)


def _unsupported(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return "grouped convolutions are not merged here"
    if _pair(conv.dilation) != (1, 1):
        return "dilated convolutions are not merged here"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"padding {conv.padding!r} / {conv.padding_mode} is not plain zero padding"
    return None


def as_conv(module: nn.Module) -> nn.Conv2d | None:
    """The module as an nn.Conv2d: itself, or a channels-first StitchLayer as the 1x1 conv it
    applies; None for anything else (e.g. a stitching layer on tokens)."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, StitchLayer) and module.in_layout == module.out_layout == "nchw":
        conv = nn.Conv2d(module.weight.shape[1], module.weight.shape[0], 1).to(module.weight.device)
        with torch.no_grad():
            conv.weight.copy_(module.weight[:, :, None, None])
            conv.bias.copy_(module.bias)
        return conv
    return None


@torch.no_grad()
def compose_serial(a: nn.Conv2d, b: nn.Conv2d) -> nn.Conv2d:
    """One conv computing b(a(x)) away from the border (the math only; `serial_exact` says where
    it holds everywhere). b's kernel is dilated by a's stride; the merged kernel is the full
    convolution of the two, its bias b's bias plus b applied to a's bias."""
    sa, sb, pa, pb = _pair(a.stride), _pair(b.stride), _pair(a.padding), _pair(b.padding)
    kb = _pair(b.kernel_size)
    # conv2d(a's weight as a batch over its inputs, b's flipped weight) is the full convolution
    w = F.conv2d(a.weight.transpose(0, 1), b.weight.flip(2, 3),
                 padding=((kb[0] - 1) * sa[0], (kb[1] - 1) * sa[1]), dilation=sa).transpose(0, 1)
    merged = nn.Conv2d(a.in_channels, b.out_channels, tuple(w.shape[2:]), stride=(sa[0] * sb[0], sa[1] * sb[1]),
                       padding=(pa[0] + pb[0] * sa[0], pa[1] + pb[1] * sa[1]), bias=True).to(w.device)
    merged.weight.copy_(w)
    merged.bias.copy_(_bias(b) + b.weight.sum((2, 3)) @ _bias(a))
    return merged


def serial_exact(a: nn.Conv2d, b: nn.Conv2d) -> str | None:
    """None when b(a(x)) is exactly one conv on every pixel; otherwise the reason it is not."""
    for conv in (a, b):
        why = _unsupported(conv)
        if why:
            return why
    if a.out_channels != b.in_channels:
        return f"channels do not chain ({a.out_channels} out, {b.in_channels} in)"
    pb = _pair(b.padding)
    if pb == (0, 0):
        return None
    ka, pa = _pair(a.kernel_size), _pair(a.padding)
    has_bias = a.bias is not None and bool(a.bias.abs().max() > 0)
    if ka == (1, 1) and pa == (0, 0) and not has_bias:
        return None
    if ka == (1, 1) and pa == (0, 0):
        return (f"not exact on the border: the second conv zero-pads the first's output by {pb}, where the "
                "first (a 1x1 with a bias) would give its bias; one merged conv pads the input instead")
    return (f"not exact on the border: the second conv ({_pair(b.kernel_size)} kernel) zero-pads the first's "
            f"output by {pb}, but one merged conv can only zero-pad the input, so outputs near the border "
            "differ in general (exact inside)")


def fold_serial(a: nn.Module, b: nn.Module, x: torch.Tensor | None = None) -> FoldResult:
    """b(a(.)) as one conv if that is exact (else refused with the reason); a and b are Conv2d or
    channels-first StitchLayers. With x (real inputs of a), the difference is measured, and for a
    refused fold shows what merging anyway would cost."""
    ca, cb = as_conv(a), as_conv(b)
    if ca is None or cb is None:
        return FoldResult("serial", [type(a).__name__, type(b).__name__], False,
                          "only convs and channels-first stitching layers merge")
    why = serial_exact(ca, cb)
    merged = compose_serial(ca, cb) if why is None or "border" in why else None
    max_abs, max_rel = _measure(merged, lambda t: cb(ca(t)), x) if merged is not None else (None, None)
    return _certified("serial", [type(a).__name__, type(b).__name__], why, merged, max_abs, max_rel)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor | None = None) -> FoldResult:
    """bn(conv(.)) as one conv (eval statistics; torch's fuse_conv_bn_eval). A BatchNormAct2d's
    activation is not part of the result: keep it after the conv (see ActOnly)."""
    if bn.running_mean is None:
        return FoldResult("conv+bn", ["conv", "bn"], False, "the BN keeps no running statistics")
    conv_eval, bn_eval = copy.deepcopy(conv).eval(), _bn_only(bn)
    with torch.no_grad():
        merged = fuse_conv_bn_eval(conv_eval, bn_eval)
    max_abs, max_rel = _measure(merged, lambda t: bn_eval(conv_eval(t)), x)
    return _certified("conv+bn", ["conv", "bn"], None, merged, max_abs, max_rel)


def _bn_only(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with bn's statistics (a BatchNormAct2d without its activation)."""
    plain = nn.BatchNorm2d(bn.num_features, eps=bn.eps, affine=bn.affine).to(bn.running_mean.device)
    plain.load_state_dict({k: v for k, v in bn.state_dict().items() if k in plain.state_dict()}, strict=False)
    return plain.eval()


def _branch(branch: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor, nn.Conv2d] | str:
    """(weight, bias, geometry conv) of one linear branch, or why it is not one."""
    conv, bn = None, None
    if isinstance(branch, nn.Conv2d):
        conv = branch
    elif isinstance(branch, nn.Sequential) and len(branch) == 2 and isinstance(branch[0], nn.Conv2d) \
            and isinstance(branch[1], nn.BatchNorm2d):
        conv, bn = branch
    elif isinstance(branch, nn.BatchNorm2d):
        bn = branch
    elif not isinstance(branch, nn.Identity):
        return f"{type(branch).__name__} is not a conv, conv+BN, BN or identity"
    if bn is not None and getattr(bn, "act", None) is not None and not isinstance(bn.act, nn.Identity):
        return "a BatchNormAct2d with an activation is not linear"
    if conv is None:  # the identity as a 1x1 conv
        conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    why = _unsupported(conv)
    if why:
        return why
    w, b = conv.weight, _bias(conv)
    if bn is not None:
        w, b = fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return w.detach(), b.detach(), conv


@torch.no_grad()
def fold_parallel(branches: Sequence[nn.Module], x: torch.Tensor | None = None) -> FoldResult:
    """sum(branch(x)) as one conv (RepVGG): each branch a Conv2d, Sequential(Conv2d, BN), a BN
    (identity + BN) or Identity. Smaller kernels are zero-padded to the largest; exact when every
    branch is centred alike (same stride, and padding + (largest k - k) / 2 equal), else refused."""
    names = [type(b).__name__ for b in branches]
    convs = [b if isinstance(b, nn.Conv2d) else b[0] if isinstance(b, nn.Sequential) and len(b) else None
             for b in branches]
    channels = next((c.out_channels for c in convs if c is not None), None)
    if channels is None:
        return FoldResult("parallel", names, False, "no branch is a conv: nothing gives the output width")
    parts = [_branch(b, channels) for b in branches]
    bad = [f"branch {i}: {p}" for i, p in enumerate(parts) if isinstance(p, str)]
    if bad:
        return FoldResult("parallel", names, False, "; ".join(bad))
    k = max(max(_pair(c.kernel_size)) for _, _, c in parts)
    strides = {_pair(c.stride) for _, _, c in parts}
    # a kernel grown by e zeros per side reads the same pixels with padding p + e
    offsets = {tuple(p + (k - kk) / 2 for p, kk in zip(_pair(c.padding), _pair(c.kernel_size))) for _, _, c in parts}
    shapes = {(w.shape[0], w.shape[1]) for w, _, _ in parts}
    if len(strides) > 1 or len(shapes) > 1:
        return FoldResult("parallel", names, False, f"branches disagree on stride {strides} or channels {shapes}")
    if len(offsets) > 1 or any(o != int(o) for off in offsets for o in off):
        return FoldResult("parallel", names, False, "branches are not centred alike (a zero-padded smaller kernel "
                          "would read other pixels): padding + (largest kernel - kernel) / 2 must be equal")
    weight = sum(F.pad(w, [(k - w.shape[3]) // 2] * 2 + [(k - w.shape[2]) // 2] * 2) for w, _, _ in parts)
    merged = nn.Conv2d(weight.shape[1], weight.shape[0], k, stride=next(iter(strides)),
                       padding=tuple(int(o) for o in next(iter(offsets))), bias=True).to(weight.device)
    merged.weight.copy_(weight)
    merged.bias.copy_(sum(b for _, b, _ in parts))
    max_abs, max_rel = _measure(merged, lambda t: sum(b(t) for b in branches), x)
    return _certified("parallel", names, None, merged, max_abs, max_rel)


def _certified(kind: str, where: list[str], why: str | None, merged: nn.Module | None,
               max_abs: float | None, max_rel: float | None, tolerance: float = TOLERANCE) -> FoldResult:
    if why is None and max_rel is not None and max_rel > tolerance:
        why = f"measured relative difference {max_rel:.2g} exceeds the tolerance {tolerance:g}"
    return FoldResult(kind, where, why is None, why or "", max_abs, max_rel, module=merged if why is None else None)


# --- who feeds whom: one traced forward -------------------------------------------------------------

@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: list[torch.Tensor]
    in_versions: list[int]      # the inputs' version counters when the call began
    output: object
    out_version: int | None     # the output's version counter when the call ended


_SEE_THROUGH = (nn.Identity, PassThrough, AnnealedReLU, nn.Dropout, nn.Dropout2d)


class _Graph:
    """Module calls of one forward, in completion order (inner modules first)."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.calls: list[_Call] = []
        self.counts: dict[str, int] = {}
        started: dict[str, list[int]] = {}

        def tensors(args, kwargs) -> list[torch.Tensor]:
            return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]

        def pre(name):
            def begin(module, args, kwargs):
                started[name] = [t._version for t in tensors(args, kwargs)]
            return begin

        def post(name):
            def end(module, args, kwargs, output):
                version = output._version if isinstance(output, torch.Tensor) else None
                self.calls.append(_Call(name, module, tensors(args, kwargs), started.pop(name, []), output, version))
                self.counts[name] = self.counts.get(name, 0) + 1
            return end

        handles = []
        for n, m in model.named_modules():
            handles += [m.register_forward_pre_hook(pre(n), with_kwargs=True),
                        m.register_forward_hook(post(n), with_kwargs=True)]
        try:
            with torch.no_grad():
                model(x)   # the calls keep every tensor alive, so identities stay unambiguous
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def see_through(c: _Call) -> bool:
        # Only known pass-through types count: an in-place ReLU also returns its input object.
        m = c.module
        known = isinstance(m, _SEE_THROUGH) or (isinstance(m, ActOnly) and isinstance(m.act, nn.Identity)
                                               and isinstance(m.drop, _SEE_THROUGH))
        return known and bool(c.inputs) and c.output is c.inputs[0]

    def once(self, c: _Call) -> bool:
        return self.counts[c.name] == 1

    def producer(self, t: torch.Tensor) -> _Call | None:
        """The innermost module call that returned t (None: a function outside modules did)."""
        return next((c for c in self.calls if c.output is t and not self.see_through(c)), None)

    def consumers(self, t: torch.Tensor) -> list[_Call]:
        """Module calls that read t, less Sequentials that only hand it to a reader inside them."""
        readers = [c for c in self.calls if any(i is t for i in c.inputs) and not self.see_through(c)]
        return [c for c in readers if not (isinstance(c.module, nn.Sequential)
                                            and any(o.name.startswith(c.name + ".") for o in readers))]

    def feeds(self, c: _Call, kind) -> _Call | None:
        """The call of type `kind` whose output c alone reads, unchanged (no in-place op between:
        the tensor's version counter is the same): the first half of a linear pair ending in c."""
        if not (c.inputs and self.once(c)):
            return None
        t = c.inputs[0]
        p = self.producer(t)
        if p is None or not kind(p.module) or not self.once(p) or p.out_version != c.in_versions[0]:
            return None
        return p if [r.name for r in self.consumers(t)] == [c.name] else None


def _describe(c: _Call | None) -> str:
    return "a function outside any module" if c is None else f"{c.name or 'the model'} ({type(c.module).__name__})"


# --- applying folds to a model, each certified -------------------------------------------------------

def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = owner._modules[attr]
    owner._modules[attr] = module
    return old


def _conv_edit(name: str, conv: nn.Conv2d) -> dict:
    return {"module": name, "type": "conv2d", "in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(_pair(conv.kernel_size)), "stride": list(_pair(conv.stride)),
            "padding": list(_pair(conv.padding)), "groups": conv.groups, "dilation": list(_pair(conv.dilation)),
            "bias": conv.bias is not None}


def _edit(name: str, module: nn.Module) -> dict:
    if isinstance(module, nn.Conv2d):
        return _conv_edit(name, module)
    if isinstance(module, PassThrough):
        return {"module": name, "type": "pass"}
    if isinstance(module, ActOnly):
        return {"module": name, "type": "act_only"}
    raise FoldError(f"{type(module).__name__} cannot be recorded as a fold (conv, pass or act_only)")


def apply_fold(model: nn.Module, replacements: dict[str, nn.Module], inputs: torch.Tensor, kind: str = "custom",
               tolerance: float = TOLERANCE, reference: torch.Tensor | None = None) -> FoldResult:
    """Replace modules by name, measure the model's outputs on `inputs` against before (or
    `reference`), and revert if the relative difference exceeds `tolerance`. The certificate does
    not trust the fold: a wrong one is measured and undone."""
    if reference is None:
        reference = _outputs(model, inputs)
    old = {n: _set(model, n, m) for n, m in replacements.items()}
    try:
        out = _outputs(model, inputs)
        max_abs, max_rel = _difference(reference, out)
    except Exception as e:  # a fold that breaks the forward (shapes) is refused like a wrong one
        max_abs = max_rel = float("inf")
        error = f"the folded model fails: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    else:
        error = None
    where = list(replacements)
    if error or max_rel > tolerance:
        for n, m in old.items():
            _set(model, n, m)
        reason = error or f"measured relative difference {max_rel:.2g} exceeds the tolerance {tolerance:g}: reverted"
        return FoldResult(kind, where, False, reason, max_abs, max_rel)
    return FoldResult(kind, where, True, "", max_abs, max_rel, edits=[_edit(n, m) for n, m in replacements.items()])


def _reparameterize(model: nn.Module, inputs: torch.Tensor, tolerance: float,
                    reference: torch.Tensor) -> tuple[nn.Module, FoldResult | None]:
    """timm's reparameterize_model (RepVGG, MobileOne, FastViT...) on a copy, certified."""
    from timm.utils.model import reparameterize_model
    names = [n for n, m in model.named_modules()
             if n and any(hasattr(m, a) for a in ("fuse", "reparameterize", "switch_to_deploy"))]
    if not names:
        return model, None
    try:
        folded = reparameterize_model(model).eval()
        max_abs, max_rel = _difference(reference, _outputs(folded, inputs))
    except Exception as e:  # a family's own reparameterize can fail in many ways: refuse, keep going
        return model, FoldResult("reparameterize", names, False, f"timm's reparameterize_model failed: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if max_rel > tolerance:
        return model, FoldResult("reparameterize", names, False, f"measured relative difference {max_rel:.2g} "
                                 f"exceeds the tolerance {tolerance:g}: not applied", max_abs, max_rel)
    return folded, FoldResult("reparameterize", names, True, "", max_abs, max_rel,
                              edits=[{"type": "reparameterize"}])


def _conv_bn_pairs(graph: _Graph) -> list[tuple[_Call, _Call]]:
    pairs = []
    for c in graph.calls:
        if isinstance(c.module, nn.BatchNorm2d) and c.module.running_mean is not None:
            p = graph.feeds(c, lambda m: isinstance(m, nn.Conv2d))
            if p is not None:
                pairs.append((p, c))
    return pairs


def _conv_bn_replacements(conv: _Call, bn: _Call) -> dict[str, nn.Module]:
    with torch.no_grad():   # fuse_conv_bn_eval reads only the BN's statistics and affine: BatchNormAct2d too
        fused = fuse_conv_bn_eval(conv.module, bn.module)
    m = bn.module
    rest = ActOnly(m.drop, m.act) if hasattr(m, "act") and hasattr(m, "drop") else PassThrough()
    return {conv.name: fused, bn.name: rest}


def _cost_delta(old: list[nn.Module], new: list[nn.Module], input_shape: torch.Size) -> dict:
    """Change of cost when the modules `old` (run in this order) become `new`: costs add up over
    modules, so the folds' deltas sum to the whole model's change."""
    before = model_cost(nn.Sequential(*old), tuple(input_shape[1:]))
    after = model_cost(nn.Sequential(*new), tuple(input_shape[1:]))
    return {k: getattr(after, k) - getattr(before, k) for k in ("macs", "params", "activations")}


def _serial_candidates(graph: _Graph) -> list[tuple[_Call, _Call]]:
    """(a, b): b is conv-like and reads, alone and unchanged, what conv-like a produced."""
    out = []
    for c in graph.calls:
        if as_conv_type(c.module):
            p = graph.feeds(c, as_conv_type)
            if p is not None:
                out.append((p, c))
    return out


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    return conv.weight.numel() * out.shape[-1] * out.shape[-2]   # per image, bias adds aside


def as_conv_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or (isinstance(module, StitchLayer) and module.in_layout == module.out_layout == "nchw")


def _serial_replacements(a: _Call, b: _Call, merged: nn.Conv2d) -> dict[str, nn.Module]:
    # the merged conv takes the place of the one that is a real conv (a StitchLayer's callers pass
    # an output shape a Conv2d would not accept); the other becomes a pass-through
    if isinstance(a.module, StitchLayer):
        return {a.name: PassThrough(), b.name: merged}
    return {a.name: merged, b.name: PassThrough()}


def _stitch_refusal(graph: _Graph, c: _Call) -> str:
    """Why a stitching layer that no serial fold took cannot fold, from what feeds and reads it."""
    if not as_conv_type(c.module):
        return ("a stitching layer on tokens / channels-last maps is a Linear between blocks whose residual "
                "streams read it again: nothing linear to fold into")
    t_in = c.inputs[0]
    p, readers_in = graph.producer(t_in), graph.consumers(t_in)
    t_out = c.output
    readers = graph.consumers(t_out) if isinstance(t_out, torch.Tensor) else []
    if p is not None and isinstance(p.module, nn.Conv2d) and len(readers_in) > 1:
        before = (f"its input comes from {_describe(p)}, whose output is also read by "
                  f"{', '.join(_describe(r) for r in readers_in if r.name != c.name)}")
    else:
        before = (f"its input is the output of {_describe(p)}, not of a conv: something non-linear sits between "
                  "the last conv and the stitch (in a ResNet block, the ReLU after the residual sum)")
    if not readers:
        after = "its output is read by a function outside any module, not by a conv"
    else:
        after = (f"its output is read by {', '.join(_describe(r) for r in readers)}: not by one conv alone "
                 "(a residual block reads its input in its first conv and again in its shortcut)")
    return f"{before}; {after}"


@torch.no_grad()
def fold_model(model: nn.Module, inputs: torch.Tensor, tolerance: float = TOLERANCE,
               check_images: int = CHECK_IMAGES, latency: bool = True,
               events: Callable[[dict], None] | None = None) -> tuple[nn.Module, Certificate]:
    """Fold a copy of `model` (eval mode) and certify it on `inputs`, a batch of real images.

    Order: timm's reparameterize_model where it applies, conv+BN pairs, then serial conv chains
    (stitching layers included) until none is left. Each fold is measured on the first
    `check_images` inputs against the model before it and reverted beyond `tolerance`; the whole
    model is then compared with the original on all inputs. `events` gets {"type": "fold", ...}
    after each fold and {"type": "latency"} before the latency runs."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or len(inputs) == 0:
        raise FoldError("inputs must be a non-empty batch of images (N, C, H, W)")
    if not 0 < tolerance < 1:
        raise FoldError(f"tolerance must be in (0, 1), got {tolerance}")
    original = model
    was_training = original.training
    original.eval()
    try:
        reference_all = _outputs(original, inputs)
        model = copy.deepcopy(original).eval()
        check = inputs[:check_images]
        reference = reference_all[:check_images]
        input_size = tuple(inputs.shape[1:])
        cost_before = model_cost(model, input_size)
        folds: list[FoldResult] = []

        def record(result: FoldResult, old: list[_Call] | None = None, input_shape=None) -> None:
            nonlocal reference
            if result.exact:
                if old is not None:
                    new = [model.get_submodule(c.name) for c in old]
                    result.cost_delta = _cost_delta([c.module for c in old], new, input_shape)
                reference = _outputs(model, check)   # the next fold is measured against this one
            folds.append(result)
            if events:
                events({"type": "fold", "done": len(folds), "fold": result.to_dict()})

        model, result = _reparameterize(model, check, tolerance, reference)
        if result is not None:
            if result.exact:
                after = model_cost(model, input_size)
                result.cost_delta = {k: getattr(after, k) - getattr(cost_before, k) for k in ("macs", "params", "activations")}
            record(result)

        for conv, bn in _conv_bn_pairs(_Graph(model, check[:1])):
            record(apply_fold(model, _conv_bn_replacements(conv, bn), check, "conv+bn", tolerance, reference),
                   [conv, bn], conv.inputs[0].shape)

        refused: set[tuple[str, str]] = set()
        while True:
            graph = _Graph(model, check[:1])
            todo = [(a, b) for a, b in _serial_candidates(graph) if (a.name, b.name) not in refused]
            if not todo:
                break
            a, b = todo[0]
            kind = "stitch" if isinstance(a.module, StitchLayer) or isinstance(b.module, StitchLayer) else "serial"
            ca, cb = as_conv(a.module), as_conv(b.module)
            why = serial_exact(ca, cb)
            merged = compose_serial(ca, cb) if why is None else None
            if merged is not None:
                before, after = _conv_macs(ca, a.output) + _conv_macs(cb, b.output), _conv_macs(merged, b.output)
                if after > before:   # e.g. a linear bottleneck: exact, but one wide conv costs more
                    why = f"exact, but not cheaper: the merged conv has {after:,} MACs, the two {before:,}"
            if why is None:
                result = apply_fold(model, _serial_replacements(a, b, merged), check, kind, tolerance, reference)
            else:
                result = FoldResult(kind, [a.name, b.name], False, why)
            if not result.exact:
                refused.add((a.name, b.name))
            record(result, [a, b], a.inputs[0].shape)

        graph = _Graph(model, check[:1])
        explained = {n for pair in refused for n in pair}
        for c in graph.calls:
            if isinstance(c.module, StitchLayer) and c.name not in explained:
                record(FoldResult("stitch", [c.name], False, _stitch_refusal(graph, c)))

        max_abs, max_rel = _difference(reference_all, _outputs(model, inputs))
        cert = Certificate(folds, len(inputs), max_abs, max_rel, tolerance, cost_before, model_cost(model, input_size))
        if latency:
            if events:
                events({"type": "latency"})
            cert.latency_before_ms, cert.latency_after_ms = interleaved_latency(original, model, inputs[:1])
    finally:
        original.train(was_training)
    return model, cert


# --- saving and rebuilding ---------------------------------------------------------------------------

def _replay(model: nn.Module, folds: list[dict]) -> nn.Module:
    """Redo the folds' structure on a freshly built source model (weights come from the file)."""
    for fold in folds:
        for e in fold["edits"]:
            kind = e["type"]
            if kind == "reparameterize":
                from timm.utils.model import reparameterize_model
                model = reparameterize_model(model, inplace=True)
            elif kind == "pass":
                _set(model, e["module"], PassThrough())
            elif kind == "act_only":
                bn = model.get_submodule(e["module"])
                _set(model, e["module"], ActOnly(bn.drop, bn.act))
            elif kind == "conv2d":
                args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in e.items() if k not in ("module", "type")}
                _set(model, e["module"], nn.Conv2d(**args))
            else:
                raise FoldError(f"unknown fold edit '{kind}'")
    return model


def save_folded(out_dir, model: nn.Module, cert: Certificate, source: dict) -> Path:
    """Write DIR/model.safetensors, config.json (the source and the applied folds: enough for
    `load_folded` to rebuild) and certificate.json. `source` is {"kind": "anchor", "entry": ...}
    (an export anchor entry) or {"kind": "stitch", "folder": relative path to an exported stitch}."""
    out = Path(out_dir).expanduser()
    config = {"format": FORMAT, "version": 1, "source": source,
              "folds": [{"kind": f.kind, "where": f.where, "edits": f.edits} for f in cert.applied],
              "max_abs": cert.max_abs, "max_rel": cert.max_rel, "cost": cert.cost_after.to_dict()}
    save_safetensors_atomic(out / "model.safetensors", model.state_dict())
    write_json_atomic(out / "config.json", config)
    write_json_atomic(out / "certificate.json", cert.to_dict())
    return out


def load_folded(path) -> nn.Module:
    """The model written by `save_folded`, rebuilt from its source and folds, in eval mode."""
    from safetensors.torch import load_file

    from composer.export import ExportError, build_anchor, load_stitched
    path = Path(path).expanduser()
    config = read_config(path, FORMAT, FoldError, "a folded model")
    source = config["source"]
    try:
        if source["kind"] == "anchor":
            model = build_anchor(source["entry"])
        elif source["kind"] == "stitch":
            model = load_stitched(path / source["folder"])
        else:
            raise FoldError(f"{path}: unknown source kind {source['kind']!r}")
    except ExportError as e:
        raise FoldError(f"{path}: the source cannot be rebuilt ({e})") from None
    model = _replay(model.eval(), config["folds"])
    try:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    except (OSError, RuntimeError) as e:
        raise FoldError(f"{path}: weights do not load ({str(e).splitlines()[0]})") from None
    return model.eval()


# --- a run's anchor or stitch, folded onto the curve -------------------------------------------------

@dataclass
class FoldReport:
    out: Path
    certificate: Certificate
    candidate: Candidate


def fold_run(run_dir, data: str, out_dir, anchor: int | None = None, stitch: int | None = None,
             images: int = 64, limit: int | None = None, tolerance: float = TOLERANCE, latency: bool = True,
             batch_size: int = 64, seed: int = 0, workers: int = 0,
             events: Callable[[dict], None] | None = None, device: torch.device | str = "cpu",
             precision: str = "fp32") -> FoldReport:
    """Fold anchor `anchor` (or stitch `stitch`) of a run (composer.builders.source); certify it on
    `images` real images of `data`; write OUT (see save_folded; a stitch is also exported to
    OUT/source, which `load_folded` rebuilds it from); measure top-1 of source and folded model on
    `limit` images (all by default); add a "fold" candidate to the run. `events` gets the
    fold_model events, then {"type": "evaluate", "images": n}. device: where the models run (the
    certificate and the latency too); precision: the top-1's forward passes (autocast), while every
    fold is certified in float32 (a fold exact in fp32 is not measurably so in bf16)."""
    from composer.device import autocast
    from composer import data as data_mod
    from composer.export import export_stitch
    from composer.run import check_writable

    images = checks.whole(images, "certificate images", 1, 100_000)
    limit = None if limit is None else checks.whole(limit, "evaluation images", 1, None)
    tolerance = checks.number(tolerance, "the tolerance", above=0, hi=1)
    batch_size = checks.whole(batch_size, "batch size", 1, 100_000)
    src = resolve_source(run_dir, anchor, stitch)
    out = check_writable(Path(out_dir))
    model = src.module
    if anchor is not None:
        source = {"kind": "anchor", "entry": src.entry}
        label, name = src.spec, f"{Path(src.spec.split(':', 1)[-1]).name} folded"
    else:
        # the route is folded; its export is what `load_folded` rebuilds the structure from
        export_stitch(src.run_dir, stitch, out / "source")
        source = {"kind": "stitch", "folder": "source", "stitch": stitch}
        label, name = f"stitch {stitch}", f"stitch {stitch} folded"
    ds = data_mod.open_dataset(data, src.data_config, split="validation")
    inputs = torch.cat([x for x, _ in data_mod.loader(data_mod.subset(ds, images, seed), batch_size, workers=workers)])
    device = torch.device(device)
    model.to(device)
    folded, cert = fold_model(model, inputs.to(device), tolerance, latency=latency, events=events)
    if not cert.applied:   # the same network again: no new point for the curve
        why = "; ".join(f"{f.kind} {' + '.join(f.where)}: {f.reason}" for f in cert.refused[:3])
        raise FoldError(f"nothing folds in {label}: " + (f"every fold was refused ({why})" if why else
                        "it has no conv+BN, linear branches or stitching layers to merge (LayerNorm, attention "
                        "and GELU do not fold); no candidate added"))
    save_folded(out, folded, cert, source)

    eval_ds = data_mod.subset(ds, limit, seed)
    with autocast(precision, device):
        (p_source, p_folded), labels = predictions(
            [model, folded], data_mod.loader(eval_ds, batch_size, workers=workers),
            progress=(lambda n: events({"type": "evaluate", "images": n})) if events else None)
    candidate = Candidate(
        "fold", name, label, cert.cost_after.macs, cert.cost_after.params, cert.cost_after.activations,
        accuracy(p_folded, labels), "measured", cert.latency_after_ms,
        {"folder": str(out), "folds": len(cert.applied), "refused": len(cert.refused), "max_abs": cert.max_abs,
         "max_rel": cert.max_rel, "images": len(labels), "data": data, "source_top1": accuracy(p_source, labels),
         "changed_predictions": int((p_source != p_folded).sum()), "latency_before_ms": cert.latency_before_ms})
    add_candidates(src.run_dir, [candidate])
    return FoldReport(out, cert, candidate)


def build_fold(run_dir, *, anchor: int | None = None, stitch: int | None = None, events=None, cancel=None,
               data: str, out=None, **options) -> BuildResult:
    """composer.builders.build("fold", ...): `fold_run` on an anchor or a stitch of a run, written to
    `out` (default RUN/folded/anchorI or RUN/folded/stitchID). Folding is short: `cancel` is not read."""
    if out is None:
        out = Path(run_dir) / "folded" / (f"anchor{anchor}" if stitch is None else f"stitch{stitch}")
    r = fold_run(run_dir, data, out, anchor=anchor, stitch=stitch, events=events, **options)
    return BuildResult("fold", [r.candidate], f"fold: {r.candidate.name} added to the curve", r)
