"""The other curve builders: ways to add points to a run's curve besides stitching.

elastic (Once-for-All sub-networks), progressive (OFA's progressive shrinking), shrink (DMS), fold
(VanillaNet-style folding) and scaling (Fast Scaling's dWr rule), over subnet (elastic spaces) and
source (an anchor or a stitch of a run, resolved one way for all of them).

One entry point for the CLI and the app:

    build(kind, run_dir, anchor=I or stitch=ID, events=..., cancel=..., **options) -> BuildResult

`BUILDERS` maps each name to its function; every one takes plain arguments, sends progress as event
dicts ({"type": ...}) to `events`, stops early where it can when `cancel` (a threading.Event) is set,
adds its candidates to the run and returns a BuildResult (candidates, one-line summary, details).
"""
from __future__ import annotations

from typing import Callable

from composer.builders.elastic import build_elastic
from composer.builders.fold import build_fold
from composer.builders.scaling import build_scale
from composer.builders.shrink import build_shrink
from composer.builders.source import BuildResult, Source, SourceError, resolve_source
from composer.errors import UserError

BUILDERS: dict[str, Callable[..., BuildResult]] = {
    "elastic": build_elastic,   # options: data, eval_data, budgets, relative, samples, eval_limit, bn_images, ...
    "shrink": build_shrink,     # options: data, target_macs, steps, eval_data, eval_limit, lr, bn_images, latency, ...
    "fold": build_fold,         # options: data, out, images, limit, tolerance, latency, ...
    "scale": build_scale,       # options: factor, alpha, fill
}


# the builders that run networks: they take device= and precision= (resolved here, once)
ON_DEVICE = ("elastic", "shrink", "fold")


def build(kind: str, run_dir, *, anchor: int | None = None, stitch: int | None = None, events=None, cancel=None,
          device=None, precision=None, **options) -> BuildResult:
    """Run builder `kind` on anchor `anchor` or stitch `stitch` of the run in `run_dir`.

    device / precision: the user's words (`auto`, `cpu`, `cuda:N`; `auto`, `fp32`, `bf16`, `fp16`;
    None = auto), resolved by composer.pipeline.resolve_where for the builders that run networks
    (elastic, shrink, fold: models and batches move there, forward passes run under autocast; fold
    certifies in fp32 whatever the precision); `scale` runs nothing and ignores them."""
    builder = BUILDERS.get(kind)
    if builder is None:
        raise UserError(f"unknown builder '{str(kind)[:30]}' (one of {', '.join(BUILDERS)})")
    if kind in ON_DEVICE:
        from composer.pipeline import resolve_where
        options["device"], options["precision"] = resolve_where(device, precision)
    return builder(run_dir, anchor=anchor, stitch=stitch, events=events, cancel=cancel, **options)


__all__ = ["BUILDERS", "BuildResult", "Source", "SourceError", "build", "resolve_source"]
