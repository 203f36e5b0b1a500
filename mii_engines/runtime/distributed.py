"""Broadcasting rank 0's step plans to the other ranks of a tensor-parallel replica.

Plans travel over a dedicated gloo group so that, on GPUs, the tiny per-step
message never queues behind NCCL kernels. Only ranks of one replica, started by
our own launcher, exchange these objects; nothing from the network is unpickled.
"""
from __future__ import annotations

import torch.distributed as dist

from mii_engines.runtime.kv.dynamic import StepPlan


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
