"""Host-to-device copies that do not wait for the GPU.

A copy from ordinary (pageable) host memory makes CUDA drain the stream first, so in
the pipelined loop every such copy would stall the host until the step in flight
finished and the GPU would then idle while the next step is launched. Staging through
pinned memory (PyTorch caches those blocks and keeps each alive until its copy ran)
makes the copy asynchronous.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch


def to_device(values: Union[Sequence, torch.Tensor], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without synchronizing on CUDA."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Staging:
    """A pinned host buffer reused for asynchronous copies into fixed device inputs."""

    def __init__(self, shape: Tuple[int, ...], device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.buffer = torch.zeros(shape, dtype=torch.long, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    def acquire(self) -> torch.Tensor:
        """The buffer, once the copies queued out of it last time have run."""
        if self._copied is not None:
            self._copied.synchronize()
        return self.buffer

    def queued(self) -> None:
        """Call after queueing this round's ``non_blocking`` copies out of the buffer."""
        if self._copied is not None:
            self._copied.record()
