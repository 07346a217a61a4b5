"""The fused least squares (composer.fit: one float32 GEMM per front key over shifted features,
float64 accumulation and solve) against the previous float64 algorithm, written out here as the
independent reference: rows copied to float64, X^T X, X^T Y per (front, back) pair, Y^T Y, solved
on the raw (unshifted) normal equations with the same ridge."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from composer.costs import positions
from composer.fit import HOLDOUT_EVERY, fit_stitches
from composer.snnet import prefix_outputs
from tests.engine_models import cifar_family, vit_family

EPS32 = torch.finfo(torch.float32).eps


# --- the reference: composer.fit as it was before fusing (float64 everywhere) ----------------------

def _ref_rows(t, layout):
    if layout == "nchw":
        t = t.flatten(2).transpose(1, 2)
    return t.reshape(-1, t.shape[-1]).double()


class _RefStats:
    def __init__(self):
        self.xx, self.xs, self.n, self.xy, self.yy, self.ys = {}, {}, {}, {}, {}, {}

    @staticmethod
    def _add(d, key, value):
        d[key] = d[key] + value if key in d else value

    def add(self, fkey, bkey, x, y, first_x, first_y):
        if first_x:
            self._add(self.xx, fkey, x.T @ x)
            self._add(self.xs, fkey, x.sum(0))
            self._add(self.n, fkey, x.shape[0])
        if first_y:
            self._add(self.yy, bkey, (y * y).sum())
            self._add(self.ys, bkey, y.sum(0))
        self._add(self.xy, (fkey, bkey), x.T @ y)

    def equations(self, fkey, bkey):
        xx, xs, n = self.xx[fkey], self.xs[fkey], self.n[fkey]
        a = torch.zeros(xx.shape[0] + 1, xx.shape[0] + 1, dtype=torch.float64)
        a[:-1, :-1], a[:-1, -1], a[-1, :-1], a[-1, -1] = xx, xs, xs, n
        return a, torch.cat([self.xy[(fkey, bkey)], self.ys[bkey][None]], 0)


@torch.no_grad()
def reference_fit(net, images, ridge):
    """-> ({layer key: (weight, bias)} in float64, {stitch id: R^2}, the layers' solve matrices)."""
    net.eval()
    plan = net.plan
    positions, needed = {}, defaultdict(set)
    for s in plan.stitches:
        if s.is_anchor:
            continue
        f, b = s.route
        positions[s.id] = ((f.anchor, f.last), (b.anchor, b.first - 1), s.layers[0])
        needed[f.anchor].add(f.last)
        needed[b.anchor].add(b.first - 1)
    fit, held = _RefStats(), _RefStats()
    seen = 0
    for x in images:
        mask = (torch.arange(seen, seen + x.shape[0]) % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1
        seen += x.shape[0]
        outs = prefix_outputs(net, x, needed)
        for stats, m in ((fit, ~mask), (held, mask)):
            if not m.any():
                continue
            done_x, done_y = set(), set()
            for fkey, bkey in dict.fromkeys((p[0], p[1]) for p in positions.values()):
                lay_f, lay_b = plan.infos[fkey[0]].layout, plan.infos[bkey[0]].layout
                x_rows, y_rows = _ref_rows(outs[fkey][m], lay_f), _ref_rows(outs[bkey][m], lay_b)
                stats.add(fkey, bkey, x_rows, y_rows, fkey not in done_x, bkey not in done_y)
                done_x.add(fkey)
                done_y.add(bkey)
    if not fit.n:
        fit = held
    by_layer = defaultdict(list)
    for sid, (fkey, bkey, key) in sorted(positions.items()):
        if (fkey, bkey) not in by_layer[key]:
            by_layer[key].append((fkey, bkey))
    layers, thetas, systems = {}, {}, {}
    for key, poss in by_layer.items():
        a = b = 0
        for fkey, bkey in poss:
            ai, bi = fit.equations(fkey, bkey)
            a, b = a + ai, b + bi
        d = a.shape[0] - 1
        reg = a.clone()
        reg.diagonal()[:d] += ridge * torch.diagonal(a)[:-1].mean().clamp_min(1e-12)
        theta = torch.linalg.solve(reg, b)
        thetas[key], systems[key] = theta, reg
        layers[key] = (theta[:-1].T, theta[-1])
    stats = held if held.n else fit
    r2 = {}
    for sid, (fkey, bkey, key) in positions.items():
        a, b = stats.equations(fkey, bkey)
        theta, n = thetas[key], stats.n[fkey]
        sse = stats.yy[bkey] - 2 * (theta * b).sum() + (theta * (a @ theta)).sum()
        sst = stats.yy[bkey] - (stats.ys[bkey] ** 2).sum() / n
        r2[sid] = float(1 - sse / sst)
    return layers, r2, systems


def _centred_condition(reg: torch.Tensor) -> float:
    """Condition number of the ridge-regularised normal equations in centred form (the bias solved
    out): the amplification of relative errors in the products into the weights, whichever shift."""
    d = reg.shape[0] - 1
    n = reg[d, d]
    c = reg[:d, :d] - torch.outer(reg[:d, d], reg[d, :d]) / n
    return float(torch.linalg.cond(c))


def _offset_tokens(net, offset: float) -> None:
    """Add `offset` to every token of every anchor from the embedding on (patch bias and class token):
    the residual stream then carries it through every block, so the features' means sit ~`offset`
    above their spread (~1), where float32 products of unshifted rows would lose ~offset^2 ulps."""
    with torch.no_grad():
        for a in net.anchors:
            a.patch_embed.proj.bias.add_(offset)
            a.cls_token.add_(offset)


def _centred_backward_error(reg, theta_ref, weight, bias) -> tuple[float, float]:
    """How far the fused (W, b) are from solving the reference's float64 equations, relative to
    their size, in centred form (the bias solved out), so that it measures errors relative to the
    features' spread, not their means: normwise backward error of W, and the error of b given W."""
    d = reg.shape[0] - 1
    rhs = reg @ theta_ref                                  # the reference's [X 1]^T Y
    n = reg[d, d]
    c = reg[:d, :d] - torch.outer(reg[:d, d], reg[d, :d]) / n
    cxy = rhs[:d] - torch.outer(reg[:d, d], rhs[d]) / n
    w = weight.double().T
    eta_w = float((c @ w - cxy).norm() / (c.norm() * w.norm() + cxy.norm()))
    mean_x = reg[d, :d] / n
    b_given_w = rhs[d] / n - mean_x @ w
    eta_b = float((bias.double() - b_given_w).norm() / (b_given_w.norm() + mean_x.norm() * w.norm()))
    return eta_w, eta_b


@pytest.mark.parametrize("make,kernel,offset", [(vit_family, 1, 0.0), (vit_family, 2, 1000.0), (cifar_family, 1, 0.0),
                                               (cifar_family, 2, 0.0)],
                         ids=["tokens-own-layers", "tokens-shared-layers-mean-1000", "nchw-own-layers", "nchw-shared-layers"])
def test_fused_fit_equals_float64_reference(make, kernel, offset):
    net = make(kernel=kernel)
    if offset:
        _offset_tokens(net, offset)
    torch.manual_seed(0)
    images = [torch.randn(5, 3, 32, 32) for _ in range(3)] + [torch.randn(2, 3, 32, 32)]
    ridge = 1e-4
    layers, ref_r2, systems = reference_fit(net, images, ridge)
    report = fit_stitches(net, images, ridge=ridge)
    assert report.images == 17 and report.held_out == 3
    # Tolerance = float32 rounding of the fused products. Each per-batch product sums r = rows of a
    # batch (5 images x positions) float32 terms; its relative error is <= r * eps32 in the worst
    # case and ~ sqrt(r) * eps32 with high probability (Higham & Mary, SIAM J. Sci. Comput. 2019),
    # relative to the *shifted* features (hence the offset case: without the shift the error would
    # be relative to the means, ~1e4 times larger here). The float64 accumulation and solve add
    # nothing at this scale. So the fused weights solve the reference's equations with a backward
    # error <= 2 sqrt(r) eps32, and differ from the reference weights by at most that times the
    # condition number of the (centred, regularised) equations; storing them in float32 adds eps32.
    for key, (w_ref, b_ref) in layers.items():
        layer = net.stitch_layers[key]
        r = 5 * max(positions(s, net.plan.infos[0].layout) for s in net.plan.infos[0].out_shapes)
        tol = 2 * math.sqrt(r) * EPS32
        theta_ref = torch.cat([w_ref.T, b_ref[None]])
        eta_w, eta_b = _centred_backward_error(systems[key], theta_ref, layer.weight.detach(), layer.bias.detach())
        assert eta_w <= tol and eta_b <= tol, (key, eta_w, eta_b, tol)
        theta = torch.cat([layer.weight.detach().double().T, layer.bias.detach().double()[None]])
        err = float((theta - theta_ref).norm() / theta_ref.norm())
        assert err <= _centred_condition(systems[key]) * tol + EPS32, (key, err)
    for sid, r2 in report.r2.items():
        # R^2 = 1 - SSE / SST, SSE = yy - 2 theta.b + theta.A.theta from the same sums: each term is
        # at most ~SST in centred form, so |dR^2| <= 4 x the sums' relative error (theta's own error
        # enters only at second order: SSE is stationary at the solution)
        assert abs(r2 - ref_r2[sid]) <= 4 * tol, (sid, r2, ref_r2[sid])


def test_fused_fit_bf16_features_float64_equations():
    """bf16 forward passes: the features are rounded to bf16 (8 bits), the equations are not; the
    layers are then those of the rounded features, close to the fp32 fit (not equal)."""
    net = vit_family(kernel=1)
    images = [torch.randn(5, 3, 32, 32) for _ in range(2)]
    r2_fp32 = fit_stitches(net, images, precision="fp32").r2
    fp32 = {k: l.weight.detach().clone() for k, l in net.stitch_layers.items()}
    r2_bf16 = fit_stitches(net, images, precision="bf16").r2
    for k, l in net.stitch_layers.items():
        assert l.weight.dtype == torch.float32
        rel = float((l.weight.detach() - fp32[k]).norm() / fp32[k].norm())
        assert rel < 0.1, (k, rel)      # 2^-8 rounding of the features, amplified by the solve
    assert all(abs(r2_bf16[i] - r2_fp32[i]) < 0.02 for i in r2_fp32), (r2_fp32, r2_bf16)
