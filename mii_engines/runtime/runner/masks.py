"""Attention masks for models whose layers look back only a window of tokens.

mii hands the model a ready 4D mask, which transformers passes through unchanged, so
a sliding window that the model would otherwise add to its own mask must be in ours:
Mistral (every layer), Gemma 2/3, GPT-OSS, Qwen2 with ``use_sliding_window`` (some
layers). A layer of type "sliding_attention" sees key positions in
(query - window, query], as transformers' ``sliding_window_overlay``. Models with
both layer types take a dict of masks keyed by layer type.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention"}
Mask = Union[torch.Tensor, Dict[str, torch.Tensor]]


def text_config(config: Any) -> Any:
    """The language model's part of ``config`` (itself for a plain causal LM)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class MaskRule:
    """What a model's layers may attend to, read from its config."""

    def __init__(self, config: Any) -> None:
        # A multimodal wrapper (Gemma 3 from 4B up loads as ...ForConditionalGeneration)
        # keeps the language model's settings in its text config.
        config = text_config(config)
        types = list(getattr(config, "layer_types", None) or [])
        unknown = sorted(set(types) - KNOWN_LAYER_TYPES)
        if unknown:
            raise ValueError(f"{type(config).__name__} has layers of type {unknown}; mii's "
                             f"engines serve {sorted(KNOWN_LAYER_TYPES)} only")
        window = getattr(config, "sliding_window", None)
        sliding = isinstance(window, int) and window > 0 and (
            not types or "sliding_attention" in types)
        self.window: Optional[int] = window if sliding else None
        self.mixed = sliding and "full_attention" in types

    def build(self, allowed: torch.Tensor, query_positions: torch.Tensor,
              key_positions: torch.Tensor) -> Mask:
        """The model's mask from ``allowed`` [rows, 1, queries, keys] (causal + padding),
        query positions [rows, queries] and key positions [rows or 1, keys]."""
        if self.window is None:
            return allowed
        near = key_positions[:, None, None, :] > query_positions[:, None, :, None] - self.window
        sliding = allowed & near
        if self.mixed:
            return {"full_attention": allowed, "sliding_attention": sliding}
        return sliding


def left_padded_mask(lengths: torch.Tensor, width: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For prompts right-aligned in ``width`` columns (``lengths`` [rows] on the device,
    0 for a padding row): which columns hold tokens [rows, width], the causal
    [rows, width, width] ``allowed`` mask, and each column's position [rows, width].

    A padding query attends to itself, or its output is NaN and would poison the
    cache of the layers above. Computed on the device from the lengths alone, so a
    captured graph replays it for any prompts.
    """
    device = lengths.device
    column = torch.arange(width, device=device)
    pad = width - lengths[:, None]
    valid = column[None, :] >= pad
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool,
                                                              device=device)[None]
    positions = (column[None, :] - pad).clamp(min=0)
    return valid, allowed, positions
