"""Distributed data parallel helpers for ``torchrun`` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def check_device_name(device: str | torch.device) -> None:
    """``ValueError`` unless ``device`` is ``auto`` or a name torch knows (``cpu``,
    ``cuda``, ``cuda:1``, ``mps``...); whether it is present is `resolve_device`'s check."""
    if str(device) == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:<index>"
                         ) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> this process's CUDA device when CUDA is present, else the CPU.

    A device that is not there (``cuda`` on a machine without CUDA, ``cuda:3`` with two
    GPUs, ``mps`` off Apple) or an unknown name is a one-line ``ValueError``."""
    if str(device) != "auto":
        check_device_name(device)
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {str(device)!r}: CUDA is not available on this "
                                 "machine (use --device cpu or auto)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {str(device)!r}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` > 1 this is a no-op returning rank 0 of 1. The backend is
    nccl for CUDA devices and gloo otherwise.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return current(dev)


def current(device: str | torch.device = "auto") -> DistInfo:
    """This process's ``DistInfo`` from the (possibly uninitialised) default process group."""
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, dev)
    return DistInfo(0, 1, 0, dev)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped ``tensor``, in rank order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
