"""Why stitches lag their anchors on the 846 exact (lossless) CIFAR-10 test images: two diagnostics.

The fine-tune data (the training set) exists only as JPEG; the anchors were trained on lossless
images. Is the stitches' gap on lossless images the calibration's domain, or the stitch itself?

`--calibration`: least squares (and each stitch's BatchNorm statistics) calibrated on 256 training
JPEGs, and, as a diagnostic only (never the product's protocol: these are test images), on 423 of
the exact test images; both judged on the other 423 exact images against their own anchors' line.

`--one-stitch IDS`: each listed stitch trained alone, anchors frozen (its stitching layer and its own
BatchNorm scale and shift), every step on it (AdamW, batch 64, training JPEGs, hflip), with
`--loss kd` (0.5 cross-entropy with label smoothing 0.1 + 0.5 KL to its last anchor's logits: the
default recipe's loss) or `--loss kl` (distillation only); its gap to the line between the original
anchors (1,000 test JPEGs; the 846 exact images) printed as it trains. `--augment requality`: half
of the training images re-encoded as JPEG at a random quality of 20-70 (a lever that lost).

    python bench/bench_exact_gap.py --calibration
    python bench/bench_exact_gap.py --one-stitch 17 21 38 --loss kd --steps 200
    python bench/bench_exact_gap.py --one-stitch 17 38 --loss kl --steps 200
    python bench/bench_exact_gap.py --one-stitch 17 21 --steps 200 --augment requality
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train import fitted_run, summarise  # noqa: E402
from bench.cifar10 import cifar10_splits, cifar10_train, cifar_anchor_specs, need_cifar  # noqa: E402
from composer import data  # noqa: E402
from composer.evaluate import evaluate_all  # noqa: E402
from composer.fit import calibrate_route_stats, fit_stitches  # noqa: E402
from composer.judge import line_gaps  # noqa: E402
from composer.run import build_network, load_run  # noqa: E402
from composer.train import train_transform  # noqa: E402


def calibration() -> None:
    splits = cifar10_splits()
    cfg = data.data_config(build_network(cifar_anchor_specs(), False).anchors[0])
    exact = data.open_dataset(str(splits.exact846), cfg)
    order = torch.randperm(len(exact), generator=torch.Generator().manual_seed(0)).tolist()
    half = len(exact) // 2
    held = Subset(exact, order[half:])
    for name, calib in (("256 training JPEGs", data.subset(data.open_dataset(str(cifar10_train()), cfg), 256, seed=0)),
                        (f"{half} exact test images (diagnostic only)", Subset(exact, order[:half]))):
        net = build_network(cifar_anchor_specs(), True)
        fit_stitches(net, (x for x, _ in data.loader(calib, 64)))
        calibrate_route_stats(net, (x for x, _ in data.loader(calib, 64)))
        top1 = evaluate_all(net, data.loader(held, 250)).top1
        s = summarise(net.plan, top1, top1)
        print(f"calibrated on {name}; judged on the other {len(held)} exact images: median gap "
              f"{s['median_gap']:+.2f}, worst {s['worst_gap']:+.2f}, within 1 point {s['within']}", flush=True)


class Requality:
    """Training images re-encoded as JPEG at a random lower quality, half of the time: the stitch sees
    the direction in which compression moves images, not one compression level alone."""

    def __init__(self, low: int = 20, high: int = 70, p: float = 0.5):
        self.low, self.high, self.p = low, high, p

    def __call__(self, image):
        import io
        import random

        from PIL import Image
        if random.random() >= self.p:
            return image
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=random.randint(self.low, self.high))
        buf.seek(0)
        return Image.open(buf).convert("RGB")


def one_stitch(ids: list[int], loss_name: str, steps: int, lr: float, work: Path, augment: str = "none") -> None:
    splits = cifar10_splits()
    net = load_run(fitted_run(work, cifar_anchor_specs(), cifar10_train())).net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    plan, cfg = net.plan, data.data_config(net.anchors[0])

    def decoded(folder: Path, limit: int | None):
        xs, ys = zip(*data.loader(data.subset(data.open_dataset(str(folder), cfg), limit, seed=0), 500))
        return torch.cat(xs), torch.cat(ys)

    sets = {"JPEG": decoded(splits.test, 1000), "exact": decoded(splits.exact846, None)}

    @torch.no_grad()
    def top1(sid: int, xy) -> float:
        return 100.0 * float((net.select(sid)(xy[0]).argmax(-1) == xy[1]).float().mean())

    # the line between the ORIGINAL anchors (frozen here, so measured once), per image set
    lines = {}
    for name, xy in sets.items():
        ref = {s.id: top1(s.id, xy) for s in plan.stitches if s.is_anchor}
        ref.update({i: 0.0 for i in ids})
        lines[name] = {g.id: g.top1 - g.gap for g in line_gaps(plan, ref, ref).stitches}
    train_ds = data.open_dataset(str(cifar10_train()), cfg, train=True)
    train_ds.transform = train_transform(cfg, 0.5)
    if augment == "requality":
        from torchvision import transforms
        train_ds.transform = transforms.Compose([Requality(), train_ds.transform])
    batches = data.forever(data.loader(train_ds, 64, shuffle=True), RuntimeError("no training images"))
    anchor_route = {s.route[0].anchor: s for s in plan.stitches if s.is_anchor}
    start = {k: v.clone() for k, v in net.state_dict().items()}
    for sid in ids:
        s = plan.stitches[sid]
        params = [p for k in s.layers for p in net.stitch_layers[k].parameters()]
        params += list(net.route_stats[str(sid)].parameters()) if str(sid) in net.route_stats else []
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def gaps() -> str:
            return "  ".join(f"{n} {top1(sid, xy) - lines[n][sid]:+.2f}" for n, xy in sets.items())

        print(f"stitch {sid} {plan.describe_route(s)}, loss {loss_name}, augment {augment}: least squares: {gaps()}", flush=True)
        t0 = time.time()
        for step in range(1, steps + 1):
            x, y = next(batches)
            with torch.no_grad():
                teacher = net.run(anchor_route[s.route[-1].anchor], x)
            logits = net.run(s, x)
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
            loss = kl if loss_name == "kl" else 0.5 * F.cross_entropy(logits, y, label_smoothing=0.1) + 0.5 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (25, 50, 100, 200, 400, 800) or step == steps:
                print(f"  step {step}: {gaps()}  ({time.time() - t0:.0f} s)", flush=True)
        for p in params:
            p.requires_grad_(False)
        net.load_state_dict(start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", action="store_true", help="least squares calibrated on JPEGs vs lossless images")
    p.add_argument("--one-stitch", type=int, nargs="+", metavar="ID", help="train these stitches alone, anchors frozen")
    p.add_argument("--loss", choices=("kd", "kl"), default="kd")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--augment", choices=("none", "requality"), default="none",
                   help="requality: half of the training images re-encoded as JPEG at quality 20-70")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_exact_gap"), help="the fitted run is cached here")
    args = p.parse_args()
    need_cifar(train=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.calibration:
        calibration()
    if args.one_stitch:
        one_stitch(args.one_stitch, args.loss, args.steps, args.lr, args.work, args.augment)
    if not (args.calibration or args.one_stitch):
        p.error("give --calibration and/or --one-stitch IDS")


if __name__ == "__main__":
    main()
