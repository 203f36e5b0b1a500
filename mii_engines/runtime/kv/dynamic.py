"""The model-side state of a running batch and the three operations every rank applies.

Rows are left-aligned in a shared time axis: each row's tokens occupy the last
columns of the key/value cache, earlier columns are masked padding. Rows join by
prefilling their prompts separately and merging caches (padding the shorter one on
the left), and leave by index selection; columns no live row uses are trimmed.
Positions are per row, so padding never shifts a row's rotary positions.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from transformers import DynamicCache

from mii_engines.runtime.runner.host_copy import to_device
from mii_engines.runtime.runner.masks import Mask, MaskRule

# Padded prompt tokens (rows x longest prompt) admitted per step; a longer single prompt
# still joins alone. Bounds a prefill's memory and, when nothing else runs, its length.
PREFILL_TOKENS_PER_STEP = 8192
# The same while other rows are decoding: a prefill stalls their next token, so joiners
# come in smaller groups (~12 ms for a 1B model on an H100 rather than ~50 ms).
PREFILL_TOKENS_WHILE_DECODING = 2048


@dataclass
class StepPlan:
    """What every rank does in one step; rank 0 builds it and broadcasts it."""

    keep: Optional[List[int]] = None  # rows to keep (None: keep all)
    decode: Optional[Any] = None  # one input token per kept row (list, or a device tensor)
    prefill: Optional[List[List[int]]] = None  # prompts of rows joining after the kept ones
    shutdown: bool = False


def _cache_argument(model: Any) -> str:
    # transformers 5.2x renamed past_key_values to cache; accept both releases.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BatchState:
    """KV cache, attention mask and positions of the running rows on one rank."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache_arg = _cache_argument(model)
        config = getattr(model, "config", None)
        # SDPA-style implementations take a boolean mask (ours is one, see attention.py).
        self.bool_mask = getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "mii_sdpa")
        self.dtype = next(model.parameters()).dtype
        self.mask_rule = MaskRule(config)
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None  # [rows, columns] of 0/1
        self.positions: Optional[torch.Tensor] = None  # [rows] next position per row

    @property
    def rows(self) -> int:
        """Number of running rows."""
        return 0 if self.mask is None else self.mask.shape[0]

    def apply(self, plan: StepPlan) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Run ``plan``; return last-position logits of decoded rows and of prefilled rows."""
        if plan.keep is not None:
            self._select(plan.keep)
        decoded = self._decode(plan.decode) if plan.decode is not None else None
        prefilled = self._prefill(plan.prefill) if plan.prefill else None
        return decoded, prefilled

    def _forward(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor,
                 cache: Any, key_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last-position logits. ``key_positions`` default to ``positions`` (a prefill:
        the keys are the queries)."""
        # We hand the model a ready 4D mask (transformers passes it through unchanged):
        # one mask rule for every model, no packed-sequence guessing from position_ids.
        columns = torch.arange(allowed.shape[-1] - ids.shape[1], allowed.shape[-1],
                               device=self.device)
        mask = self._mask_for_model(allowed, positions,
                                    positions if key_positions is None else key_positions)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         cache_position=columns, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: cache})
        return out.logits[:, -1, :]

    def _mask_for_model(self, allowed: torch.Tensor, query_positions: torch.Tensor,
                        key_positions: torch.Tensor) -> Mask:
        """Boolean [rows, 1, queries, keys] for SDPA-style attention, additive otherwise;
        per layer type where some layers see a sliding window (masks.py)."""
        mask = self.mask_rule.build(allowed, query_positions, key_positions)
        if self.bool_mask:
            return mask
        if isinstance(mask, dict):
            return {kind: self._additive(part) for kind, part in mask.items()}
        return self._additive(mask)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    def _decode(self, tokens: List[int]) -> torch.Tensor:
        assert self.mask is not None and len(tokens) == self.rows, "decode rows mismatch"
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        allowed = self.mask[:, None, None, :].bool()
        keys = self.mask.cumsum(dim=1) - 1 if self.mask_rule.window else None  # positions
        logits = self._forward(ids, allowed, self.positions[:, None], self.cache, keys)
        self.positions = self.positions + 1
        return logits

    def _prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        ids, mask, positions, allowed = left_padded(prompts, self.device)
        cache = DynamicCache()
        logits = self._forward(ids, allowed[:, None], positions, cache)
        self._merge(cache, mask, positions[:, -1] + 1)
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

    def _select(self, keep: List[int]) -> None:
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


def left_padded(prompts: List[List[int]], device: torch.device
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch: ids, 0/1 mask, positions, [rows, q, k] allowed."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = to_device(ids, device), to_device(mask, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    # A padding query must attend to something (itself), or its output is NaN and
    # would poison the cache of the layers above.
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
    return ids, mask, positions, allowed


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
