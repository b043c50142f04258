"""Just enough torch.distributed for ``torchrun --nproc_per_node N -m hias_nb ...``.

One process per GPU; rank 0 writes every file. Batches are split evenly (a global batch that does not divide by
the world size is an error, unlike the published code's silent floor division, docs/method.md B31).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "world_size", "rank", "is_main", "all_reduce_sum", "all_gather_object", "barrier",
           "wrap"]  # fmt: skip


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        # leave the group before the interpreter's own teardown: gloo's threads destroyed at exit can abort a rank
        # ("terminate called without an active exception"), seen once in 2-process evaluation
        atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: object) -> list:
    """`obj` of every process, by rank (``[obj]`` alone)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """The module a process trains: `model` itself alone, DDP under torchrun (BatchNorm synchronised across
    processes on GPUs; on CPU each process's BatchNorm sees its share of the batch).

    The conversion replaces BatchNorm layers inside `model`, so `model` (not the wrapper) still holds the weights
    and state-dict keys a checkpoint saves.
    """
    if world_size() == 1:
        return model
    if dist.get_backend() == "nccl":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # gloo (CPU): torch's SyncBatchNorm runs on GPUs only, so each process normalises with its own batch share
    return nn.parallel.DistributedDataParallel(model)
