"""Real scale, side by side in one run: DeiT-Ti/S/B stitched by SN-Net's rules (71 stitches at
real depth), random weights, synthetic images.

For each precision (fp32, bf16 autocast):
- least squares (`composer.fit.fit_stitches`): images/s and peak memory at N images, beside the
  same forward passes alone (`prefix_outputs` over the same batches) and their ratio;
- evaluating every stitch: shared prefixes (`evaluate_all`) vs one forward per stitch
  (`evaluate_naive`), in network-images/s (networks x images / s);
- one training step (forward, cross-entropy, backward, SGD step over the route's parameters):
  the SN-Net at a Ti->S stitch vs the same route as a plain `nn.Sequential` of the same modules,
  and the SN-Net at its DeiT-S anchor vs plain timm DeiT-S: the overhead ratios;
- data: JPEG decode + preprocessing throughput of the data loader alone (`composer.data.loader`,
  in one process and with --workers), beside the model throughputs, saying which one bounds
  training here. The JPEGs are --data, else the team's CIFAR-10 test JPEGs (../shared), else
  synthetic JPEGs written to a temporary folder (32x32 with --small, 500x375 otherwise: an
  ImageNet-sized photo).

    python -m bench.bench_scale --small          # CPU, minutes: DeiT widths at depth 6, 32x32 images
    python -m bench.bench_scale                  # one GPU, < 8 min: DeiT-Ti/S/B at 224x224, 71 stitches
    python -m bench.bench_scale --data /data/imagenet/val --workers 8

Timings: wall seconds with the device synchronised; each measurement runs once after a warm-up.
On a shared CPU the numbers move with the machine's load (say it with them).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ANCHORS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
SMALL = dict(img_size=32, patch_size=8, depth=6)      # real widths and heads, fewer blocks, 17 tokens


# --- measuring ------------------------------------------------------------------------------------

class Clock:
    """Wall time of a block with the device synchronised before and after."""

    def __init__(self, device):
        import torch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, out: list):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        out.append(time.perf_counter() - t0)


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA's allocator on a GPU,
    the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs) on CPU."""

    def __init__(self, device):
        self.device = device

    @contextlib.contextmanager
    def __call__(self, out: list):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            out.append((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
            return
        gc.collect()
        base = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            exact = True
        except OSError:
            exact = False
        before = _status_kib("VmHWM")
        yield
        out.append((_status_kib("VmHWM") - (base if exact else max(base, before))) / 1024)


def _status_kib(field: str) -> int:
    try:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        return 0


# --- the network ---------------------------------------------------------------------------------

def build(small: bool, device):
    import timm
    import torch

    from composer.costs import describe
    from composer.plan import build_plan
    from composer.snnet import StitchedNetwork
    from zoo.adapters import adapt
    kwargs = SMALL if small else {}
    size = (3, SMALL["img_size"], SMALL["img_size"]) if small else (3, 224, 224)
    models = []
    for i, name in enumerate(ANCHORS):
        torch.manual_seed(i)
        models.append(timm.create_model(name, pretrained=False, **kwargs).eval())
    infos = [describe(n, adapt(m), size) for n, m in zip(ANCHORS, models)]
    plan = build_plan(infos)
    order = dict(zip(ANCHORS, models))
    net = StitchedNetwork([order[n] for n in plan.anchors], plan).to(device)
    return net, size


def needed_units(net) -> dict[int, set[int]]:
    needed = defaultdict(set)
    for s in net.plan.stitches:
        if not s.is_anchor:
            needed[s.route[0].anchor].add(s.route[0].last)
            needed[s.route[1].anchor].add(s.route[1].first - 1)
    return needed


class _Call:
    """A function as a module (a part of a route in nn.Sequential); registers no parameters."""

    def __init__(self, fn):
        self.fn = fn


def route_as_sequential(net, stitch):
    """The route of `stitch` as a plain nn.Sequential of the very same modules (shared weights)."""
    from torch import nn

    class Call(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self._fn = _Call(fn)

        def forward(self, x):
            return self._fn.fn(x)

    first, last = stitch.route[0], stitch.route[-1]
    parts = [Call(net.adapters[first.anchor].stem)]
    for i, seg in enumerate(stitch.route):
        ad = net.adapters[seg.anchor]
        parts += [ad.model.get_submodule(m) for u in range(seg.first, seg.last + 1) for m in ad.units[u].modules]
        if i < len(stitch.layers):
            nxt = stitch.route[i + 1]
            layer, shape = net.stitch_layers[stitch.layers[i]], net.plan.infos[nxt.anchor].in_shapes[nxt.first]
            parts.append(Call(lambda x, layer=layer, shape=shape: layer(x, shape)))
    parts.append(Call(net.adapters[last.anchor].head))
    return nn.Sequential(*parts)


# --- the measurements ----------------------------------------------------------------------------

def measure_fit(net, batches, precision, device) -> dict:
    import torch

    from composer.fit import fit_stitches
    from composer.snnet import prefix_outputs
    needed = needed_units(net)
    clock, peak = Clock(device), PeakMemory(device)
    n = sum(len(x) for x in batches)
    fit_stitches(net, batches[:1], precision=precision)          # warm-up (kernels, workspace)
    t_fit, t_fwd, mem = [], [], []
    from composer.device import autocast
    with peak(mem), clock(t_fit):
        report = fit_stitches(net, batches, precision=precision)
    with clock(t_fwd), torch.no_grad(), autocast(precision, device):
        for x in batches:
            prefix_outputs(net, x, needed)
    return {"fit_ips": n / t_fit[0], "forward_ips": n / t_fwd[0], "ratio": t_fit[0] / t_fwd[0], "peak_mb": mem[0],
            "r2_median": sorted(report.r2.values())[len(report.r2) // 2]}


def measure_eval(net, batches, precision, device) -> dict:
    from composer.evaluate import evaluate_all, evaluate_naive
    clock = Clock(device)
    ids = list(range(len(net.plan.stitches)))
    evaluate_all(net, batches[:1], precision=precision)          # warm-up
    t_shared, t_naive = [], []
    with clock(t_shared):
        shared = evaluate_all(net, batches, precision=precision)
    with clock(t_naive):
        naive = evaluate_naive(net, batches, precision=precision)
    n = shared.images
    same = sum(int((shared.predictions[i] == naive.predictions[i]).sum()) for i in ids) / (n * len(ids))
    return {"shared_nips": n * len(ids) / t_shared[0], "naive_nips": n * len(ids) / t_naive[0],
            "speedup": t_naive[0] / t_shared[0], "agree": same}


def measure_train(net, anchor_model, stitch_id, anchor_id, x, y, precision, device, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from composer.device import autocast
    clock = Clock(device)
    stitch = net.plan.stitches[stitch_id]
    seq = route_as_sequential(net, stitch)
    routes = {
        "snnet_stitch": (lambda: net.select(stitch_id), net.route_parameters(stitch)),
        "sequential": (lambda: seq, net.route_parameters(stitch)),
        "snnet_anchor": (lambda: net.select(anchor_id), net.route_parameters(net.plan.stitches[anchor_id])),
        "timm_deit_s": (lambda: anchor_model, list(anchor_model.parameters())),
    }
    out = {}
    net.train()
    for name, (model_fn, params) in routes.items():
        opt = torch.optim.SGD(params, lr=1e-6)     # tiny steps: the weights barely move between routes

        def step():
            model = model_fn()
            with autocast(precision, device):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()                                       # warm-up
        times = []
        for _ in range(steps):
            with clock(times):
                step()
        out[name] = sorted(times)[len(times) // 2]
    net.eval()
    return out


def measure_decode(folder: str, size, batch: int, workers: int, images: int) -> dict:
    """Images/s that the data loader alone decodes and preprocesses (bicubic resize, center crop,
    normalise: timm's eval transform at the model's input size), after its first batch."""
    from composer import data
    cfg = {"input_size": size, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "crop_pct": 0.875, "crop_mode": "center"}
    ds = data.subset(data.open_dataset(folder, cfg), images, seed=0)
    it = iter(data.loader(ds, batch, workers=workers))
    next(it)                                          # workers started, first batch out
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
    dt = time.perf_counter() - t0
    return {"decode_ips": n / dt if n else float("nan"), "images": n}


def decode_folder(given: str | None, small: bool, images: int, tmp: str) -> tuple[str, str]:
    """(ImageFolder, what it is) for the decode measurement: `given`, else CIFAR-10's test JPEGs
    from ../shared, else `images` synthetic JPEGs written under `tmp`."""
    if given:
        return given, given
    from bench import cifar10
    if cifar10.missing_shared_reason() is None:
        return str(cifar10.cifar10_splits().test), "CIFAR-10 test JPEGs (32x32, q75)"
    w, h = (32, 32) if small else (500, 375)
    return synthetic_jpegs(Path(tmp) / "jpegs", images, (w, h)), f"synthetic JPEGs ({w}x{h}, q90)"


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int]) -> str:
    """`n` JPEGs in two class folders: smooth random colour fields with some grain, which compress
    about as photos do (pure noise would make decoding look slower than it is)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 8, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
    return str(folder)


# --- the driver ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU-sized: DeiT widths at depth 6 on 32x32 images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--fit-images", type=int, help="N for least squares (default 1024, --small 256)")
    p.add_argument("--eval-images", type=int, help="images for evaluating every stitch (default 256, --small 16)")
    p.add_argument("--batch-size", type=int, help="default 128, --small 64")
    p.add_argument("--train-batch", type=int, help="default 64, --small 8")
    p.add_argument("--train-steps", type=int, help="timed steps per route (default 10, --small 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--data", help="an ImageFolder of JPEGs for the decode figure (default: CIFAR-10's test "
                                   "JPEGs from ../shared, else synthetic JPEGs)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers for the decode figure")
    p.add_argument("--decode-images", type=int, help="images decoded (default 2048, --small 1024)")
    p.add_argument("--no-decode", action="store_true", help="skip the data decode figure")
    args = p.parse_args(argv)
    small = args.small
    fit_n = args.fit_images or (256 if small else 1024)
    eval_n = args.eval_images or (16 if small else 256)
    batch = args.batch_size or (64 if small else 128)
    train_batch = args.train_batch or (8 if small else 64)
    steps = args.train_steps or (3 if small else 10)
    decode_n = args.decode_images or (1024 if small else 2048)

    import torch

    from composer.device import resolve_device, resolve_precision
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precisions = [resolve_precision(q, device) for q in args.precisions]
    t_start = time.perf_counter()
    net, size = build(small, device)
    n_st = len(net.plan.stitches)
    n_anchors = len(net.plan.anchors)
    torch.manual_seed(0)
    fit_batches = [torch.randn(min(batch, fit_n - i), *size, device=device) for i in range(0, fit_n, batch)]
    eval_batches = [(torch.randn(min(batch, eval_n - i), *size, device=device),
                     torch.randint(0, 1000, (min(batch, eval_n - i),), device=device)) for i in range(0, eval_n, batch)]
    xt, yt = torch.randn(train_batch, *size, device=device), torch.randint(0, 1000, (train_batch,), device=device)
    # a Ti -> S stitch in the middle of its window range, and the DeiT-S anchor
    anchor_s = net.plan.anchors.index(ANCHORS[1])
    ti_s = [s.id for s in net.plan.stitches if not s.is_anchor and [g.anchor for g in s.route] == [0, anchor_s]]
    stitch_id = ti_s[len(ti_s) // 2]
    import timm
    torch.manual_seed(1)
    deit_s = timm.create_model(ANCHORS[1], pretrained=False, **(SMALL if small else {})).to(device)

    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} torch threads")
    print(f"bench_scale on {where}; anchors DeiT-Ti/S/B "
          f"({'depth %d, %dx%d images' % (SMALL['depth'], size[1], size[2]) if small else '224x224, depth 12'}), random "
          f"weights, synthetic images; {n_st} networks ({n_anchors} anchors + {n_st - n_anchors} stitches)")
    rows = defaultdict(dict)
    train_rates: dict[str, float] = {}
    for prec in precisions:
        f = measure_fit(net, fit_batches, prec, device)
        rows["fit: least squares, images/s"][prec] = f"{f['fit_ips']:.1f}"
        rows["fit: its forward passes alone, images/s"][prec] = f"{f['forward_ips']:.1f}"
        rows["fit: time / forward passes alone"][prec] = f"{f['ratio']:.3f}x"
        rows[f"fit: peak memory at {fit_n} images, MiB"][prec] = f"{f['peak_mb']:.0f}"
        rows["fit: median held-out R^2"][prec] = f"{f['r2_median']:.3f}"
        print(f"  fit {prec} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        e = measure_eval(net, eval_batches, prec, device)
        rows["eval all: shared prefixes, network-images/s"][prec] = f"{e['shared_nips']:.1f}"
        rows["eval all: one forward per stitch, network-images/s"][prec] = f"{e['naive_nips']:.1f}"
        rows["eval all: speed-up of shared prefixes"][prec] = f"{e['speedup']:.2f}x"
        rows["eval all: predictions equal (fraction)"][prec] = f"{e['agree']:.4f}"
        print(f"  eval {prec} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        t = measure_train(net, deit_s, stitch_id, anchor_s, xt, yt, prec, device, steps)
        ms = lambda k: f"{1000 * t[k]:.1f}"
        rows[f"train step: SN-Net at stitch {stitch_id} (Ti->S), ms"][prec] = ms("snnet_stitch")
        rows["train step: same route as nn.Sequential, ms"][prec] = ms("sequential")
        rows["train step: overhead SN-Net / Sequential"][prec] = f"{t['snnet_stitch'] / t['sequential']:.3f}x"
        rows[f"train step: SN-Net at anchor {anchor_s} (DeiT-S), ms"][prec] = ms("snnet_anchor")
        rows["train step: plain timm DeiT-S, ms"][prec] = ms("timm_deit_s")
        rows["train step: overhead SN-Net / timm"][prec] = f"{t['snnet_anchor'] / t['timm_deit_s']:.3f}x"
        rows[f"train step: images/s (batch {train_batch}), SN-Net stitch"][prec] = f"{train_batch / t['snnet_stitch']:.1f}"
        train_rates[prec] = train_batch / t["snnet_stitch"]
        print(f"  train {prec} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    cols = precisions
    width = max(len(k) for k in rows) + 2
    print(f"{'':<{width}}" + "".join(f"{c:>12}" for c in cols))
    for name, vals in rows.items():
        print(f"{name:<{width}}" + "".join(f"{vals.get(c, ''):>12}" for c in cols))
    print(f"fit: N = {fit_n} images in batches of {batch}; eval: {eval_n} images x {n_st} networks; train: batch "
          f"{train_batch}, median of {steps} steps, SGD over the route's parameters.")
    if device.type == "cpu" and len(precisions) > 1:
        print("CPU peak memory is the resident high-water mark above the resident size before the fit: memory freed by "
              "the first precision's fit stays resident, so the later columns understate it.")
    if not args.no_decode:
        print_decode(args, small, size, batch, decode_n, train_rates)
    print(f"Total {time.perf_counter() - t_start:.0f} s.")
    return 0


def print_decode(args, small: bool, size, batch: int, images: int, train_rates: dict[str, float]) -> None:
    """The data loader's images/s in one process and with --workers, against the fastest training
    step measured above: when loading gives fewer images/s than a step takes, data bounds training."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        folder, what = decode_folder(args.data, small, images, tmp)
        workers = sorted({0, args.workers})
        rates = {w: measure_decode(folder, size, batch, w, images)["decode_ips"] for w in workers}
    cores = os.cpu_count() or 1
    print(f"data: decode + preprocess to {size[1]}x{size[2]} (timm eval transform) of {what}, batch {batch}:")
    for w, r in rates.items():
        print(f"  {'one process' if w == 0 else f'{w} loader workers ({cores} cores here)'}: {r:.0f} images/s")
    prec, need = max(train_rates.items(), key=lambda kv: kv[1])
    best = max(rates.values())
    verdict = ("data loading bounds training here: add loader workers (--workers) or cores" if best < need else
               f"the model bounds training here ({best / need:.1f}x headroom in loading)")
    print(f"  training consumes {need:.0f} images/s (SN-Net stitch step, {prec}): {verdict}")


if __name__ == "__main__":
    sys.exit(main())
