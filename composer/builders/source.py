"""What a builder starts from, an anchor or a stitch of a run resolved one way for every builder, and
what it returns (`BuildResult`).

`resolve_source(RUN, anchor=I)` is the run's anchor I as the run has it (its fitted or fine-tuned
weights); `resolve_source(RUN, stitch=ID)` is stitch ID's route as its own module, the module that
`export --stitch` writes (composer.export.route_of: the same weights, BatchNorms behind the stitch
point on the stitch's statistics). Either way a `Source` says what it is (spec, label, how
composer.export rebuilds it), what it sees (input size, preprocessing) and which weights it has (a
digest, so that a result measured on it can tell later whether the run still has them).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from composer.errors import UserError


class SourceError(UserError):
    """An anchor or stitch that a run does not have; the message says which ones it has."""


@dataclass(eq=False)
class BuildResult:
    """What every builder returns (composer.builders.build)."""
    kind: str                   # the builder's name: elastic, shrink, fold, scale
    candidates: list            # the composer.candidates.Candidate added to the run (stored in RUN/candidates.json)
    summary: str                # one line, e.g. "shrink: NAME added to the curve"
    details: object = None      # the builder's own result, what the fronts print: ElasticResult, ShrinkResult,
                                # FoldReport or ScaleResult


@dataclass(eq=False)
class Source:
    module: nn.Module               # eval mode; an anchor's is the run's own model (copy before changing it)
    anchor: int | None              # the anchor's index in the run (0 = fewest MACs), None for a stitch
    stitch: int | None              # the stitch id, None for an anchor
    spec: str                       # an anchor's spec (timm name, local-dir:, hf-hub:), or "stitch ID: <route>"
    label: str                      # short: the anchor's timm architecture, or "stitch ID"
    entry: dict = field(repr=False)   # how composer.export rebuilds it: an anchor entry, or {"stitch": ID, **description}
    input_size: tuple[int, ...] = ()  # the input its costs are counted at (a stitch: the plan's, of its first anchor)
    macs: int = 0                   # per image, as the run's plan counts it
    run_dir: Path | None = None

    @property
    def key(self) -> str:
        """A name for files: "anchorI" or "stitchID"."""
        return f"anchor{self.anchor}" if self.stitch is None else f"stitch{self.stitch}"

    @property
    def data_config(self) -> dict:
        """timm's data config (input size, normalisation, crop): what images it takes."""
        from composer.data import data_config
        return data_config(self.module)

    @property
    def preprocessing(self) -> dict:
        """The preprocessing an export records (composer.export.preprocessing_of)."""
        from composer.export import preprocessing_of
        return preprocessing_of(self.module)

    @cached_property
    def weights(self) -> str:
        """Digest of its weights as resolved (computed on first use: take it before changing the module)."""
        return weights_digest(self.module)


def weights_digest(model: nn.Module) -> str:
    """A short digest of every parameter and buffer of `model` (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_anchor(anchors: list[str], index) -> int:
    """`index` as an anchor index of a run with these anchor specs, or a one-line SourceError."""
    n = len(anchors)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise SourceError(f"anchor {index} does not exist (this run has anchors 0..{n - 1}: {', '.join(anchors)})")
    return index


def source_of(net, anchor: int | None = None, stitch: int | None = None, run_dir=None) -> Source:
    """Anchor `anchor` or stitch `stitch` (exactly one) of a stitched network (composer.snnet)."""
    from composer.export import ExportError, anchor_entry, route_of
    if (anchor is None) == (stitch is None):
        raise SourceError("start from an anchor or a stitch of the run (give exactly one)")
    plan = net.plan
    run_dir = Path(run_dir) if run_dir is not None else None
    if stitch is not None:
        try:
            module, description = route_of(net, stitch)
        except ExportError as e:   # a stitch that does not exist
            raise SourceError(str(e)) from None
        first = plan.stitches[stitch].route[0].anchor
        return Source(module, None, stitch, f"stitch {stitch}: {plan.describe_route(stitch)}", f"stitch {stitch}",
                      {"stitch": stitch, **description}, tuple(plan.infos[first].input_size),
                      plan.cost(stitch).macs, run_dir)
    check_anchor(plan.anchors, anchor)
    module, spec = net.anchors[anchor].eval(), plan.anchors[anchor]
    entry = anchor_entry(anchor, spec, module)
    return Source(module, anchor, None, spec, entry["architecture"], entry,
                  tuple(module.pretrained_cfg["input_size"]), plan.infos[anchor].total.macs, run_dir)


def resolve_source(run_dir, anchor: int | None = None, stitch: int | None = None) -> Source:
    """Anchor `anchor` or stitch `stitch` (exactly one) of the run in `run_dir`, with the run's
    weights (fitted, or fine-tuned when it was trained)."""
    from composer.run import load_run
    if (anchor is None) == (stitch is None):   # before loading anything
        raise SourceError("start from an anchor or a stitch of the run (give exactly one)")
    run = load_run(Path(run_dir))
    return source_of(run.net, anchor, stitch, run.dir)
