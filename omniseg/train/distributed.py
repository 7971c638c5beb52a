"""Data-parallel plumbing: ``torchrun`` environment, samplers, rank-0 writes, reductions.

Under ``torchrun --nproc-per-node N`` the environment carries ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init_distributed` then joins the process
group (NCCL on CUDA, gloo on CPU). Without them everything runs as a single process and
every helper here degrades to the obvious single-process behaviour.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from omniseg.errors import OmnisegError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the ``torchrun`` process group when the environment describes one.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        timeout_s: collective timeout; generous because evaluation runs on rank 0's pace.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise OmnisegError("--device cuda: CUDA is not available on this machine; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity when single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class GlobalBatchSampler(Sampler[int]):
    """Seeded per-epoch shuffle, split into global batches, each cut into one block per rank.

    Every epoch is a permutation of the dataset (``torch.randperm`` seeded with
    ``seed + epoch``, as ``DistributedSampler`` does); consecutive runs of
    ``num_replicas * batch_size`` indices form global batches (an incomplete last one is
    dropped) and rank ``r`` takes block ``r`` of each. So rank ``r``'s ``k``-th batch in an
    ``N``-process run is exactly micro-batch ``r`` of step ``k`` in a 1-process run with the
    same per-process batch and ``N``-step gradient accumulation: the two runs see the same
    micro-batches (same batch-norm statistics, same loss normalisation), which is what
    makes them agree. ``set_position`` starts part-way through an epoch, for exact resume.
    """

    def __init__(
        self, length: int, *, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.length = length
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.num_samples = (length // (num_replicas * batch_size)) * batch_size

    def set_position(self, epoch: int, start: int) -> None:
        """Epoch to draw, and how many of this rank's samples of it to skip."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        per_global = self.num_replicas * self.batch_size
        mine = [
            int(i)
            for first in range(0, self.num_samples // self.batch_size * per_global, per_global)
            for i in order[first + self.rank * self.batch_size : first + (self.rank + 1) * self.batch_size]
        ]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ShardSampler(Sampler[int]):
    """Sequential indices ``rank, rank + N, ...`` without padding: each evaluation sample is
    seen by exactly one rank, so summed metric counts equal a single-process evaluation."""

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
