"""Process groups for sharded evaluation and training, launched by torchrun.

``torchrun --nproc-per-node N ...`` starts N processes and describes the group in environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `init_distributed` reads
them and joins the group (gloo on CPU, nccl on GPU, one GPU per process); without them it reports
a single process, so every caller runs the same code with or without torchrun. Nothing happens
on import: a process joins a group only when it calls `init_distributed`.

The helpers (`rank_and_world`, `all_reduce_sum`, `barrier`, `destroy_distributed`) are no-ops
in a single process, so loops call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo", "nccl", or None for a single process
    device: str = "cpu"  # where this process should compute

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prints and writes shared outputs."""
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or report a single process.

    Uses nccl when CUDA is available and `device` is not "cpu", gloo otherwise; with nccl each
    process uses GPU LOCAL_RANK. Safe to call twice: an initialised group is reused.

    Args:
        device: "cpu" forces gloo and CPU; None picks CUDA when available.

    Returns:
        rank, world size, local rank, backend and the device this process should compute on.
    """
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if is_distributed():
        backend = dist.get_backend()
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    else:
        return DistributedContext(device=device or ("cuda" if use_cuda else "cpu"))
    compute = f"cuda:{local_rank}" if backend == "nccl" else (device or "cpu")
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), local_rank, str(backend), compute
    )


def is_distributed() -> bool:
    """True when this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of `tensor` over all ranks, on the CPU, identical on every rank.

    In a single process `tensor` itself is returned. With nccl the sum is taken on this rank's
    GPU (nccl reduces CUDA tensors only) and copied back.

    Args:
        tensor: the same shape and dtype on every rank.

    Returns:
        The summed tensor (a new one when there is more than one rank).
    """
    if rank_and_world()[1] == 1:
        return tensor
    on_gpu = dist.get_backend() == "nccl"
    reduced = tensor.to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, identical on every rank.

    In a single process `tensor` itself is returned. The result carries no gradient (use it for
    values, e.g. the frozen text embeddings of every rank's captions). With nccl the gather runs
    on this rank's GPU and the result stays on `tensor`'s device.

    Args:
        tensor: the same shape and dtype on every rank.
    """
    world = rank_and_world()[1]
    if world == 1:
        return tensor
    on_gpu = dist.get_backend() == "nccl"
    local = tensor.detach().to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts).to(tensor.device)


def barrier() -> None:
    """Wait until every rank gets here (e.g. before rank 0 reads what all ranks wrote)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def destroy_distributed() -> None:
    """Leave the process group, if this process is in one (at the end of a run)."""
    if is_distributed():
        dist.destroy_process_group()
