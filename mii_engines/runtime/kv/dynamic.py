"""The ``dynamic`` KV state: transformers' own growing cache, rows left-padded.

Rows are left-aligned in a shared time axis: each row's tokens occupy the last
columns of the key/value cache, earlier columns are masked padding. Rows join by
prefilling their prompts separately and merging caches (padding the shorter one on
the left), and leave by index selection; columns no live row uses are trimmed.
Positions are per row, so padding never shifts a row's rotary positions. Works for
any model transformers can run; the default on CPU and the fallback on GPUs.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from transformers import DynamicCache

from mii_engines.runtime.kv.interface import KVStats
from mii_engines.runtime.kv.rows import RowState
from mii_engines.runtime.runner.forward import HFForward
from mii_engines.runtime.runner.host_copy import to_device
from mii_engines.runtime.runner.masks import left_padded_mask


class DynamicState(RowState):
    """KV cache, attention mask and positions of the running rows on one rank."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.device = device
        self.forward = HFForward(model, device)
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None  # [rows, columns] of 0/1
        self.positions: Optional[torch.Tensor] = None  # [rows] next position per row

    @property
    def rows(self) -> int:
        """Number of running rows."""
        return 0 if self.mask is None else self.mask.shape[0]

    def warm_up(self) -> float:
        """Nothing to prepare: the cache grows as rows come."""
        return 0.0

    def warm_up_step(self) -> bool:
        """Nothing is left for later."""
        return False

    def stats(self) -> KVStats:
        """Only the kind: the cache has no fixed size."""
        return KVStats(kind="dynamic")

    def decode(self, tokens) -> torch.Tensor:
        """One step for every row."""
        assert self.mask is not None and len(tokens) == self.rows, "decode rows mismatch"
        ids = (tokens if isinstance(tokens, torch.Tensor)
               else torch.tensor(tokens, dtype=torch.long, device=self.device))[:, None]
        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        allowed = self.mask[:, None, None, :].bool()
        keys = self.mask.cumsum(dim=1) - 1 if self.forward.window else None  # key positions
        logits = self.forward(ids, allowed, self.positions[:, None], self.cache, keys)
        self.positions = self.positions + 1
        return logits

    def prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        """Prefill ``prompts`` as new rows after the current ones."""
        ids, lengths = left_padded(prompts, self.device)
        valid, allowed, positions = left_padded_mask(lengths, ids.shape[1])
        cache = DynamicCache()
        logits = self.forward(ids, allowed[:, None], positions, cache)
        self._merge(cache, valid.long(), positions[:, -1] + 1)
        return logits

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self.mask is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2),
                                     _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])

    def select(self, keep: List[int]) -> None:
        """Keep rows ``keep``; trim columns only departed rows used."""
        if not keep:
            self.cache = self.mask = self.positions = None
            return
        if keep == list(range(self.rows)):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        # Columns that only departed rows used are dead weight for every later step.
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def left_padded(prompts: List[List[int]], device: torch.device):
    """Prompts right-aligned in one batch: ids [rows, width] and lengths [rows]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
    return to_device(ids, device), to_device([len(p) for p in prompts], device)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
