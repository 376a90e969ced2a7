"""The one torch.distributed helper (training, mining and evaluation): ranks sum gradients and
statistics with all_reduce and gather mining states with all_gather.

Started by ``torchrun`` (WORLD_SIZE/RANK in the environment) the process group uses gloo on
CPU and nccl on CUDA; without it every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as tdist  # only for a multi-process run

        t = t.contiguous().clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order; ``[t]`` alone."""
        if self.world == 1:
            return [t]
        import torch.distributed as tdist  # only for a multi-process run

        src = t.contiguous()
        if src.dtype == torch.bool:  # gloo has no bool
            src = src.to(torch.uint8)
        out = [torch.empty_like(src) for _ in range(self.world)]
        tdist.all_gather(out, src)
        return [o.to(t.dtype) for o in out]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist  # only for a multi-process run

            tdist.barrier()


def init_from_env(device: str = "cpu") -> Dist:
    """Join the torchrun process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist  # only for a multi-process run

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size())


def shutdown() -> None:
    import torch.distributed as tdist  # only for a multi-process run

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
