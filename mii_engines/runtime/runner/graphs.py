"""CUDA graphs of the fast path: how a forward is captured, and the bucket sizes."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch


def capture(forward: Callable[[], torch.Tensor], device: torch.device, pool: Any,
            warmups: int = 1) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``forward`` ``warmups`` times on a side stream (as CUDA requires before a
    capture; it also lets torch.compile and cuBLAS settle), then capture it into a graph
    that allocates from ``pool``. Returns the graph and its output tensor."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output


def doubling(start: int, limit: int) -> List[int]:
    """Bucket sizes for graphs: start, 2*start, 4*start, ... below ``limit``, then ``limit``."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]
