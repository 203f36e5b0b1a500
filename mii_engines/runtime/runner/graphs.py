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


def row_buckets(max_rows: int) -> List[int]:
    """Row counts that get a graph: 1, 2, 4, 8, every multiple of 8 to 64, then every
    multiple of 32. Requests that arrive over a few steps join in uneven groups (say
    20): padding 20 rows to 32 costs more than to 24 where a step is small. Above 64 rows
    a step's GEMMs still read every weight once, so a few padded rows cost little, while
    each graph costs a capture (0.4 s each when 34 decode graphs took 13.6 s of the
    1.5B's warm-up; ~0.1 s once one compile serves them, H200, 2026-12-02); 256 rows
    need 17 graphs, not 35."""
    sizes = [r for r in (1, 2, 4) if r < max_rows] + list(range(8, min(max_rows, 65), 8))
    sizes += list(range(96, max_rows, 32))
    return [r for r in sizes if r < max_rows] + [max_rows]


def token_buckets(max_tokens: int, smallest: int = 16) -> List[int]:
    """Token counts of mixed steps that get a graph: powers of two to 512, then steps of
    a quarter of the power below (768, 1024, 1280, ...): at most ~25 % padding."""
    sizes, size = [], smallest
    while size < min(512, max_tokens):
        sizes.append(size)
        size *= 2
    step = 256
    while size < max_tokens:
        sizes.append(size)
        if size >= 4 * step:
            step *= 2
        size += step
    return sizes + [max_tokens]
