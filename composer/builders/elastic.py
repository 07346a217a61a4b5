"""Once-for-All on one pretrained anchor: many static sub-networks, an accuracy predictor fitted
on a few measured ones, and an evolutionary search under a MACs / activations / latency budget.

The pieces, in the order `search_elastic` runs them:
1. `prepare_anchor`: a copy of the anchor with every width sorted by importance (composer.builders.subnet),
   so that "keep a fraction" keeps the most important units. Outputs are unchanged.
2. An architecture (`Arch`) is a depth per stage (OFA: keep the first D blocks) and a kept fraction
   per width, from `WIDTH_CHOICES`; `sample_archs` draws them spread evenly over MACs.
3. `evaluate_subnets`: top-1 of extracted sub-networks, each after re-estimating its BatchNorm
   statistics on calibration images (OFA does the same: shrinking a network shifts what every BN
   layer sees). Measured on the CIFAR ResNet-56, 300 images: 7/7/7 blocks 35.7 % without, 68.7 %
   with (1024 images); all blocks at 0.75 width 70.0 % -> 75.0 %.
4. `fit_predictor` (ridge with leave-one-out regularisation, or OFA's small MLP) on an
   architecture encoding; `cv_rank_correlation` reports its Spearman correlation on measured
   architectures it was not fitted on (k-fold, out-of-fold predictions).
5. `latency_table` (optional): each block's batch-1 latency per width choice, measured on this
   device; a sub-network's latency is predicted as the sum of its blocks plus the rest.
6. `evolutionary_search`: mutation + crossover, keeping the predicted-best under the budget;
   the few predicted-best are measured and the best measured is kept.
7. The chosen sub-networks are measured and become Candidates (method "elastic", status
   "measured") whose `config` rebuilds them; `export_subnet` writes one as a model folder.

`build_elastic` is the whole builder on an anchor or a stitch of a run (composer.builders.source),
as `python -m composer elastic` and the app run it: progressive shrinking first if asked, budgets,
a latency table for latency budgets, the images, the search, the candidates added to the run.

Costs are exact (`subnet_cost`, MACs with 1 multiply-add = 1), never estimated.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from composer import checks
from composer.candidates import Candidate
from composer.costs import Cost, measure_latency
from composer.errors import UserError
from composer.evaluate import top1
from composer.io import read_config, save_safetensors_atomic, write_json_atomic
from composer.builders.source import BuildResult, Source, SourceError, resolve_source, source_of, weights_digest
from composer.builders.subnet import ElasticSpace, SubnetConfig, SubnetError, elastic_space, extract, sort_by_importance_, \
    subnet_cost

WIDTH_CHOICES = (0.25, 0.5, 0.75, 1.0)
FORMAT = "zoo-composer-subnet"
METRICS = ("macs", "activations", "latency")

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]


class ElasticError(UserError):
    """An elastic search or export that cannot run as asked; the message says why."""


# --- the anchor and its architectures -----------------------------------------------------------------

@dataclass
class ElasticAnchor:
    model: nn.Module        # importance-sorted copy of the anchor, eval mode
    space: ElasticSpace
    spec: str               # the anchor's spec (timm name, local-dir:, hf-hub:)
    index: int | None = None   # its index in a run, if it came from one
    entry: dict = field(default_factory=dict, repr=False)   # what rebuilds the architecture (composer.export)
    finetuned: str | None = None   # digest of the progressive-shrinking weights it runs (composer.builders.progressive)
    stitch: int | None = None      # the stitch of a run it is (then `model` is that stitch's route, and
                                   # `entry` composer.export's description of it), None for an anchor
    weights: str | None = None     # from a run: digest of the weights it is measured with (weights_digest): the
                                   # run's (unsorted), or an anchor's progressive-shrinking weights when it runs them

    @property
    def short_name(self) -> str:
        if self.stitch is not None:
            return f"stitch {self.stitch}"
        return self.entry.get("architecture") or Path(self.spec.split(":")[-1]).name


def prepare_anchor(model: nn.Module, spec: str = "", index: int | None = None,
                   input_size: tuple[int, ...] | None = None, model_args: dict | None = None) -> ElasticAnchor:
    """Sort a copy of `model` by importance; the original is left as it is. `model_args`: the
    timm.create_model keyword arguments the model was built with (timm does not record them;
    needed to rebuild an export of a model that is not a plain timm name or a model folder)."""
    import copy

    from composer.export import anchor_entry
    model = copy.deepcopy(model).eval()
    space = elastic_space(model, input_size)
    sort_by_importance_(model, space)
    entry = anchor_entry(index or 0, spec, model)
    entry["model_args"] = {**entry["model_args"], **(model_args or {})}
    return ElasticAnchor(model, space, spec, index, entry)


def prepare_stitch(net, stitch_id: int) -> ElasticAnchor:
    """Stitch `stitch_id` of an SN-Net as an elastic base: its route as a standalone module
    (composer.builders.source, what `export --stitch` writes), every width sorted by importance.
    Its blocks are those of its anchors, in route order; stages and the stitching layers are as in
    composer.builders.subnet (a stitching layer maps the residual stream, which is never cut)."""
    try:
        source = source_of(net, stitch=stitch_id)
    except SourceError as e:
        raise ElasticError(str(e)) from None
    return from_source(source)


def from_source(source: Source, progressive: bool = True) -> ElasticAnchor:
    """An anchor or a stitch of a run (composer.builders.source) as an elastic base, every width
    sorted by importance. A stitch's route is sorted in place (it is the source's own copy); an
    anchor is copied first, and with `progressive` it runs the progressive-shrinking weights the run
    keeps for it (composer.builders.progressive), if any. `weights` is the digest of what it runs."""
    weights = source.weights   # before sorting: the run's weights, whatever the sort does
    if source.stitch is not None:
        space = elastic_space(source.module, source.input_size)   # the size the plan was costed at
        sort_by_importance_(source.module, space)
        return ElasticAnchor(source.module, space, source.spec, None, dict(source.entry), stitch=source.stitch,
                             weights=weights)
    anchor = prepare_anchor(source.module, source.spec, source.anchor)
    anchor.weights = weights
    path = finetuned_path(source.run_dir, source.anchor) if source.run_dir is not None else None
    if progressive and path is not None and path.is_file():
        import hashlib
        raw = path.read_bytes()
        try:
            anchor.model.load_state_dict(load_file(str(path)))
        except Exception as e:   # a corrupt or foreign file: say which, never guess
            raise ElasticError(f"{path} does not load into anchor {source.anchor} ({str(e).splitlines()[0][:200]}); "
                               "delete it or run progressive shrinking again") from None
        anchor.finetuned = hashlib.sha256(raw).hexdigest()[:16]
        anchor.weights = weights_digest(anchor.model)
    return anchor


def stitch_of_run(run_dir, stitch_id: int) -> ElasticAnchor:
    """Stitch `stitch_id` of a run (its fitted or fine-tuned weights) as an elastic base."""
    return from_source(_resolve(run_dir, stitch=stitch_id))


def finetuned_path(run_dir, index: int) -> Path:
    """Where composer.builders.progressive saves anchor `index` of a run after progressive shrinking."""
    return Path(run_dir) / "elastic" / f"anchor{index}.safetensors"


def anchor_of_run(run_dir, index: int, progressive: bool = True) -> ElasticAnchor:
    """Anchor `index` of a run (with the run's fine-tuned weights if it was trained), with its
    progressive-shrinking weights when the run has them and `progressive` (composer.builders.progressive)."""
    return from_source(_resolve(run_dir, anchor=index), progressive)


def _resolve(run_dir, anchor: int | None = None, stitch: int | None = None) -> Source:
    try:
        return resolve_source(run_dir, anchor, stitch)
    except SourceError as e:
        raise ElasticError(str(e)) from None


def kept_units(size: int, fraction: float) -> int:
    """Units kept of `size` for a fraction (rounded half up, at least one)."""
    return max(1, min(size, int(math.floor(size * fraction + 0.5))))


@dataclass(frozen=True)
class Arch:
    """One point of the search space: blocks kept per stage, kept fraction per width."""
    depth: tuple[int, ...]
    width: tuple[float, ...]    # one per ElasticSpace.dims(), in that order

    def config(self, space: ElasticSpace) -> SubnetConfig:
        widths = {}
        for d, f in zip(space.dims(), self.width):
            k = kept_units(d.size, f)
            if k < d.size:
                widths[d.key] = k
        return SubnetConfig(list(self.depth), widths)

    def label(self) -> str:
        """Short and unique: depths, mean kept fraction, and a digest of the widths."""
        import hashlib
        digest = hashlib.sha1(repr(self.width).encode()).hexdigest()[:6]
        mean = sum(self.width) / max(1, len(self.width))
        return f"d={','.join(map(str, self.depth))} w~{mean:.2f} #{digest}"

    def to_dict(self) -> dict:
        return {"depth": list(self.depth), "width": list(self.width)}


def largest_arch(space: ElasticSpace) -> Arch:
    return Arch(tuple(space.full_config().depth), (1.0,) * len(space.dims()))


def smallest_arch(space: ElasticSpace, choices: Sequence[float] = WIDTH_CHOICES) -> Arch:
    return Arch((1,) * space.num_stages, (min(choices),) * len(space.dims()))


def _random_arch(space: ElasticSpace, rnd: random.Random, choices: Sequence[float]) -> Arch:
    return Arch(tuple(rnd.randint(1, len(space.stage_blocks(s))) for s in range(space.num_stages)),
                tuple(rnd.choice(choices) for _ in space.dims()))


def sample_archs(space: ElasticSpace, n: int, seed: int = 0, choices: Sequence[float] = WIDTH_CHOICES,
                 include_extremes: bool = True, pool: int = 30) -> list[Arch]:
    """`n` distinct architectures spread evenly over MACs: drawn from a pool of `pool * n`, each the
    largest with every gene redrawn with a probability itself uniform in [0, 1] (uniform draws alone
    cluster in the middle of the MACs range and almost never come near the full network), then one
    per equal-width MACs bin. With include_extremes the largest and smallest come first."""
    rnd = random.Random(seed)
    top = largest_arch(space)
    archs = [top, smallest_arch(space, choices)][:n] if include_extremes else []
    seen = set(archs)
    candidates = {}
    for _ in range(pool * n):
        p, r = rnd.random(), _random_arch(space, rnd, choices)
        a = Arch(tuple(x if rnd.random() < p else t for x, t in zip(r.depth, top.depth)),
                 tuple(x if rnd.random() < p else t for x, t in zip(r.width, top.width)))
        if a not in seen:
            candidates[a] = arch_cost(space, a).macs
    k = n - len(archs)
    if k <= 0 or not candidates:
        return archs
    lo, hi = min(candidates.values()), max(candidates.values())
    bins: list[list[Arch]] = [[] for _ in range(k)]
    for a, macs in candidates.items():
        bins[min(k - 1, int(k * (macs - lo) / max(1, hi - lo)))].append(a)
    left = [a for b in bins for a in b]
    for b in bins:   # one per bin; an empty bin (a gap in MACs) lends its turn to a random draw
        pick = rnd.choice(b) if b else rnd.choice(left)
        while pick in seen:
            pick = rnd.choice(left)
        seen.add(pick)
        archs.append(pick)
    return archs


def arch_cost(space: ElasticSpace, arch: Arch) -> Cost:
    return subnet_cost(space, arch.config(space))


def encode(space: ElasticSpace, archs: Sequence[Arch]) -> torch.Tensor:
    """Predictor input per architecture: per block whether it runs and the kept fraction of each of
    its widths (0 when dropped), each stage's kept depth fraction, and the MACs fraction."""
    full = subnet_cost(space, space.full_config()).macs
    rows = []
    for a in archs:
        kept = space.kept_blocks(a.config(space))
        frac = dict(zip((d.key for d in space.dims()), a.width))
        row = []
        for b, blk in enumerate(space.blocks):
            row.append(float(kept[b]))
            row += [frac[d.key] * kept[b] for d in blk.widths]
        row += [d / len(space.stage_blocks(s)) for s, d in enumerate(a.depth)]
        row.append(arch_cost(space, a).macs / full)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


# --- measuring ---------------------------------------------------------------------------------------

@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on `images` (a plain average over them)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # cumulative average instead of an exponential one
    model.train()
    device = next(model.parameters()).device
    try:
        for x in images:
            model(x.to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


def build_subnet(anchor: ElasticAnchor, config: SubnetConfig, bn_images: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """The static sub-network, its BatchNorm statistics re-estimated when images are given."""
    sub = extract(anchor.model, anchor.space, config)
    if bn_images:
        recalibrate_bn(sub, bn_images)
    return sub.eval()


def evaluate_subnets(anchor: ElasticAnchor, configs: Sequence[SubnetConfig], batches: Batches,
                     bn_images: Sequence[torch.Tensor] | None = None, progress: Progress | None = None,
                     precision: str = "fp32") -> list[float]:
    """Top-1 (%) of each extracted sub-network on `batches` (measured, one by one), on the anchor's
    device, forward passes under `precision`'s autocast."""
    from composer.device import autocast
    device = next(anchor.model.parameters()).device
    out = []
    for i, c in enumerate(configs):
        with autocast(precision, device):
            out.append(top1(build_subnet(anchor, c, bn_images), batches))
        if progress is not None:
            progress(i + 1, len(configs))
    return out


def image_batches(spec: str, model: nn.Module, limit: int | None, seed: int = 0, batch_size: int = 64,
                  bn_images: int = 0, split: str = "train", workers: int = 0
                  ) -> tuple[list[torch.Tensor] | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Images of a data spec, preprocessed for `model`, decoded once and kept as tensors (every
    sub-network sees the same ones): up to `bn_images` for BatchNorm statistics (at most half of the
    set; None when 0) and then `limit` labelled ones to measure on, disjoint, from one seeded shuffle."""
    from torch.utils.data import Subset

    from composer import data
    ds = data.open_dataset(spec, data.data_config(model), split=split)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    n_bn = min(bn_images, len(ds) // 2)
    bn = [x for x, _ in data.loader(Subset(ds, sorted(perm[:n_bn])), batch_size, workers=workers)] if n_bn else None
    picked = perm[n_bn:n_bn + limit] if limit is not None else perm[n_bn:]
    if limit == 0:   # only the BatchNorm images were asked for
        return bn, []
    return bn, list(data.loader(Subset(ds, sorted(picked)), batch_size, workers=workers))


def _count(images: Sequence[torch.Tensor] | None) -> int:
    return sum(len(x) for x in images or [])


# --- the accuracy predictor ---------------------------------------------------------------------------

def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties sharing their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, ranks)
    return (sums / torch.bincount(inv).double())[inv]


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan if either is constant."""
    ra, rb = _ranks(torch.as_tensor(a)), _ranks(torch.as_tensor(b))
    if len(ra) != len(rb) or len(ra) < 2:
        raise ElasticError("rank correlation needs two equally long sequences of at least 2 values")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


@dataclass
class Predictor:
    """Predicted top-1 (%) from `encode` rows: standardise, then ridge or MLP."""
    kind: str
    mean: torch.Tensor
    std: torch.Tensor
    y_mean: float
    y_std: float
    weights: torch.Tensor | None = None    # ridge
    mlp: nn.Module | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.mean) / self.std
        y = z @ self.weights if self.kind == "ridge" else self.mlp(z.float()).squeeze(-1).double()
        return y * self.y_std + self.y_mean


RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def fit_predictor(x: torch.Tensor, y: Sequence[float], kind: str = "ridge", seed: int = 0) -> Predictor:
    """Fit a predictor of top-1 on measured architectures. Ridge picks its strength by exact
    leave-one-out error (closed form); "mlp" is OFA's 3-layer MLP, trained full-batch with Adam."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if len(y) < 3:
        raise ElasticError(f"a predictor needs at least 3 measured sub-networks, got {len(y)}")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    y_mean, y_std = float(y.mean()), float(y.std().clamp_min(1e-8))
    z, t = (x - mean) / std, (y - y_mean) / y_std
    if kind == "ridge":
        best = None
        for alpha in RIDGE_ALPHAS:
            inv = torch.linalg.inv(z.T @ z + alpha * torch.eye(z.shape[1], dtype=torch.float64))
            w = inv @ z.T @ t
            hat = ((z @ inv) * z).sum(1)                      # diagonal of the hat matrix
            loo = (((t - z @ w) / (1 - hat)).square()).mean()  # leave-one-out residuals, exactly
            if best is None or loo < best[0]:
                best = (loo, w)
        return Predictor("ridge", mean, std, y_mean, y_std, weights=best[1])
    if kind == "mlp":
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
            mlp = nn.Sequential(nn.Linear(z.shape[1], 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-4)
        zf, tf = z.float(), t.float()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # tiny matrices: more threads only spin (40x the CPU time on a busy machine)
        try:
            for _ in range(500):
                opt.zero_grad()
                loss = (mlp(zf).squeeze(-1) - tf).square().mean()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        return Predictor("mlp", mean, std, y_mean, y_std, mlp=mlp.eval())
    raise ElasticError(f"unknown predictor '{kind}' (ridge or mlp)")


def cv_rank_correlation(x: torch.Tensor, y: Sequence[float], kind: str = "ridge", folds: int = 5,
                        seed: int = 0) -> float:
    """Spearman correlation between measured top-1 and out-of-fold predictions: every measured
    architecture is predicted by a predictor fitted without it (k-fold, seeded). Uses all the
    measurements, so it is far steadier than one small held-out share."""
    n = len(y)
    folds = min(folds, n)
    if n - -(-n // folds) < 3 or folds < 2:
        raise ElasticError(f"{n} measured sub-networks are too few to cross-validate a predictor (need at least 5)")
    y = torch.as_tensor(y, dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pred = torch.empty(n, dtype=torch.float64)
    for f in range(folds):
        test = perm[f::folds]
        train = torch.cat([perm[g::folds] for g in range(folds) if g != f])
        pred[test] = fit_predictor(x[train], y[train], kind, seed)(x[test])
    return spearman(pred, y)


# --- latency lookup table -----------------------------------------------------------------------------

@dataclass
class LatencyTable:
    """Batch-1 latency (ms) of each block per choice of its widths' fractions, on one device."""
    device: str
    choices: tuple[float, ...]
    rest_ms: float                  # stem, head and anything outside the blocks
    blocks: dict[str, float]        # f"{block}:{f1},{f2}" -> ms

    @staticmethod
    def key(block: int, fractions: Sequence[float]) -> str:
        return f"{block}:{','.join(f'{f:g}' for f in fractions)}"

    def predict(self, space: ElasticSpace, arch: Arch) -> float:
        kept = space.kept_blocks(arch.config(space))
        frac = dict(zip((d.key for d in space.dims()), arch.width))
        total = self.rest_ms
        for b, blk in enumerate(space.blocks):
            if kept[b]:
                fr = [frac[d.key] for d in blk.widths]
                if any(f not in self.choices for f in fr):
                    raise ElasticError(f"the latency table was measured for widths {self.choices}, not {fr}")
                total += self.blocks[self.key(b, fr)]
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def latency_table(anchor: ElasticAnchor, choices: Sequence[float] = WIDTH_CHOICES, device: str | torch.device = "cpu",
                  repeats: int = 10, progress: Progress | None = None) -> LatencyTable:
    """Measure every block at every combination of its widths' choices (one extraction of the whole
    model per combination, all blocks measured in it), and the stem and head (the anchor's block
    adapter runs them alone), batch 1, on `device`."""
    import itertools

    space = anchor.space
    n_dims = max(len(b.widths) for b in space.blocks)
    combos = list(itertools.product(choices, repeat=n_dims))
    x = torch.zeros(1, *space.input_size, device=device)
    measured: dict[tuple[int, tuple[float, ...]], float] = {}
    for i, combo in enumerate(combos):
        arch = Arch(tuple(space.full_config().depth),
                    tuple(combo[j] for blk in space.blocks for j in range(len(blk.widths))))
        sub = extract(anchor.model, space, arch.config(space)).to(device).eval()
        inputs = _block_inputs(sub, space, x)
        for b, blk in enumerate(space.blocks):
            key = (b, combo[:len(blk.widths)])
            if key not in measured:
                measured[key] = measure_latency(sub.get_submodule(blk.module), inputs[b], repeats=repeats)
        if progress is not None:
            progress(i + 1, len(combos))
    # A narrower block is never slower than a wider one: take each entry as the fastest of itself and
    # every wider combination of the same block, so that one timing hit by a busy machine cannot make
    # the smallest sub-network look slower than the whole model (seen on a loaded 2-core CI machine).
    entries = {LatencyTable.key(b, w): min(t for (b2, w2), t in measured.items()
                                           if b2 == b and all(f2 >= f for f, f2 in zip(w, w2)))
               for (b, w) in measured}
    # The rest is timed directly: a whole-model time minus the blocks' sum would carry the noise of
    # every block measurement into it.
    full = extract(anchor.model, space, space.full_config()).to(device).eval()
    rest = sum(measure_latency(fn, t, repeats=repeats) for fn, t in _outside_parts(full, space, x))
    return LatencyTable(str(device), tuple(choices), rest, entries)


@torch.inference_mode()
def _outside_parts(model: nn.Module, space: ElasticSpace, x: torch.Tensor) -> list[tuple[Callable, torch.Tensor]]:
    """What runs outside the blocks, each with its input: the stem, the head and, on a stitch's
    route (composer.export.StitchedRoute), its stitching layers."""
    from zoo.adapters import adapt
    if callable(getattr(model, "route_units", None)):
        stem, head, layers = model.stem, model.head, list(model.stitch_layers.values())
    else:
        adapter = adapt(model)
        stem, head, layers = adapter.stem, adapter.head, []
    got = {}
    handles = [m.register_forward_pre_hook(lambda m, args, i=i: got.__setitem__(i, args)) for i, m in enumerate(layers)]
    handles.append(model.get_submodule(space.blocks[-1].module).register_forward_hook(
        lambda m, args, out: got.__setitem__("head", out)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    stitches = [((lambda t, m=m, rest=got[i][1:]: m(t, *rest)), got[i][0]) for i, m in enumerate(layers)]
    return [(stem, x), *stitches, (head, got["head"])]


@torch.inference_mode()
def _block_inputs(model: nn.Module, space: ElasticSpace, x: torch.Tensor) -> list[torch.Tensor]:
    got = {}
    handles = [model.get_submodule(b.module).register_forward_pre_hook(
        lambda m, args, i=i: got.__setitem__(i, args[0].clone())) for i, b in enumerate(space.blocks)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(space.blocks))]


# --- evolutionary search ------------------------------------------------------------------------------

@dataclass
class SearchResult:
    arch: Arch
    predicted: float
    cost: float                     # in the budget's metric
    population: list[tuple[Arch, float]] = field(repr=False, default_factory=list)   # final, best first


def budget_cost(space: ElasticSpace, metric: str, table: LatencyTable | None = None) -> Callable[[Arch], float]:
    """The function a budget is checked with: exact MACs / activations, or the latency table."""
    if metric == "latency":
        if table is None:
            raise ElasticError("a latency budget needs a latency table measured on this device")
        return lambda a: table.predict(space, a)
    if metric not in METRICS:
        raise ElasticError(f"unknown budget metric '{metric}' (one of {', '.join(METRICS)})")
    return lambda a: float(getattr(arch_cost(space, a), metric))


def evolutionary_search(space: ElasticSpace, predict: Callable[[list[Arch]], torch.Tensor], budget: float,
                        cost: Callable[[Arch], float], choices: Sequence[float] = WIDTH_CHOICES,
                        population: int = 64, generations: int = 20, parent_ratio: float = 0.25,
                        mutation_ratio: float = 0.5, mutate_prob: float = 0.1, seed: int = 0,
                        progress: Progress | None = None) -> SearchResult:
    """OFA's search: a population under the budget; each generation keeps the predicted-best
    parents and refills with mutations (each gene redrawn with `mutate_prob`) and crossovers."""
    rnd = random.Random(seed)
    floor = smallest_arch(space, choices)
    if cost(floor) > budget:
        raise ElasticError(f"budget {budget:,.6g} is below the smallest sub-network ({cost(floor):,.6g})")
    cache: dict[Arch, float] = {}

    def fits(a: Arch) -> bool:
        if a not in cache:
            cache[a] = cost(a)
        return cache[a] <= budget

    def mutate(a: Arch) -> Arch:
        depth = tuple(rnd.randint(1, len(space.stage_blocks(s))) if rnd.random() < mutate_prob else d
                      for s, d in enumerate(a.depth))
        width = tuple(rnd.choice(choices) if rnd.random() < mutate_prob else w for w in a.width)
        return Arch(depth, width)

    def cross(a: Arch, b: Arch) -> Arch:
        return Arch(tuple(rnd.choice(p) for p in zip(a.depth, b.depth)),
                    tuple(rnd.choice(p) for p in zip(a.width, b.width)))

    def fill(seeds: list[Arch], make: Callable[[], Arch], n: int) -> list[Arch]:
        out, tries = list(seeds), 0
        while len(out) < n and tries < 50 * n:
            a = make()
            tries += 1
            if fits(a):
                out.append(a)
        return out

    # start: random feasible archs; under tight budgets few are, so mutations of the smallest help
    pop = fill([floor], lambda: _random_arch(space, rnd, choices), population)
    pop = fill(pop, lambda: mutate(rnd.choice(pop)), population)
    n_parents = max(2, int(population * parent_ratio))
    n_mutate = int(population * mutation_ratio)
    ranked: list[tuple[Arch, float]] = []
    for g in range(generations + 1):
        uniq = list(dict.fromkeys(pop))
        scores = predict(uniq).tolist()
        ranked = sorted(zip(uniq, scores), key=lambda t: -t[1])
        if g == generations:
            break
        parents = [a for a, _ in ranked[:n_parents]]
        children = fill([], lambda: mutate(rnd.choice(parents)), n_mutate)
        children = fill(children, lambda: cross(rnd.choice(parents), rnd.choice(parents)), population - n_parents)
        pop = parents + children
        if progress is not None:
            progress(g + 1, generations)
    best, pred = ranked[0]
    return SearchResult(best, pred, cache.get(best, cost(best)), ranked)


# --- the whole builder --------------------------------------------------------------------------------

@dataclass
class ElasticResult:
    candidates: list[Candidate]
    rank_correlation: float | None          # Spearman, out-of-fold predictions vs measured (None: undefined)
    predictor: str
    samples: list[dict]                     # the measured sub-networks the predictor was fitted on
    latency: LatencyTable | None = None
    # what build_elastic adds for the fronts' reports
    progressive: dict | None = None         # this build's progressive shrinking: steps, first/last loss, path
    finetuned: str | None = None            # digest of the progressive-shrinking weights searched (None: the run's)
    bn_images: int = 0                      # images each sub-network's BatchNorm statistics were re-estimated on
    has_bn: bool = False                    # whether the source has BatchNorm layers at all
    data: str = ""                          # the images the chosen sub-networks were measured on
    cancelled: bool = False                 # cancelled during progressive shrinking: no search, no candidates


def search_elastic(anchor: ElasticAnchor, batches: Batches, eval_batches: Batches | None = None,
                   bn_images: Sequence[torch.Tensor] | None = None, budgets: Sequence[tuple[str, float]] = (),
                   samples: int = 40, predictor: str = "mlp", choices: Sequence[float] = WIDTH_CHOICES,
                   latency: LatencyTable | None = None, population: int = 64, generations: int = 20, seed: int = 0,
                   data: str = "", bn_source: dict | None = None, check: int = 3,
                   progress: Callable[[str, int, int], None] | None = None, precision: str = "fp32") -> ElasticResult:
    """Measure `samples` random sub-networks on `batches`, fit the predictor, search each budget
    ((metric, value) pairs; default: 30/50/70/90 % of the anchor's MACs), measure the `check`
    predicted-best of each search on `batches` and keep the best measured (the predicted-best alone
    is biased toward networks the predictor overrates), then measure the kept ones on
    `eval_batches` (default `batches`). `bn_source` says where `bn_images` came from (e.g. {"data",
    "seed", "batch_size"} of `image_batches`), stored so that `export_candidate` can take the same
    images again. progress(phase, done, total) reports each phase ("measure", "search i/n",
    "check i/n", "verify"). Sub-networks run on the anchor's device under `precision` (autocast); the
    predictor and the search stay on the CPU in float32 / float64."""
    from composer.device import autocast
    space = anchor.space
    say = (lambda phase: (lambda d, t: progress(phase, d, t))) if progress else (lambda phase: None)
    full_macs = arch_cost(space, largest_arch(space)).macs
    budgets = list(budgets) or [("macs", f * full_macs) for f in (0.3, 0.5, 0.7, 0.9)]
    for metric, value in budgets:   # fail before the slow part
        check_budget(space, metric, value, latency, choices)
    archs = sample_archs(space, samples, seed, choices)
    measured = evaluate_subnets(anchor, [a.config(space) for a in archs], batches, bn_images, say("measure"), precision)
    x = encode(space, archs)
    rho = cv_rank_correlation(x, measured, predictor, seed=seed) if len(archs) >= 5 else None
    rho = None if rho is None or math.isnan(rho) else rho   # nan: the measured accuracies were all equal
    model = fit_predictor(x, measured, predictor, seed)
    chosen = []
    for i, (metric, value) in enumerate(budgets):
        res = evolutionary_search(space, lambda a: model(encode(space, a)), value, budget_cost(space, metric, latency),
                                  choices, population, generations, seed=seed + i,
                                  progress=say(f"search {i + 1}/{len(budgets)}"))
        top = [a for a, _ in res.population[:max(1, check)]]
        checked = evaluate_subnets(anchor, [a.config(space) for a in top], batches, bn_images,
                                   say(f"check {i + 1}/{len(budgets)}"), precision) if len(top) > 1 else [None]
        best = max(range(len(top)), key=lambda j: checked[j] if checked[j] is not None else 0.0)
        arch = top[best]
        res = SearchResult(arch, dict(res.population)[arch], budget_cost(space, metric, latency)(arch), res.population)
        chosen.append((metric, value, res, checked[best]))
    eval_batches = eval_batches if eval_batches is not None else batches
    unique = list(dict.fromkeys(r.arch for _, _, r, _ in chosen))
    acc = dict(zip(unique, evaluate_subnets(anchor, [a.config(space) for a in unique], eval_batches, bn_images,
                                           say("verify"), precision)))
    n_eval = sum(len(y) for _, y in eval_batches)
    candidates, done = [], set()
    for metric, value, res, search_top1 in chosen:
        if res.arch in done:   # two budgets chose the same network: one candidate (the first budget's)
            continue
        done.add(res.arch)
        cfg = res.arch.config(space)
        cost = subnet_cost(space, cfg)
        lat = None
        if latency is not None:
            device = next(anchor.model.parameters()).device
            with autocast(precision, device):
                sub = build_subnet(anchor, cfg, bn_images)
                lat = measure_latency(sub, torch.zeros(1, *space.input_size, device=device))
        candidates.append(Candidate(
            "elastic", f"{anchor.short_name} {res.arch.label()}", anchor.spec, cost.macs, cost.params,
            cost.activations, acc[res.arch], "measured", lat,
            {"anchor": anchor.index, "stitch": anchor.stitch, "spec": anchor.spec, "subnet": cfg.to_dict(), "arch": res.arch.to_dict(),
             "budget": {"metric": metric, "value": value}, "predicted_top1": res.predicted,
             "search_top1": search_top1, "checked": check,
             "predictor": predictor, "rank_correlation": rho, "bn": {"images": _count(bn_images), **(bn_source or {})},
             "data": data, "images": n_eval, "finetuned": anchor.finetuned, "weights": anchor.weights,
             "latency_predicted_ms": latency.predict(space, res.arch) if latency is not None else None}))
    sample_rows = [{"arch": a.to_dict(), "top1": t, **arch_cost(space, a).to_dict()} for a, t in zip(archs, measured)]
    return ElasticResult(candidates, rho, predictor, sample_rows, latency)


def check_budget(space: ElasticSpace, metric: str, value: float, table: LatencyTable | None,
                              choices: Sequence[float] = WIDTH_CHOICES) -> None:
    """Refuse a budget no sub-network meets, with the smallest cost there is."""
    cost = budget_cost(space, metric, table)(smallest_arch(space, choices))
    if value < cost:
        unit = "ms" if metric == "latency" else ""
        raise ElasticError(f"{metric} budget {value:,.6g}{unit} is below the smallest sub-network "
                           f"({cost:,.6g}{unit}: depth 1 per stage, widths x{min(choices)})")


# --- the builder on a run (composer.builders.build("elastic", ...)) ----------------------------------------

BUDGET_LIMITS = {"macs": 1e15, "activations": 1e15, "latency": 1e6}   # per image; latency in ms


def check_budgets(budgets, relative: bool = False) -> list[tuple[str, float]]:
    """(metric, value) pairs as typed: a known metric and a finite positive value (a percentage of the
    source's own cost up to 100 when `relative`), or a one-line ElasticError / UserError."""
    out = []
    for metric, value in budgets:
        if metric not in METRICS:
            raise ElasticError(f"unknown budget metric '{str(metric)[:20]}' (one of {', '.join(METRICS)})")
        if relative:
            out.append((metric, checks.number(value, f"a {metric} budget (% of its own)", hi=100, above=0)))
        else:
            unit = " (ms)" if metric == "latency" else ""
            out.append((metric, checks.number(value, f"a {metric} budget{unit}", hi=BUDGET_LIMITS[metric], above=0)))
    return out


def build_elastic(run_dir, *, anchor: int | None = None, stitch: int | None = None, events=None, cancel=None,
                  data: str, eval_data: str | None = None, budgets=(), relative: bool = False, samples: int = 40,
                  eval_limit: int = 500, bn_images: int = 1024, predictor: str = "mlp", finetune_steps: int = 0,
                  finetune_lr: float = 0.01, population: int = 64, generations: int = 20, check: int = 3,
                  batch_size: int = 64, seed: int = 0, workers: int = 0, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> BuildResult:
    """Once-for-All on anchor `anchor` or stitch `stitch` of a run: with `finetune_steps` (anchors only)
    progressive shrinking on `data` first (its weights saved in the run); then `samples` sub-networks
    measured on `eval_limit` images of `data` (after the `bn_images` each sub-network's BatchNorm
    statistics are re-estimated on, when it has BatchNorm), the predictor, a search per budget
    ((metric, value) pairs, values as percentages of the source's own cost when `relative`; default
    30/50/70/90 % of its MACs; a latency budget measures a latency table here first) and the chosen
    sub-networks measured on `eval_data` (default: `data`), added to the run as "elastic" candidates.
    events: {"type": "progress", "phase", "done", "total"} per step of each phase (progressive shrinking's
    also carry its "loss"); `cancel` (a threading.Event) stops progressive shrinking (its weights are saved, nothing is searched).
    device / precision: where the source and its sub-networks run (fine-tune, latency table, measurements)
    and the autocast precision of their forward passes (composer.device)."""
    from composer.device import autocast
    events = events or (lambda e: None)
    budgets = check_budgets(budgets, relative)
    samples = checks.whole(samples, "measured samples", 1, 100_000)
    eval_limit = checks.whole(eval_limit, "images per measurement", 1, None)
    bn_images = checks.whole(bn_images, "BatchNorm images", 0, None)
    finetune_steps = checks.whole(finetune_steps, "progressive-shrinking steps", 0, 10_000_000)
    finetune_lr = checks.number(finetune_lr, "progressive-shrinking lr", hi=10, above=0)
    population = checks.whole(population, "population", 1, 100_000)
    generations = checks.whole(generations, "generations", 1, 100_000)
    check = checks.whole(check, "checked sub-networks per budget", 1, 1000)
    batch_size = checks.whole(batch_size, "batch size", 1, 100_000)
    if predictor not in ("mlp", "ridge"):
        raise ElasticError(f"predictor must be 'mlp' or 'ridge', not '{str(predictor)[:20]}'")
    if stitch is not None and finetune_steps:
        raise ElasticError(f"progressive shrinking works on an anchor, not on a stitch yet: search stitch {stitch} "
                           "without fine-tune steps, or choose an anchor")
    source = resolve_source(run_dir, anchor, stitch)
    base = from_source(source, progressive=not finetune_steps)
    space = base.space
    device = torch.device(device)
    base.model.to(device)

    def progress(phase: str, done: int, total: int) -> None:
        events({"type": "progress", "phase": phase, "done": done, "total": total})

    def absolute(table: LatencyTable | None, metric: str, value: float) -> float:
        return budget_cost(space, metric, table)(largest_arch(space)) * value / 100 if relative else value

    for metric, value in budgets:   # fail before the slow part (a latency budget needs its table first)
        if metric != "latency":
            check_budget(space, metric, absolute(None, metric, value), None)
    result_extra: dict = {"finetuned": base.finetuned}
    if finetune_steps:
        from composer import data as data_mod
        from composer.builders.progressive import progressive_shrink, save_finetuned
        ds = data_mod.open_dataset(data, data_mod.data_config(base.model), split="train")
        ps = progressive_shrink(base, data_mod.loader(ds, batch_size, shuffle=True, workers=workers, seed=seed),
                                finetune_steps, finetune_lr, seed, events=events, cancel=cancel, precision=precision)
        path = save_finetuned(source.run_dir, base)
        result_extra = {"progressive": {**ps, "path": str(path)}, "finetuned": base.finetuned}
        if cancel is not None and cancel.is_set():
            summary = f"elastic: cancelled after {ps['steps']} progressive-shrinking steps (saved in the run)"
            return BuildResult("elastic", [], summary,
                               ElasticResult([], None, predictor, [], cancelled=True, **result_extra))
    table = None
    if any(metric == "latency" for metric, _ in budgets):
        with autocast(precision, device):
            table = latency_table(base, device=device, progress=lambda d, t: progress("latency", d, t))
    budgets = [(metric, absolute(table, metric, value)) for metric, value in budgets]
    for metric, value in budgets:
        check_budget(space, metric, value, table)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.model.modules())
    bn, batches = image_batches(data, base.model, eval_limit, seed, batch_size, bn_images=bn_images if has_bn else 0,
                                workers=workers)
    eval_batches = image_batches(eval_data, base.model, eval_limit, seed, batch_size, split="validation",
                                 workers=workers)[1] if eval_data else None
    result = search_elastic(base, batches, eval_batches, bn, budgets, samples=samples, predictor=predictor,
                            latency=table, population=population, generations=generations, seed=seed,
                            data=eval_data or data, bn_source={"data": data, "seed": seed, "batch_size": batch_size},
                            check=check, progress=progress, precision=precision)
    from composer.run import add_candidates
    add_candidates(source.run_dir, result.candidates)
    for k, v in {**result_extra, "bn_images": _count(bn), "has_bn": has_bn, "data": eval_data or data}.items():
        setattr(result, k, v)
    return BuildResult("elastic", result.candidates,
                       f"elastic: {len(result.candidates)} sub-networks added to the curve", result)


# --- export -------------------------------------------------------------------------------------------

def export_subnet(anchor: ElasticAnchor, config: SubnetConfig, out_dir, bn_images: Sequence[torch.Tensor] | None = None,
                  top1: float | None = None, program: bool = True) -> Path:
    """Write the sub-network as model.safetensors + config.json (the anchor's architecture and the
    SubnetConfig: `load_subnet` builds the anchor, extracts, loads the weights) and, with
    program=True, model.pt2 (torch.export) for plain-torch use."""
    from composer.export import preprocessing_of
    out_dir = Path(out_dir).expanduser()
    sub = build_subnet(anchor, config, bn_images)
    cost = subnet_cost(anchor.space, config)
    base = {"stitch": anchor.entry} if anchor.stitch is not None else {"anchor": anchor.entry}
    cfg = {"format": FORMAT, "version": 1, **base, "subnet": config.to_dict(),
           "input_size": list(anchor.space.input_size), "preprocessing": preprocessing_of(anchor.model),
           "cost": cost.to_dict(), "top1": top1, "bn_images": _count(bn_images)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(out_dir / "model.safetensors", sub.state_dict())
    write_json_atomic(out_dir / "config.json", cfg)
    if program:
        _add_program(out_dir, cfg)
    return out_dir


def _add_program(out_dir: Path, cfg: dict) -> None:
    """model.pt2 (or model.ts) of the sub-network in `out_dir`, recorded in its config.json."""
    from composer.export import save_program
    cfg["program"] = save_program(load_subnet(out_dir), cfg["input_size"], out_dir)
    write_json_atomic(out_dir / "config.json", cfg)


def load_subnet(path) -> nn.Module:
    """The sub-network exported by `export_subnet` in folder `path`, in eval mode."""
    from composer.export import build_anchor, build_route
    path = Path(path).expanduser()
    cfg = read_config(path, FORMAT, ElasticError, "an exported sub-network")
    model = build_route(cfg["stitch"]) if cfg.get("stitch") else build_anchor(cfg["anchor"])
    space = elastic_space(model, tuple(cfg["input_size"]))
    try:
        sub = extract(model, space, SubnetConfig.from_dict(cfg["subnet"]))
        sub.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    except (OSError, RuntimeError, SubnetError) as e:
        raise ElasticError(f"{path}: weights do not load ({str(e).splitlines()[0]})") from None
    return sub.eval()


def export_candidate(run_dir, ref: str, out_dir, program: bool = True) -> Path:
    """Export the run's elastic or shrink candidate `ref` ("METHOD:NAME", or a NAME only one method
    uses) as a folder `load_subnet` loads. Elastic: its anchor, sorted again, the stored
    SubnetConfig, and BatchNorm statistics re-estimated on the same images as when it was measured.
    Shrink: the network `composer.builders.shrink` saved in the run, as it was measured."""
    import shutil

    from composer.run import find_candidate
    c = find_candidate(run_dir, ref)
    if c.method == "shrink":
        src, out = Path(run_dir) / c.config["folder"], Path(out_dir).expanduser()
        cfg = read_config(src, FORMAT, ElasticError, "a shrunk network")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "model.safetensors", out / "model.safetensors")
        write_json_atomic(out / "config.json", cfg)
        if program:
            _add_program(out, cfg)
        return out
    if c.method != "elastic":
        kept = f": its network is in {c.config['folder']}" if c.config.get("folder") else ""
        raise ElasticError(f"'{c.method}:{c.name}' is a {c.status} {c.method} candidate, not an elastic or shrink "
                           f"sub-network{kept}")
    if c.config.get("stitch") is not None:
        anchor = stitch_of_run(run_dir, c.config["stitch"])
        if c.config.get("weights") != anchor.weights:
            raise ElasticError(f"'{c.name}' was measured with other weights of stitch {c.config['stitch']} than the "
                               "run has now (it was fine-tuned since): search again, then export")
    else:
        anchor = anchor_of_run(run_dir, c.config["anchor"])
        # candidates stored before anchors recorded their weights carry None: only `finetuned` tells
        stale = c.config.get("weights") is not None and c.config["weights"] != anchor.weights
        if c.config.get("finetuned") != anchor.finetuned or stale:
            why = ("progressive shrinking ran since" if c.config.get("finetuned") != anchor.finetuned else
                   "it was fine-tuned since")
            raise ElasticError(f"'{c.name}' was measured with other weights of anchor {c.config['anchor']} than the "
                               f"run has now ({why}): search again, then export")
    bn_info = c.config.get("bn") or {}
    bn = None
    if bn_info.get("images"):
        bn, _ = image_batches(bn_info["data"], anchor.model, 0, bn_info.get("seed", 0), bn_info.get("batch_size", 64),
                              bn_images=bn_info["images"])
    return export_subnet(anchor, SubnetConfig.from_dict(c.config["subnet"]), out_dir, bn, c.top1, program)
