"""Tensor and expert parallelism over torch.distributed, the scheme of DeepSeek's inference/model.py.

Every rank runs the same program on the same inputs. Attention heads, the dense MLP, the shared
experts and the vocabulary are split across ranks; routed experts are partitioned by index; the
latent projections, norms, router and `eh_proj` are replicated. One all-reduce ends each
attention and each feed-forward layer; the output heads all-gather their vocabulary slices, so every
rank holds the same logits, draws the same samples from the same seeds and takes the same decisions
(no rank needs to broadcast a draft or a stop). Where a decision depends on something that is not
the same on every rank (a wall-clock timing), `broadcast_int` makes rank 0's choice everyone's.

At world size 1 (a plain `mtp-spec` process, or torchrun with one process) nothing here does
anything: the single-process code path, with the parallel layers' shapes equal to the plain ones.
The world is process-wide, as in DeepSeek's code; `using` swaps it for building full-size skeletons.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    grouped: bool = False  # collectives run (size > 1; at size 1 only when a benchmark forces them)

    def part(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, end) of n items split evenly; an uneven split is refused naming `what`."""
        if n % self.size:
            raise ValueError(f"{what} = {n} does not split evenly across world size {self.size}")
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step


_world = World()


def world() -> World:
    return _world


@contextmanager
def using(w: World) -> Iterator[World]:
    """Build or check things as if the world were `w` (e.g. the full-size model, World())."""
    global _world
    old, _world = _world, w
    try:
        yield w
    finally:
        _world = old


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE), at any world size."""
    return "WORLD_SIZE" in os.environ


def init(device: str = "cpu") -> World:
    """Join the process group torchrun describes in the environment (gloo on CPUs, NCCL on GPUs) and
    make it this process's world. On CUDA each rank takes the GPU of its LOCAL_RANK."""
    import torch.distributed as dist

    global _world
    size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    # at world size 1 every collective is the identity: skip them, as DeepSeek's code does
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), grouped=dist.get_world_size() > 1)
    return _world


def shutdown() -> None:
    """Leave the process group together: a rank that exits while others still talk to it (rank 0
    writing a summary) would tear its connections down under them (gloo aborts the process)."""
    global _world
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _world = World()


def set_world(w: World) -> None:
    """Adopt an already initialised process group (tests spawn their own)."""
    global _world
    _world = w


def local_device(device: str | torch.device) -> torch.device:
    """`cuda` means this rank's GPU under a launcher; anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and launched():
        if dev.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"--device {device}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                             "give --device cuda (device: cuda in a config)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def is_main() -> bool:
    return _world.rank == 0


# --- collectives ---------------------------------------------------------------------------------------
# Eager steps call c10d's in-place collectives, the cheapest to launch (H200, NCCL, one rank, 10 per
# decode step: ~0.09 ms each, against ~0.3 ms for the functional ones in eager mode); a step being
# compiled gets the functional ones, which torch.compile traces. Callers pass a fresh tensor they own.
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if not _world.grouped:
        return x
    import torch.distributed as dist

    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as fc

        return fc.wait_tensor(fc.all_reduce(x, op, dist.group.WORLD))
    dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x side by side along the last dim (the vocabulary slices of a head)."""
    if not _world.grouped:
        return x
    import torch.distributed as dist

    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as fc

        gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # the name before torch 2.13
        return fc.wait_tensor(gather(x.contiguous(), x.dim() - 1, dist.group.WORLD))
    out = x.new_empty((_world.size * x.shape[0], *x.shape[1:]))  # ranks' slices stacked along dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x.contiguous())
    return torch.cat(out.chunk(_world.size, 0), -1)


def broadcast_int(v: int) -> int:
    """Rank 0's value of v on every rank (host-side decisions that timings could split)."""
    if not _world.grouped:
        return v
    import torch.distributed as dist

    t = torch.tensor([v], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, 0)
    return int(t)


def broadcast_object(obj):
    """Rank 0's obj (anything picklable) on every rank: what rank 0 alone reads from disk."""
    if not _world.grouped:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def barrier() -> None:
    if _world.grouped:
        import torch.distributed as dist

        dist.barrier()
