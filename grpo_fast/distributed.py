"""Data parallelism for the online trainer: the process group that `torchrun` or `accelerate
launch` set up the environment for, and the few collectives the step needs.

    torchrun --nproc_per_node 2 --no-python grpo-fast train --config configs/tiny-online.yaml
    accelerate launch --num_processes 2 -m grpo_fast.cli train --config configs/tiny-online.yaml

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` joins
the group they describe (NCCL on CUDA, gloo on CPU) and pins each process to its GPU. Without
them (a plain `grpo-fast train`) it is a world of one and every collective here is the
identity, so the single-process path runs exactly as before. The online trainer keeps a
prompt's G completions on one rank and gathers what the step needs across ranks (rewards for
the advantages, token counts for the global normalizer, metrics and completions for the logs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes the run directory (logs, checkpoints, the final model)."""
        return self.rank == 0


def setup() -> World:
    """Join the launcher's process group (once per process); a world of one without a launcher."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def gather_tensor(world: World, tensor: Tensor) -> Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along dim 0, in rank order."""
    if world.size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(world: World, obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def sum_across(world: World, value: Tensor) -> Tensor:
    """The sum of `value` over ranks (a new tensor)."""
    value = value.clone()
    if world.size > 1:
        dist.all_reduce(value)
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
