"""Host-to-device copies that do not wait for the GPU.

A copy from ordinary (pageable) host memory makes CUDA drain the stream first, so in
the pipelined loop every such copy would stall the host until the step in flight
finished and the GPU would then idle while the next step is launched. Staging through
pinned memory (PyTorch caches those blocks and keeps each alive until its copy ran)
makes the copy asynchronous.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch


def to_device(values: Union[Sequence, torch.Tensor], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without synchronizing on CUDA."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
