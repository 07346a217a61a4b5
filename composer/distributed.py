"""Several processes, one result: join the torchrun group, shard the data, sum what each rank counted.

Launched by torchrun (WORLD_SIZE > 1 in the environment), every rank calls `init_from_env()`,
takes its own contiguous part of the data set (`shard`), and the library sums what ranks computed
(`fit_stitches(..., distributed=True)` sums the least-squares normal equations in float64,
`evaluate_all(..., distributed=True)` the correct counts), so N ranks give the top-1 and the
stitching layers of one process (the layers within float64 rounding). Without torchrun everything
here is a no-op: one process, rank 0 of 1.

Why contiguous shards and not `DistributedSampler`: the sampler pads the last ranks with repeated
images so that all ranks have equally many, which would count those images twice; and fitting holds
out every 5th image by its position, which a contiguous shard starting at a multiple of 5 keeps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

ALIGN = 5   # = composer.fit.HOLDOUT_EVERY: shards start at multiples of it (fit's held-out images stay the same)


@dataclass
class DistGroup:
    """This process's place in the group; rank 0 of 1 when not launched by torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False      # this process created the group (and `close` destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def max(self, value: int) -> int:
        """The largest value over all ranks, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum(self, value: int | float) -> int | float:
        """The sum of `value` over all ranks, on every rank (float64: integers exact below 2**53)."""
        if self.world == 1:
            return value
        t = all_reduce_sum(torch.tensor([value], dtype=torch.float64))
        return type(value)(t.item())

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def init_from_env(device: torch.device | str | None = None) -> DistGroup:
    """Join the torchrun group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), else a no-op group.

    device: where this rank computes; default cuda:LOCAL_RANK when CUDA is available, else the CPU.
    A group that is already initialised (by accelerate, a test) is joined, not re-created."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device is None:
        device = torch.device(f"cuda:{local}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    device = torch.device(device)
    import torch.distributed as dist
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistGroup(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistGroup(dist.get_rank(), dist.get_world_size(), local, device, owns)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) when there is none."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_world()[1] > 1


def shard_bounds(n: int, rank: int, world: int, align: int = ALIGN) -> tuple[int, int]:
    """[start, stop) of rank's contiguous part of n items: parts of equal size (a multiple of `align`)
    but the last ones, which may be shorter or empty."""
    per = -(-n // world)                     # ceil
    per = -(-per // align) * align           # rounded up to a multiple of align
    start = min(n, rank * per)
    return start, min(n, start + per)


def shard(dataset: Dataset, rank: int | None = None, world: int | None = None, align: int = ALIGN) -> Dataset:
    """This rank's contiguous part of `dataset` (the whole data set in one process). Concatenated in
    rank order the parts are the data set in its order, each image exactly once."""
    if rank is None or world is None:
        rank, world = rank_world()
    if world == 1:
        return dataset
    start, stop = shard_bounds(len(dataset), rank, world, align)
    return Subset(dataset, range(start, stop))


def _comm_device() -> torch.device:
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, and return it (unchanged in one process). Works for a
    tensor on any device with either backend (copied through the backend's device if needed)."""
    rank, world = rank_world()
    if world == 1:
        return tensor
    import torch.distributed as dist
    comm = _comm_device()
    if tensor.device == comm:
        dist.all_reduce(tensor)
        return tensor
    t = tensor.to(comm)
    dist.all_reduce(t)
    tensor.copy_(t)
    return tensor


def all_gather_objects(obj) -> list:
    """`obj` of every rank, in rank order ([obj] in one process)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
