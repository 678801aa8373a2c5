"""This process's place under torchrun (torch.distributed): its shard, gathering to rank 0, a barrier."""

from __future__ import annotations

import os
from typing import Any

import torch


class Distributed:
    """This process's place under torchrun: `shard = (rank, world_size)`; gathers scan results to rank 0."""

    def __init__(self, rank: int, world: int, owns_group: bool):
        self.rank, self.world, self.owns_group = rank, world, owns_group

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @classmethod
    def from_env(cls) -> Distributed | None:
        """None unless launched with WORLD_SIZE > 1; joins (or reuses) the process group (gloo)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # CPU tensors are gathered; env:// as torchrun sets it
            owns = True
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def gather(self, results: Any) -> list[Any] | None:
        """Every rank's `results` (any picklable object), in rank order, on rank 0; None on the other ranks."""
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(results, parts, dst=0)
        return parts if self.rank == 0 else None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
