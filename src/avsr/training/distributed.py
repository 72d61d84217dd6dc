"""Process-group setup for one process, one GPU, or many (``torchrun``), and model wrapping.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; with ``WORLD_SIZE > 1`` the group
is initialised with NCCL on GPUs or gloo on CPUs (``env://`` rendezvous, so multi-node launches
work unchanged). On GPUs, batch-norm layers (the ResNet frontends) become ``SyncBatchNorm``;
on CPU they stay per-process (``SyncBatchNorm`` is GPU-only) and DDP broadcasts rank 0's
running statistics every forward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and tensorboard."""
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (this rank's GPU if any, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises ``ValueError`` for a CUDA device on a machine without one, or an unknown spec.
    """
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device is '{spec}' but no CUDA device is available")
        return torch.device("cuda", local_rank) if spec == "cuda" else torch.device(spec)
    raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got '{spec}'")


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the ``torchrun`` environment and join the process group when ``WORLD_SIZE > 1``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        log.info("joined process group: rank %d of %d (%s, %s)", rank, world_size, backend, dev)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``model`` on ``env.device``; under DDP with SyncBatchNorm (GPU) and wrapped in DDP."""
    model = model.to(env.device)
    if not env.distributed:
        return model
    if env.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("converted %d batch-norm layers to SyncBatchNorm",
                 sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()))
        return DistributedDataParallel(model, device_ids=[env.device.index], output_device=env.device.index,
                                       find_unused_parameters=find_unused_parameters)
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum of ``values`` over ranks (returned unchanged when not distributed)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
