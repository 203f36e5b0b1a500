"""Decode attention for grouped-query models without copying the keys and values.

With one query token per row, the query heads that share a key/value head can stand
as that head's query *positions*: [rows, kv_heads, group, dim] against keys
[rows, kv_heads, length, dim] is plain multi-head attention, which SDPA's fused
kernels run with the row's mask broadcast. Transformers instead repeats every key
and value ``group`` times (``repeat_kv``) whenever a mask is given, which at 64 rows
of a 512-token slot cache copies ~0.5 GB per step for a 1B Llama. Prompts (more than
one query token) take transformers' own SDPA path.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch.nn import functional as F

NAME = "mii_sdpa"


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs: Any
                             ) -> Tuple[torch.Tensor, None]:
    """Transformers' attention-function signature; output [rows, queries, heads, dim]."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    if queries != 1 or heads == kv_heads or kwargs.get("softcap") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                         scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model: Any) -> bool:
    """Switch an SDPA model to :func:`grouped_decode_attention`; False if it is not SDPA."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_decode_attention)
    model.set_attn_implementation(NAME)
    return True
