"""Calling a Hugging Face causal LM the way every row state does.

We hand the model a ready 4D mask (transformers passes it through unchanged): one
mask rule for every model (``masks.py``), no packed-sequence guessing from position
ids. SDPA-style attention takes it boolean, others additive.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from mii_engines.runtime.runner.masks import Mask, MaskRule


def cache_argument(model: Any) -> str:
    """The forward's name for the cache object (transformers 5.2x renamed
    ``past_key_values`` to ``cache``); both releases are served."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFForward:
    """The model's forward with positions, a mask and a cache object chosen by mii."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache_arg = cache_argument(model)
        config = getattr(model, "config", None)
        # SDPA-style implementations take a boolean mask (mii's own among them).
        self.bool_mask = getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "mii_sdpa")
        self.dtype = next(model.parameters()).dtype
        self.mask_rule = MaskRule(config)

    @property
    def window(self) -> Optional[int]:
        """The sliding window of the model's sliding layers, if it has any."""
        return self.mask_rule.window

    def __call__(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor,
                 cache: Any, key_positions: Optional[torch.Tensor] = None,
                 columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last-position logits [rows, vocab] of ``ids`` [rows, queries].

        ``allowed`` [rows, 1, queries, keys] says which keys each query may see (causal
        and padding); ``key_positions`` default to ``positions`` (a prefill: the keys are
        the queries); ``columns`` are the cache columns the new tokens occupy (default:
        the last ``queries`` columns of the mask).
        """
        if columns is None:
            columns = torch.arange(allowed.shape[-1] - ids.shape[1], allowed.shape[-1],
                                   device=self.device)
        mask = self.mask(allowed, positions, positions if key_positions is None
                         else key_positions)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         cache_position=columns, use_cache=cache is not None,
                         logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1, :]

    def mask(self, allowed: torch.Tensor, query_positions: torch.Tensor,
             key_positions: torch.Tensor) -> Mask:
        """Boolean [rows, 1, queries, keys] for SDPA-style attention, additive otherwise;
        per layer type where some layers see a sliding window."""
        mask = self.mask_rule.build(allowed, query_positions, key_positions)
        if self.bool_mask:
            return mask
        if isinstance(mask, dict):
            return {kind: self._additive(part) for kind, part in mask.items()}
        return self._additive(mask)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)
