"""CUDA graphs for prefills into the slot cache, one per (rows, width) bucket.

An eager forward of a 16-layer Hugging Face model costs ~20 ms of Python and kernel
launches whatever its size, so a single 128-token prompt took as long to prefill as
13 decode steps. Prompts are left-padded to a width bucket (16, 32, 64, 128, 192, ...) and
the batch to a row bucket (1, 2, 4, 8, then multiples of 8), within the per-step
prompt-token budget;
each pair is captured once and replayed. Everything that depends on the prompts is
computed inside the graph from three small inputs: the padded ids, each row's length,
and the first slot. Padding rows (length 0) write only the scratch column of a slot.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mii_engines.runtime.runner.graphs import capture, row_buckets
from mii_engines.runtime.runner.host_copy import Staging
from mii_engines.runtime.runner.masks import left_padded_mask

log = logging.getLogger(__name__)


def _widths(smallest: int, widest: int) -> List[int]:
    """16, 32, 64, then steps of 64 up to 512 (padding wastes at most 64 tokens a row
    where prompts usually are), then powers of two; always ending at ``widest``."""
    sizes = [w for w in (16, 32, 64) if smallest <= w < widest]
    sizes += [w for w in range(128, min(widest, 513), 64) if w < widest]
    size = 1024
    while size < widest:
        sizes.append(size)
        size *= 2
    return sizes + [widest]


def prefill_into_slots(state: Any, ids: torch.Tensor, lengths: torch.Tensor,
                       start: Union[int, torch.Tensor]) -> torch.Tensor:
    """Prefill left-padded ``ids`` [rows, width] into the slots from ``start`` on; the
    mask, positions and slot columns are computed on the device from each row's length
    (0 for a padding row), so a captured graph replays it for any prompts."""
    rows, width = ids.shape
    valid, allowed, positions = left_padded_mask(lengths, width)
    columns = torch.where(valid, positions, state.max_len)  # padding -> scratch column
    slots = (start + torch.arange(rows, device=ids.device)).clamp(max=state.max_rows - 1)
    state.cache.prefill_to = (slots[:, None], columns)
    try:
        return state.forward(ids, allowed[:, None], positions, state.cache)
    finally:
        state.cache.prefill_to = None


class PrefillGraphs:
    """Captured prefills of a :class:`~mii_engines.runtime.kv.slots.SlotState` (CUDA only)."""

    def __init__(self, state: Any, token_budget: int, min_width: int = 16) -> None:
        self.state = state
        # Longer prompts (rare, and compute-bound anyway) are prefilled eagerly.
        widest = min(state.max_len, token_budget)
        self.widths = _widths(min_width, widest)
        self.row_buckets = row_buckets(state.max_rows)
        self.padded_rows = 0  # rows computed only to fill a bucket (a batching figure)
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        device, rows, width = state.device, state.max_rows, self.widths[-1]
        self.ids = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.start = torch.zeros(1, dtype=torch.long, device=device)
        self.staging = Staging((rows + 1, width + 1), device)
        # Twice the budget: admitted prompts fit it, their padded bucket may not.
        self._shapes = [(r, w) for w in self.widths for r in self.row_buckets
                        if r == 1 or r * w <= 2 * token_budget]

    def shapes(self) -> List[Tuple[int, int]]:
        """Every (rows, width) bucket that gets a graph."""
        return self._shapes

    def bucket(self, rows: int, width: int) -> Optional[Tuple[int, int]]:
        """The smallest captured shape holding ``rows`` prompts of up to ``width`` tokens."""
        fits = [(r, w) for r, w in self._shapes if r >= rows and w >= width]
        return min(fits, key=lambda shape: shape[0] * shape[1]) if fits else None

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        return prefill_into_slots(self.state, self.ids[:rows, -width:], self.lengths[:rows],
                                  self.start)

    def capture_all(self, pool: Any) -> int:
        """Capture every bucket, largest first (so smaller ones reuse its pool memory)."""
        for rows, width in sorted(self.shapes(), key=lambda s: -s[0] * s[1]):
            self._capture(rows, width, pool)
        log.info("captured %d prefill graphs (rows x width buckets)", len(self.graphs))
        return len(self.graphs)

    def _capture(self, rows: int, width: int, pool: Any) -> None:
        self.lengths.zero_()  # all padding rows: writes go to scratch columns only
        self.graphs[(rows, width)] = capture(lambda: self._forward(rows, width),
                                             self.state.device, pool)

    def run(self, prompts: List[List[int]], replay: bool = True) -> Optional[torch.Tensor]:
        """Logits of the prompts' last tokens, or None when no captured shape fits.

        ``replay=False`` runs the same bucketed forward eagerly (how CPU tests check it).
        """
        shape = self.bucket(len(prompts), max(len(p) for p in prompts))
        if shape is None or (replay and shape not in self.graphs):
            return None
        rows, width = shape
        self.padded_rows += rows - len(prompts)
        full = self.ids.shape[1]
        staging = self.staging.acquire()
        staging[:rows + 1].zero_()
        for row, prompt in enumerate(prompts):  # right-aligned: left padding
            staging[row, full - len(prompt):full] = torch.tensor(prompt, dtype=torch.long)
            staging[row, full] = len(prompt)
        staging[rows, 0] = self.state.rows
        self.ids[:rows].copy_(staging[:rows, :full], non_blocking=True)
        self.lengths[:rows].copy_(staging[:rows, full], non_blocking=True)
        self.start.copy_(staging[rows, :1], non_blocking=True)
        self.staging.queued()
        if not replay:
            return self._forward(rows, width)[:len(prompts)]
        graph, output = self.graphs[shape]
        graph.replay()
        return output[:len(prompts)]
