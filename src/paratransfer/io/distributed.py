"""This process's place in a data-parallel run (torchrun / accelerate launch), shared by
sensitivity and training: join the process group the launcher describes, sum across processes.

Under `torchrun --nproc_per_node N` or `accelerate launch` (WORLD_SIZE > 1) the group uses gloo
on CPU and nccl on GPU; run alone, everything here is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun / accelerate describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not torch.distributed.is_initialized()
    if owns:
        _import_model_loading()
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, owns), device


def _import_model_loading() -> None:
    """Import transformers' model loading before the process group exists, not after.

    Imported while a group exists, `torch.distributed.fsdp` (which transformers' model loading
    imports) keeps a reference to it: `destroy_process_group` then leaves the group's gloo
    threads running until the interpreter shuts down, and a process ending with them alive can
    abort ("terminate called without an active exception"), as it did under load. Imported
    first, destroying the group stops its threads.
    """
    import transformers.modeling_utils  # noqa: F401


def sum_across_processes(tensors: list[torch.Tensor], dist: Dist) -> None:
    """In-place sum over processes with a single all-reduce of one flat buffer."""
    if dist.world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
