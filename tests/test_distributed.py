"""Two gloo ranks on CPU (torch.multiprocessing.spawn, torchrun's environment variables) give one
process's results: least-squares stitching layers within float64 rounding, the same top-1 and
predictions, per-stitch BatchNorm statistics within float32 rounding; and the helpers."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from composer.distributed import DistGroup, all_reduce_sum, init_from_env, shard, shard_bounds
from composer.evaluate import evaluate_all
from composer.fit import calibrate_route_stats, fit_stitches

N_IMAGES, BATCH = 18, 5     # shards of 10 and 8 images: whole batches of one process's 5-image batches


def _data(seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N_IMAGES, 3, 32, 32, generator=g), torch.randint(0, 10, (N_IMAGES,), generator=g))


def _nets():
    from tests.engine_models import cifar_family, vit_family
    return vit_family(), cifar_family()


def _run(vit, cnn, ds, distributed: bool) -> dict:
    images = lambda: (x for x, _ in DataLoader(ds, batch_size=BATCH))
    report = fit_stitches(vit, images(), distributed=distributed)
    res = evaluate_all(vit, DataLoader(ds, batch_size=BATCH), distributed=distributed)
    fit_stitches(cnn, images(), distributed=distributed)
    calibrate_route_stats(cnn, images(), distributed=distributed)
    return {"vit_layers": {k: v.detach().clone() for k, v in vit.stitch_layers.state_dict().items()},
            "cnn_layers": {k: v.detach().clone() for k, v in cnn.stitch_layers.state_dict().items()},
            "route_stats": {k: v.detach().clone() for k, v in cnn.route_stats.state_dict().items()},
            "r2": report.r2, "fit_images": report.images, "held_out": report.held_out,
            "top1": res.top1, "eval_images": res.images, "predictions": res.predictions}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    group = init_from_env(device="cpu")
    try:
        assert (group.rank, group.world, group.owns_group) == (rank, world, True)
        assert group.sum(rank + 1) == 3 and group.max(rank) == 1
        vit, cnn = _nets()          # seeded: the same anchors on every rank and in the parent
        torch.save(_run(vit, cnn, shard(_data()), distributed=True), f"{out}.{rank}")
    finally:
        group.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # two gloo processes start torch and train: ~40 s
@pytest.mark.slow   # two spawned interpreters (torch + timm imports) fit and evaluate: ~30 s on 2 cores
def test_two_gloo_ranks_equal_one_process(tmp_path):
    torch.set_num_threads(1)        # the ranks' float32 products must be one process's: same kernels
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    vit, cnn = _nets()
    one = _run(vit, cnn, _data(), distributed=False)
    for got in ranks:
        assert (got["fit_images"], got["held_out"], got["eval_images"]) == (N_IMAGES, 3, N_IMAGES)
        # the float64 sums of the two ranks are added in another order: float64 rounding, relative
        # to the equations' size and amplified by their conditioning (~1e3 here), then float32 storage
        for k in ("vit_layers", "cnn_layers"):
            for name, t in one[k].items():
                torch.testing.assert_close(got[k][name], t, rtol=1e-6, atol=1e-7)
        assert got["r2"].keys() == one["r2"].keys()
        assert all(abs(got["r2"][i] - one["r2"][i]) < 1e-9 for i in one["r2"])
        assert got["top1"] == one["top1"]                    # correct counts summed: exact
        assert all(torch.equal(got["predictions"][i], one["predictions"][i]) for i in one["predictions"])
        # per-batch BatchNorm statistics averaged in float32 buffers: float32 rounding
        for name, t in one["route_stats"].items():
            torch.testing.assert_close(got["route_stats"][name], t, rtol=1e-5, atol=1e-6)


def test_shards_are_contiguous_aligned_and_cover_everything():
    for n in (0, 1, 4, 5, 17, 18, 100, 101):
        for world in (1, 2, 3, 7):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))         # contiguous, in rank order
            assert all(start % 5 == 0 or start == n for start, _ in parts)     # fit's held-out images kept
    ds = list(range(18))
    assert [list(shard(ds, r, 2)) for r in range(2)] == [list(range(10)), list(range(10, 18))]
    assert shard(ds, 0, 1) is ds


def test_without_a_group_everything_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = init_from_env(device="cpu")
    assert group == DistGroup(device=torch.device("cpu")) and group.max(4) == 4 and group.sum(2) == 2
    t = torch.ones(3)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    ds = list(range(7))
    assert shard(ds) is ds
    group.close()
