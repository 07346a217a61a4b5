"""Least-squares fitting of every stitching layer from calibration images (SN-Net's init).

For a stitch from front unit j into back unit k, X = front's output of unit j and Y = back's
input of unit k, both as rows (one per token / pixel). We want W, b minimising
||X W^T + b - Y||^2. SN-Net stacks all rows and takes a pseudo-inverse; that needs every row in
memory and, without a cut-off, gets *worse* as calibration grows (pinv's default tolerance drops
real directions). Instead we stream: accumulate the normal equations
    [X 1]^T [X 1]  and  [X 1]^T Y
batch by batch in float64, then solve in float64 with a small ridge on W (not b). A layer shared
by several positions (SN-Net's sliding window) sums their equations: one joint least-squares fit.
A route there and back (SN-Netv2: small -> large -> small) has two junctions; each is the same
problem between the two anchors' own features at that junction, solved once however many routes
share its layer, and the route's R^2 is its worse junction's.

At the speed of the forward passes: per front key (anchor, unit) ONE GEMM
    [X-s 1]^T [X-s 1 | Y_1-s_1 ... Y_m-s_m]
covers every back paired with that front. The rows are written straight from the features into one
reused workspace (channels-first maps stay channels-first: no transposed or float64 copy of the
features), shifted by a fixed per-key vector s (the first images' column means) so that float32
products lose nothing to large means; the products of a batch are float32, added up across
batches in float64; the shift is undone exactly (float64) when solving. On CPU a batch runs a few
images at a time (~32 MiB of needed features) and the workspace is filled ~1 MiB at a time, so
features and rows are still in cache when their products are taken: on the CIFAR ResNets fitting
then costs ~1.05-1.1x the forward passes alone (bench/bench_fit.py). The every-5th held-out images
run as their own micro-batches, their products in float64 (1/5 of the rows, ~2 % of the time), so
that R^2 keeps float64 accuracy where it matters (R^2 -> 1 is a difference of nearly equal sums).

Fit quality per stitch is R^2 on held-out calibration images (every 5th image), computed from the
same kind of accumulated statistics, so no rows are ever stored.

Across processes (torchrun): each rank passes its shard of the images with `distributed=True`;
all ranks take rank 0's shifts, sum their float64 statistics with one all_reduce and solve the same
equations (composer.distributed). With shards made of the batches one process would see, the
layers equal one process's within float64 rounding (only the order of the float64 sums differs).
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from composer.costs import channels, positions as count_positions
from composer.device import autocast, ieee_fp32
from composer.snnet import RouteStats, StitchedNetwork, prefix_outputs, resample

HOLDOUT_EVERY = 5   # every 5th calibration image is held out for R^2


@dataclass
class FitReport:
    r2: dict[int, float]          # per stitch id, on held-out calibration images
    images: int                   # calibration images used (fit + held out)
    held_out: int


def _key_shape(plan, key: tuple[int, ...]) -> tuple[int, ...]:
    """Shape (without batch) of the output of unit `key[1]` of anchor `key[0]` (-1: the stem's),
    resampled onto grid key[2:] when the key has one (see `_front_key`)."""
    info = plan.infos[key[0]]
    shape = tuple(info.in_shapes[0] if key[1] < 0 else info.out_shapes[key[1]])
    return shape[:1] + tuple(key[2:]) if len(key) > 2 else shape


def _front_key(plan, front: tuple[int, int], back: tuple[int, int]) -> tuple[int, ...]:
    """A junction's front features: (anchor, unit), and the back's grid when the anchors run at their
    own resolutions and the grids differ. The stitching layer resamples its output onto that grid,
    which equals mapping resampled features (bilinear weights sum to 1), so those are what is fitted."""
    f, b = _key_shape(plan, front), _key_shape(plan, back)
    if plan.infos[front[0]].layout == "nchw" and f[1:] != b[1:]:
        return front + b[1:]
    return front


def _as_bpc(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Features as (batch, positions, channels), a view where strides allow (also channels_last)."""
    b = t.shape[0]
    if layout == "nchw":
        return t.reshape(b, t.shape[1], -1).transpose(1, 2)
    return t.reshape(b, -1, t.shape[-1])


class _Front:
    """One front key and every back key paired with it: the columns of its product
    [X 1 | Y_1 ... Y_m] (x: 0..d-1, the ones column: d, back b: offset[b] .. offset[b] + width[b])."""

    def __init__(self, key, d: int, layout: str, backs: list, widths: dict, rows_per_image: int):
        self.key, self.d, self.layout, self.backs = key, d, layout, backs
        self.offset, self.width, o = {}, {}, d + 1
        for b in backs:
            self.offset[b], self.width[b] = o, widths[b]
            o += widths[b]
        self.cols = o
        self.p = rows_per_image
        self.channels_first = layout == "nchw"   # workspace (columns, rows) rather than (rows, columns)
        self.yy_backs: list = []                  # back keys whose sum |Y - s|^2 is taken here


class _Stats:
    """float64 sums over rows, shifted: per front key G = [X-s 1]^T [X-s 1 | Y-s ...] (row d holds
    the column sums, G[d, d] the row count), per back key sum |Y-s|^2."""

    def __init__(self, fronts: dict, backs: list, device):
        self.g = {f: torch.zeros(fr.d + 1, fr.cols, dtype=torch.float64, device=device) for f, fr in fronts.items()}
        self.yy = {b: torch.zeros((), dtype=torch.float64, device=device) for b in backs}

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, in an order all ranks agree on."""
        return [self.g[k] for k in sorted(self.g)] + [self.yy[k] for k in sorted(self.yy)]


class _Workspace:
    """One buffer per dtype reused for every front key and batch (no allocation, no page faults)."""

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def get(self, n: int, dtype=torch.float32) -> torch.Tensor:
        buf = self.bufs.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self.bufs[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]


@torch.no_grad()
def fit_stitches(net: StitchedNetwork, images: Iterable[torch.Tensor], ridge: float = 1e-4,
                 progress=None, *, device: torch.device | str | None = None, precision: str = "fp32",
                 distributed: bool = False) -> FitReport:
    """Fit all stitching layers of `net` in place from batches of (already transformed) images.

    progress: optional callable(images_done) for UIs; pass a tqdm wrapper around `images` for CLIs.
    device: where to run (the network is moved there and stays); default: where the network is.
    precision: "fp32" / "bf16" / "fp16" for the forward passes (autocast); the least squares stay
        float32 products of float32-cast features, accumulated and solved in float64.
    distributed: `images` is this rank's shard (composer.distributed.shard) and every rank of the
        default process group calls this: the normal equations are summed over ranks, so all ranks
        get the layers one process would fit on all images (a no-op without a group).
    """
    from composer.distributed import rank_world
    world = rank_world()[1] if distributed else 1
    if device is not None:
        net.to(device)
    device = next(net.parameters()).device
    net.eval()
    plan = net.plan
    # junctions: stitch id -> per stitching layer of its route, (front (anchor, unit), back
    # (anchor, unit-1), layer key). Every junction is fitted on the anchors' own features, also the
    # second one of a route there and back: SN-Netv2 shares one layer per direction and position,
    # so a layer serves routes that reach its junction through different first segments.
    junctions: dict[int, list[tuple]] = {}
    needed: dict[int, set[int]] = defaultdict(set)
    for s in plan.stitches:
        if s.is_anchor:
            continue
        junctions[s.id] = [(_front_key(plan, (f.anchor, f.last), (b.anchor, b.first - 1)), (b.anchor, b.first - 1), key)
                           for f, b, key in zip(s.route, s.route[1:], s.layers)]
        for fkey, bkey, _ in junctions[s.id]:
            needed[fkey[0]].add(fkey[1])
            needed[bkey[0]].add(bkey[1])
    positions = [j for js in junctions.values() for j in js]
    layout = {k: plan.infos[k[0]].layout for p in positions for k in p[:2]}
    width = {k: channels(_key_shape(plan, k), layout[k]) for k in layout}
    backs_of: dict = defaultdict(list)
    for fkey, bkey, _ in positions:
        if bkey not in backs_of[fkey]:
            backs_of[fkey].append(bkey)
    fronts = {f: _Front(f, width[f], layout[f], backs_of[f], width, count_positions(_key_shape(plan, f), layout[f]))
              for f in sorted(backs_of)}
    back_keys = sorted({b for fr in fronts.values() for b in fr.backs})
    for bk in back_keys:
        next(fr for fr in fronts.values() if bk in fr.backs).yy_backs.append(bk)
    fit, held = _Stats(fronts, back_keys, device), _Stats(fronts, back_keys, device)
    shift = {k: torch.zeros(width[k], device=device) for k in sorted(layout)}
    ws = _Workspace(device)
    seen = held_n = 0
    shift_set = False
    pending = ({}, {})   # this batch's products (fit, held) per front key, before they join the float64 sums
    # On CPU a batch runs a few images at a time, so that the features of all needed units stay in
    # cache until their products are taken (faster than whole batches for the forward passes too)
    image_bytes = 4 * sum(math.prod(_key_shape(plan, k)) for k in layout)
    step = None if device.type != "cpu" else max(1, MICRO_BATCH_BYTES // max(image_bytes, 1))
    with ieee_fp32(device):
        for batch in images:
            batch = batch.to(device, non_blocking=True)
            n = batch.shape[0]
            held_mask = ((torch.arange(seen, seen + n) % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1).to(device)
            nh = int(held_mask.sum())
            # fit images, then held-out ones, each a few at a time on CPU
            for stats, part in ((fit, batch[~held_mask] if nh else batch), (held, batch[held_mask] if nh else None)):
                if part is None or part.shape[0] == 0:
                    continue
                for j in range(0, part.shape[0], step or part.shape[0]):
                    x = part[j:j + step] if step else part
                    with autocast(precision, device):
                        outs = prefix_outputs(net, x, needed)
                        for k in layout:
                            if len(k) > 2:   # front features onto a back anchor's grid (`_front_key`)
                                outs[k] = resample(outs[k[:2]], k[2:])
                    if not shift_set:   # the fixed per-key shift: the first images' column means (rank 0's for all)
                        for k in shift:
                            shift[k] = _as_bpc(outs[k], layout[k]).mean((0, 1), dtype=torch.float32)
                        if world > 1:
                            _share_shift(shift)
                        shift_set = True
                    # the fit images' sum |Y-s|^2 serves R^2 only when no image is held out (< 5 images)
                    with_yy = stats is held or seen < HOLDOUT_EVERY
                    for fr in fronts.values():
                        _accumulate(fr, outs, shift, layout, ws, pending[stats is held],
                                    HELD_DTYPE if stats is held else torch.float32, with_yy)
                    del outs
            for stats, sums in zip((fit, held), pending):   # the batch's products into the float64 sums
                for key, (acc, channels_first, yy) in sums.items():
                    stats.g[key] += (acc.T if channels_first else acc).double()
                    for b, v in yy.items():
                        stats.yy[b] += v.double()
                sums.clear()
            seen += n
            held_n += nh
            if progress is not None:
                progress(seen)
        if world > 1:
            if not shift_set:       # no images here: still take part in the exchange the others made
                _share_shift(shift)
            seen, held_n = _reduce(seen, held_n, fit, held)
    if seen == 0:
        raise ValueError("no calibration images: the data set is empty")
    in_sample = seen == held_n
    if in_sample:
        fit = held  # a single image: fit on it (R^2 is then in-sample)

    by_layer = defaultdict(list)   # a junction shared by several routes counts once
    for fkey, bkey, key in positions:
        if (fkey, bkey) not in by_layer[key]:
            by_layer[key].append((fkey, bkey))
    solutions = {}
    for key, poss in by_layer.items():
        f0, b0 = poss[0]
        tx, ty = shift[f0].double(), shift[b0].double()   # the layer's coordinates: its first position's shifts
        a = bb = 0
        for fkey, bkey in poss:
            ai, bi, _ = _equations(fit, fronts[fkey], bkey, shift, tx, ty)
            a, bb = a + ai, bb + bi
        theta = _solve(a, bb, ridge, tx)
        solutions[key] = (theta, tx, ty)
        layer = net.stitch_layers[key]
        w = theta[:-1]                                   # (in, out) = W^T
        layer.weight.copy_(w.T.to(layer.weight.dtype))
        layer.bias.copy_((theta[-1] + ty - tx @ w).to(layer.bias.dtype))   # undo the shifts

    stats = fit if in_sample or held_n == 0 else held
    r2_of = {}   # per junction
    for fkey, bkey, key in positions:
        if (fkey, bkey, key) not in r2_of:
            theta, tx, ty = solutions[key]
            r2_of[(fkey, bkey, key)] = _r2(*_equations(stats, fronts[fkey], bkey, shift, tx, ty), theta)
    # a route is as good as its worst junction (nan if any junction has no variance to explain)
    r2 = {sid: min((r2_of[j] for j in js), key=lambda v: (not math.isnan(v), v)) for sid, js in junctions.items()}
    return FitReport(r2, seen, held_n)


CHUNK_BYTES = 1 << 20          # CPU: workspace per GEMM ~1 MiB, written and read while in L2
MICRO_BATCH_BYTES = 32 << 20   # CPU: images per forward pass such that their needed features are ~32 MiB
HELD_DTYPE = torch.float64


def _accumulate(fr: _Front, outs, shift, layout, ws: _Workspace, pending: dict, dtype: torch.dtype,
                with_yy: bool) -> None:
    """Add [X-s 1]^T [X-s 1 | Y_1-s_1 ...] of these images (and sum |Y-s|^2 if with_yy) to the
    batch's products in `pending` (front key -> (product in `dtype`, channels first?, {back: yy})).

    Rows are written (cast to `dtype` and shifted in one pass) into the workspace in the features'
    own order: channels-first maps as (columns, rows), which copies whole planes, tokens and
    channels-last maps as (rows, columns). On CPU a few images at a time, so that the workspace
    stays in cache between its write and the GEMM that reads it; on a GPU all at once. The
    products of a batch's chunks and micro-batches add up in `dtype`; the caller adds them to the
    float64 sums once per batch."""
    d, p, cols = fr.d, fr.p, fr.cols
    keys = [fr.key] + fr.backs
    first = _as_bpc(outs[fr.key], layout[fr.key])
    n = first.shape[0]
    channels_first = first.stride(-1) != 1               # NCHW in memory (not channels_last)
    # CPU chunks: ~CHUNK_BYTES of workspace, but at least 8 (d+1) rows, so that re-reading the
    # (d+1) x cols accumulator per chunk stays small beside the rows (wide tokens: one chunk)
    step = n if first.device.type != "cpu" else max(1, CHUNK_BYTES // (4 * cols * p), -(-8 * (d + 1) // p))
    # per source: features as (C, B, P) or (B, P, C), its columns, its shift shaped to broadcast
    if channels_first:
        srcs = [(_as_bpc(outs[k], layout[k]).permute(2, 0, 1), fr.offset.get(k, 0), fr.width.get(k, d),
                 shift[k].to(dtype)[:, None, None]) for k in keys]
    else:
        srcs = [(_as_bpc(outs[k], layout[k]), fr.offset.get(k, 0), fr.width.get(k, d), shift[k].to(dtype)) for k in keys]
    yy_cols = [(b, fr.offset[b], fr.offset[b] + fr.width[b]) for b in fr.yy_backs] if with_yy else []
    acc, _, yy_sums = pending.get(fr.key, (None, channels_first, {}))
    yy = [yy_sums.get(b, 0.0) for b, _, _ in yy_cols]
    for j in range(0, n, step):
        k = min(step, n - j)
        buf = ws.get(cols * k * p, dtype)
        if channels_first:
            view = buf.view(cols, k, p)
            for t, lo, c, sh in srcs:
                torch.sub(t[:, j:j + k], sh, out=view[lo:lo + c])
            view[d].fill_(1.0)
            mat = buf.view(cols, k * p)
            acc = torch.mm(mat, mat[:d + 1].T) if acc is None else acc.addmm_(mat, mat[:d + 1].T)   # (cols, d+1)
            for i, (_, lo, hi) in enumerate(yy_cols):
                yy[i] = yy[i] + torch.linalg.vector_norm(mat[lo:hi]).square()     # contiguous rows
        else:
            view = buf.view(k, p, cols)
            for t, lo, c, sh in srcs:
                torch.sub(t[j:j + k], sh, out=view[:, :, lo:lo + c])
            view[:, :, d].fill_(1.0)
            mat = buf.view(k * p, cols)
            acc = torch.mm(mat[:, :d + 1].T, mat) if acc is None else acc.addmm_(mat[:, :d + 1].T, mat)   # (d+1, cols)
            for i, (_, lo, hi) in enumerate(yy_cols):
                yy[i] = yy[i] + torch.linalg.vector_norm(mat[:, lo:hi]).square()
    yy_sums.update({b: v for (b, _, _), v in zip(yy_cols, yy)})
    pending[fr.key] = (acc, channels_first, yy_sums)


def _reshift(g: torch.Tensor, d: int, delta: torch.Tensor) -> torch.Tensor:
    """Sums G = sum_rows u_A^T u over rows u = [x - s, 1, y - s_y, ...] (u_A: the first d + 1
    entries, the ones column at d) re-expressed for shifts t, given delta = s - t (0 at column d):
    u' = u + delta, so G' = G + (sum u_A) delta^T + delta_A (sum u + n delta). Exact in float64."""
    gm = g + g[:, d:d + 1] * delta[None, :]
    return gm + delta[:d + 1, None] * gm[d:d + 1, :]


def _equations(stats: _Stats, fr: _Front, bkey, shift: dict, tx: torch.Tensor, ty: torch.Tensor):
    """One position's augmented [X 1]^T [X 1], [X 1]^T Y and sum |Y|^2, shifted by (tx, ty)."""
    d, o, c = fr.d, fr.offset[bkey], fr.width[bkey]
    g = stats.g[fr.key]
    g = torch.cat([g[:, :d + 1], g[:, o:o + c]], 1)
    dy = shift[bkey].double() - ty
    delta = torch.cat([shift[fr.key].double() - tx, dy.new_zeros(1), dy])
    n, sum_y = g[d, d], g[d, d + 1:]
    if not bool(delta.any()):   # the layer's own first position: already in its coordinates
        return g[:, :d + 1], g[:, d + 1:], stats.yy[bkey]
    yy = stats.yy[bkey] + 2 * (dy * sum_y).sum() + n * (dy * dy).sum()
    g = _reshift(g, d, delta)
    return g[:, :d + 1], g[:, d + 1:], yy


def _share_shift(shift: dict) -> None:
    """Every rank takes rank 0's shifts (one all_reduce, ranks other than 0 adding zeros): with the
    same shifts and the same batches, the ranks' float32 products are one process's, and only the
    order of the float64 sums differs. Every rank calls this once, after its first batch (or after
    the loop when it had none)."""
    from composer.distributed import all_reduce_sum, rank_world
    keys = sorted(shift)
    flat = torch.cat([shift[k] for k in keys]).double()
    if rank_world()[0] != 0:
        flat.zero_()
    all_reduce_sum(flat)
    off = 0
    for k in keys:
        shift[k] = flat[off:off + shift[k].numel()].float()
        off += shift[k].numel()


def _reduce(seen: int, held_n: int, fit: _Stats, held: _Stats) -> tuple[int, int]:
    """Sum every rank's float64 statistics (and image counts) with one all_reduce."""
    from composer.distributed import all_reduce_sum
    tensors = fit.tensors() + held.tensors()
    flat = torch.cat([torch.tensor([seen, held_n], dtype=torch.float64, device=tensors[0].device)]
                     + [t.reshape(-1) for t in tensors])
    all_reduce_sum(flat)
    off = 2
    for stats in (fit, held):
        for group in (stats.g, stats.yy):
            for k in sorted(group):
                group[k] = flat[off:off + group[k].numel()].view_as(group[k]).clone()
                off += group[k].numel()
    return int(flat[0]), int(flat[1])


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float, tx: torch.Tensor) -> torch.Tensor:
    """(A + lambda I') theta = B, I' sparing the bias row; lambda relative to the mean of the
    unshifted diagonal sum x_i^2 (what the solution would be on raw [X 1]: the shift only moves b)."""
    d = a.shape[0] - 1
    raw_diag = torch.diagonal(a)[:d] + 2 * tx * a[d, :d] + a[d, d] * tx * tx
    lam = ridge * raw_diag.mean().clamp_min(1e-12)
    reg = a.clone()
    reg.diagonal()[:d] += lam
    try:
        return torch.linalg.solve(reg, b)
    except torch.linalg.LinAlgError:
        return torch.linalg.lstsq(reg, b).solution


def _r2(a: torch.Tensor, b: torch.Tensor, yy: torch.Tensor, theta: torch.Tensor) -> float:
    d = a.shape[0] - 1
    n, ys = a[d, d], b[d]
    sse = yy - 2 * (theta * b).sum() + (theta * (a @ theta)).sum()
    sst = yy - (ys * ys).sum() / n
    return float(1 - sse / sst) if sst > 0 else float("nan")


@torch.no_grad()
def calibrate_route_stats(net: StitchedNetwork, images: Iterable[torch.Tensor], progress=None, *,
                          device: torch.device | str | None = None, precision: str = "fp32",
                          distributed: bool = False) -> int:
    """Re-estimate every stitch's own BatchNorm statistics (`StitchedNetwork.route_stats`) on
    `images`, as the average of per-batch statistics over all of them (BatchNorm's cumulative mode).

    Fronts run once per batch in eval mode on the anchors' statistics (shared prefixes); only the
    BatchNorms behind each stitch point see batch statistics and update that stitch's buffers.
    The anchors themselves are left as they are. Returns the number of images; for networks
    without BatchNorm it is a no-op returning 0.
    device / precision: as for `fit_stitches`. distributed: `images` is this rank's shard; the
    per-batch averages of all ranks are averaged (weighted by their batch counts), which is one
    process's result when every rank's shard is made of the same whole batches.
    """
    from composer.distributed import all_reduce_sum, rank_world
    stitches = [s for s in net.plan.stitches if net.route_bn_names(s)]
    if not stitches:
        return 0
    if device is not None:
        net.to(device)
    device = next(net.parameters()).device
    back_bns = {n: net.get_submodule(n) for s in stitches for n in net.route_bn_names(s)}
    needed: dict[int, set[int]] = defaultdict(set)
    for s in stitches:
        needed[s.route[0].anchor].add(s.route[0].last)
    was_training = net.training
    # momentum is set per batch below; the shared counters must not count this calibration
    saved = {n: (m.momentum, m.num_batches_tracked.clone()) for n, m in back_bns.items()}
    # each back segment's anchor alone over the same blocks and images, for `_relative_to_anchor`; stitches
    # entering an anchor at the same block share one such pass (same input, same BatchNorms)
    shared: dict[tuple, tuple] = {}
    alone = {s.id: [shared.setdefault((seg.anchor, seg.first, tuple(mine)), (seg, route, mine, scratch))
                    for seg, route, mine, scratch in _alone_passes(net, s)] for s in stitches}
    for s in stitches:
        for seg in s.route[1:]:
            needed[seg.anchor].add(seg.first - 1)
    net.eval()
    seen = batches = 0
    try:
        for k, x in enumerate(images):
            x = x.to(device, non_blocking=True)
            with autocast(precision, device):
                outs = prefix_outputs(net, x, needed)   # all in eval mode: anchors keep their statistics
                for s in stitches:
                    # train mode only while this route runs: an anchor behind one stitch point is the
                    # front of others, and its own statistics must not move
                    bns = [back_bns[n] for n in net.route_bn_names(s)]
                    for m in bns:   # 1/(k+1): the running average of the first k+1 batches
                        m.momentum = 1.0 / (k + 1)
                        m.train()
                    first = s.route[0]
                    net.run_from(s, outs[(first.anchor, first.last)], start=first.last + 1)
                    for m in bns:
                        m.eval()
                for seg, route, names, scratch in shared.values():   # the anchors alone, into scratch statistics
                    mine = [back_bns[n] for n in names]
                    for m in mine:
                        m.train()
                    with _statistics_into(mine, scratch):
                        net.run_from(route, outs[(seg.anchor, seg.first - 1)], start=seg.first)
                    for m in mine:
                        m.eval()
            seen += x.shape[0]
            batches += 1
            if progress is not None:
                progress(seen)
        if distributed and rank_world()[1] > 1:
            counts = all_reduce_sum(torch.tensor([seen, batches], dtype=torch.float64))
            seen, total_batches = int(counts[0]), float(counts[1])
            bufs = [b for s in stitches for b in net.route_stats[str(s.id)].buffers()]
            bufs += [b for *_, scratch in shared.values() for b in scratch.buffers()]
            flat = torch.cat([b.double().reshape(-1) * batches for b in bufs])
            all_reduce_sum(flat)
            flat /= max(total_batches, 1.0)
            off = 0
            for b in bufs:
                b.copy_(flat[off:off + b.numel()].view_as(b))
                off += b.numel()
    finally:
        for n, m in back_bns.items():
            m.momentum = saved[n][0]
            m.num_batches_tracked.copy_(saved[n][1])
        net.train(was_training)
    if seen == 0:
        raise ValueError("no calibration images: the data set is empty")
    for sid, passes in alone.items():
        names = net.route_bn_names(net.plan.stitches[sid])
        for _, _, mine, scratch in passes:
            index = [names.index(n) for n in mine]
            _relative_to_anchor(net.route_stats[str(sid)], index, scratch, [back_bns[n] for n in mine])
    return seen


def _alone_passes(net: StitchedNetwork, stitch) -> list[tuple]:
    """(segment, its anchor's own route, the BatchNorms of the stitch in that segment, scratch
    statistics for them) for every segment behind the stitch point: each segment's anchor runs alone
    from the same block, so that its BatchNorms there measure the anchor's own features."""
    names = net.route_bn_names(stitch)
    passes = []
    for seg in stitch.route[1:]:
        # consecutive segments belong to different anchors, and the first segment's BatchNorms are
        # not the stitch's: the stitch's BatchNorms of this anchor all lie in this segment
        mine = [n for n in names if n.startswith(f"anchors.{seg.anchor}.")]
        if mine:
            route = next(s for s in net.plan.stitches if s.is_anchor and s.route[0].anchor == seg.anchor)
            passes.append((seg, route, mine, RouteStats([net.get_submodule(n) for n in mine])))
    return passes


@contextmanager
def _statistics_into(bns: list[nn.Module], scratch: "RouteStats"):
    """BatchNorms `bns` write their running statistics into `scratch` for the duration."""
    saved = [(m.running_mean, m.running_var) for m in bns]
    for i, m in enumerate(bns):
        m._buffers["running_mean"], m._buffers["running_var"] = scratch.mean(i), scratch.var(i)
    try:
        yield
    finally:
        for m, (mean, var) in zip(bns, saved):
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var


@torch.no_grad()
def _relative_to_anchor(stats: RouteStats, index: list[int], anchor_here: RouteStats, bns: list[nn.Module]) -> None:
    """A stitch's statistics as its anchor's own running statistics, moved by how far the stitch's
    features lie from the anchor's on the calibration images (in the anchor's standard deviations).

    Calibration images can come from another domain than the anchor's training data (the CIFAR-10
    training copy is JPEG, the exact test images are not). Statistics measured on them alone make each
    stitch a specialist of that domain; relative to the anchor, a stitch whose features equal its
    anchor's gets exactly the anchor's statistics, and runs as the anchor does on any data."""
    for j, (i, m) in enumerate(zip(index, bns)):   # i: the BatchNorm's index among the stitch's
        mu_s, var_s = stats.mean(i), stats.var(i)
        mu_a, var_a = anchor_here.mean(j), anchor_here.var(j).clamp_min(m.eps)
        scale = (m.running_var / var_a).sqrt()
        mu_s.copy_(m.running_mean + (mu_s - mu_a) * scale)
        var_s.copy_(var_s * m.running_var / var_a)
