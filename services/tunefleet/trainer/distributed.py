"""Data-parallel training across the processes `torchrun` starts (one per GPU).

Every process holds the whole model and trains on its share of each epoch's micro-batches.
After each optimizer step's backward passes, gradients are summed across processes in one
flattened all-reduce; the loss is normalised by the trainable tokens of all processes, so the
update equals a single process's on the combined batch (tunefleet.trainer.sharding shards the
model instead, with FSDP2). Process 0 reports, checkpoints and registers; the others only
train. With one process (no WORLD_SIZE) every call is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    local_rank: int = 0  # the rank among this node's processes

    @classmethod
    def from_environment(cls) -> Distributed:
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if world == 1:
            return cls(0, 1, device, local_rank)
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, device, local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The first process of its node: it fetches what the node's processes read."""
        return self.local_rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This process's share: every world-th item, the same count on every process."""
        if self.world == 1:
            return items
        usable = len(items) // self.world * self.world
        return items[self.rank : usable : self.world]

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def sum_gradients(self, parameters: list[Any]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in parameters if p.grad is not None]
        flat = _flatten_dense_tensors(grads)  # type: ignore[no-untyped-call]
        dist.all_reduce(flat)
        summed_all = _unflatten_dense_tensors(flat, grads)  # type: ignore[no-untyped-call]
        for grad, summed in zip(grads, summed_all, strict=True):
            grad.copy_(summed)

    def broadcast(self, value: T) -> T:
        """The first process's `value`, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
