"""Broadcasting rank 0's step plans to the other ranks of a tensor-parallel replica.

Plans travel over a dedicated gloo group so that, on GPUs, the tiny per-step
message never queues behind NCCL kernels. Only ranks of one replica, started by
our own launcher, exchange these objects; nothing from the network is unpickled.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mii_engines.runtime.plan import StepPlan


class PlanChannel:
    """Rank 0 sends, every other rank receives, in lockstep."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")

    def send(self, plan: StepPlan) -> None:
        """Broadcast ``plan`` from rank 0."""
        dist.broadcast_object_list([plan], src=0, group=self.group)

    def receive(self) -> StepPlan:
        """Wait for rank 0's next plan."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _reduce_min(value: int) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def agree(flag: bool) -> bool:
    """True on every rank only if ``flag`` is true on every rank of the replica (a
    collective: every rank calls it at the same point)."""
    return bool(_reduce_min(1 if flag else 0))


def agree_min(value: int) -> int:
    """The smallest ``value`` over the replica's ranks (a collective)."""
    return _reduce_min(value)
