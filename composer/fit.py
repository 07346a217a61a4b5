"""Least-squares fitting of every stitching layer from calibration images (SN-Net's init).

For a stitch from front unit j into back unit k, X = front's output of unit j and Y = back's
input of unit k, both as rows (one per token / pixel). We want W, b minimising
||X W^T + b - Y||^2. SN-Net stacks all rows and takes a pseudo-inverse; that needs every row in
memory and, without a cut-off, gets *worse* as calibration grows (pinv's default tolerance drops
real directions). Instead we stream: accumulate the normal equations
    [X 1]^T [X 1]  and  [X 1]^T Y
batch by batch in float64, then solve with a small ridge on W (not b). A layer shared by several
positions (SN-Net's sliding window) sums its positions' equations: one joint least-squares fit.

Fit quality per stitch is R^2 on held-out calibration images (every 5th image), computed from the
same kind of accumulated statistics, so no rows are ever stored.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch

from composer.snnet import StitchedNetwork, prefix_outputs

HOLDOUT_EVERY = 5   # every 5th calibration image is held out for R^2


def _rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        t = t.flatten(2).transpose(1, 2)
    return t.reshape(-1, t.shape[-1]).double()


class _Stats:
    """Sums over rows: X^T X, X^T 1, X^T Y, Y^T Y (trace only), Y^T 1, row count."""

    def __init__(self):
        self.xx, self.xs, self.n = {}, {}, {}
        self.xy, self.yy, self.ys = {}, {}, {}

    @staticmethod
    def _add(d, key, value):
        d[key] = d[key] + value if key in d else value

    def add_x(self, key, x):
        self._add(self.xx, key, x.T @ x)
        self._add(self.xs, key, x.sum(0))
        self._add(self.n, key, x.shape[0])

    def add_y(self, key, y):
        self._add(self.yy, key, (y * y).sum())
        self._add(self.ys, key, y.sum(0))

    def add_xy(self, key, x, y):
        self._add(self.xy, key, x.T @ y)

    def normal_equations(self, fkey, pos):
        """Augmented [X 1]^T [X 1] and [X 1]^T Y for one position (fkey = front, pos = (front, back))."""
        xx, xs, n = self.xx[fkey], self.xs[fkey], self.n[fkey]
        a = torch.zeros(xx.shape[0] + 1, xx.shape[0] + 1, dtype=torch.float64)
        a[:-1, :-1], a[:-1, -1], a[-1, :-1], a[-1, -1] = xx, xs, xs, n
        b = torch.cat([self.xy[pos], self.ys[pos[1]][None]], 0)
        return a, b


@dataclass
class FitReport:
    r2: dict[int, float]          # per stitch id, on held-out calibration images
    images: int                   # calibration images used (fit + held out)
    held_out: int


@torch.no_grad()
def fit_stitches(net: StitchedNetwork, images: Iterable[torch.Tensor], ridge: float = 1e-4,
                 progress=None) -> FitReport:
    """Fit all stitching layers of `net` in place from batches of (already transformed) images.

    progress: optional callable(images_done) for UIs; pass a tqdm wrapper around `images` for CLIs.
    """
    net.eval()
    plan = net.plan
    # positions: stitch id -> (front (anchor, unit), back (anchor, unit-1), layer key)
    positions = {}
    needed: dict[int, set[int]] = defaultdict(set)
    for s in plan.stitches:
        if s.is_anchor:
            continue
        if len(s.route) != 2:
            raise NotImplementedError("fitting routes through more than two anchors")
        f, b = s.route
        positions[s.id] = ((f.anchor, f.last), (b.anchor, b.first - 1), s.layers[0])
        needed[f.anchor].add(f.last)
        needed[b.anchor].add(b.first - 1)
    fit, held = _Stats(), _Stats()
    seen = held_n = 0
    device = next(net.parameters()).device
    for x in images:
        x = x.to(device)
        idx = torch.arange(seen, seen + x.shape[0])
        mask = (idx % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
        seen += x.shape[0]
        held_n += int(mask.sum())
        outs = prefix_outputs(net, x, needed)
        for stats, m in ((fit, ~mask), (held, mask)):
            if not m.any():
                continue
            rows = {}
            for (fkey, bkey, key) in set(positions.values()):
                spec = plan.layers[key]
                if fkey not in rows:
                    rows[fkey] = _rows(outs[fkey][m.to(device)], spec.in_layout)
                if bkey not in rows:
                    rows[bkey] = _rows(outs[bkey][m.to(device)], spec.out_layout)
            for fkey in {p[0] for p in positions.values()}:
                stats.add_x(fkey, rows[fkey])
            for bkey in {p[1] for p in positions.values()}:
                stats.add_y(bkey, rows[bkey])
            for (fkey, bkey) in {(p[0], p[1]) for p in positions.values()}:
                stats.add_xy((fkey, bkey), rows[fkey], rows[bkey])
        if progress is not None:
            progress(seen)
    if seen == 0:
        raise ValueError("no calibration images: the data set is empty")
    if not fit.n:
        fit = held  # a single image: fit on it (R^2 is then in-sample)

    by_layer = defaultdict(list)
    for sid, (fkey, bkey, key) in positions.items():
        by_layer[key].append((fkey, bkey))
    solutions = {}
    for key, poss in by_layer.items():
        a = b = 0
        for fkey, bkey in set(poss):
            ai, bi = fit.normal_equations(fkey, (fkey, bkey))
            a, b = a + ai, b + bi
        theta = _solve(a, b, ridge)
        solutions[key] = theta
        layer = net.stitch_layers[key]
        layer.weight.copy_(theta[:-1].T.to(layer.weight.dtype))
        layer.bias.copy_(theta[-1].to(layer.bias.dtype))

    stats = held if held.n else fit
    r2 = {sid: _r2(stats, fkey, bkey, solutions[key]) for sid, (fkey, bkey, key) in positions.items()}
    return FitReport(r2, seen, held_n if held.n else 0)


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """(A + lambda I') theta = B, lambda relative to A's scale and I' sparing the bias row."""
    d = a.shape[0] - 1
    lam = ridge * (torch.diagonal(a)[:-1].mean().clamp_min(1e-12))
    reg = a.clone()
    reg.diagonal()[:d] += lam
    try:
        return torch.linalg.solve(reg, b)
    except torch.linalg.LinAlgError:
        return torch.linalg.lstsq(reg, b).solution


def _r2(stats: _Stats, fkey, bkey, theta: torch.Tensor) -> float:
    a, b = stats.normal_equations(fkey, (fkey, bkey))
    n = stats.n[fkey]
    yy, ys = stats.yy[bkey], stats.ys[bkey]
    sse = yy - 2 * (theta * b).sum() + (theta * (a @ theta)).sum()
    sst = yy - (ys * ys).sum() / n
    return float(1 - sse / sst) if sst > 0 else float("nan")


@torch.no_grad()
def calibrate_route_stats(net: StitchedNetwork, images: Iterable[torch.Tensor], progress=None) -> int:
    """Re-estimate every stitch's own BatchNorm statistics (`StitchedNetwork.route_stats`) on
    `images`, as the average of per-batch statistics over all of them (BatchNorm's cumulative mode).

    Fronts run once per batch in eval mode on the anchors' statistics (shared prefixes); only the
    BatchNorms behind each stitch point see batch statistics and update that stitch's buffers.
    The anchors themselves are left as they are. Returns the number of images; for networks
    without BatchNorm it is a no-op returning 0.
    """
    stitches = [s for s in net.plan.stitches if net.route_bn_names(s)]
    if not stitches:
        return 0
    back_bns = {n: net.get_submodule(n) for s in stitches for n in net.route_bn_names(s)}
    needed: dict[int, set[int]] = defaultdict(set)
    for s in stitches:
        needed[s.route[0].anchor].add(s.route[0].last)
    was_training = net.training
    # momentum is set per batch below; the shared counters must not count this calibration
    saved = {n: (m.momentum, m.num_batches_tracked.clone()) for n, m in back_bns.items()}
    device = next(net.parameters()).device
    net.eval()
    seen = 0
    try:
        for k, x in enumerate(images):
            x = x.to(device)
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
            seen += x.shape[0]
            if progress is not None:
                progress(seen)
    finally:
        for n, m in back_bns.items():
            m.momentum = saved[n][0]
            m.num_batches_tracked.copy_(saved[n][1])
        net.train(was_training)
    if seen == 0:
        raise ValueError("no calibration images: the data set is empty")
    return seen
