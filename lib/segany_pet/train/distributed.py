"""torch.distributed for the trainer: one process per device, launched by torchrun.

    torchrun --nproc_per_node=2 -m segany_pet.train --config train.json

The trainer calls `start_distributed` itself: under torchrun (WORLD_SIZE > 1 in the environment) it joins the
process group, gloo on CPU and NCCL when every rank has a GPU; otherwise it runs as a single process.
Only rank 0 validates, saves and logs; the others wait at a barrier, whose timeout (DISTRIBUTED_TIMEOUT)
must cover a validation.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context initialised the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (a stop request seen by one rank stops all)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def start_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun describes in the environment, or a single-process context.

    ``device``: "cpu", "cuda" or None (a GPU per rank when there are enough, else the CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    else:
        use_cuda = device.startswith("cuda")
    the_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(the_device)
    if world_size <= 1:
        return DistributedContext(0, 1, the_device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=DISTRIBUTED_TIMEOUT)
        owns = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), the_device, owns)
