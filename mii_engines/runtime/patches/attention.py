"""Decode attention for grouped-query models without copying the keys and values.

With one query token per row, the query heads that share a key/value head can stand
as that head's query *positions*: [rows, kv_heads, group, dim] against keys
[rows, kv_heads, length, dim] is plain multi-head attention with the row's mask
broadcast. Transformers instead repeats every key and value ``group`` times
(``repeat_kv``) whenever a mask is given, which at 64 rows of a 512-token slot cache
copies ~0.5 GB per step for a 1B Llama.

The product is two batched GEMMs and a softmax (float32), not SDPA's fused kernel:
with 4 queries per head, the memory-efficient kernel runs one thread block per row
and head and took 34 us per layer at batch 1 and 53 us at batch 64 on an H100
(30-39 % of a compiled decode step), while batched GEMMs spread the keys over the
whole GPU. Prompts (more than one query token) take transformers' own SDPA path.

When the static state has bound its slots to the attention module (``bind_slots``),
a decode step is called without a cache object: the new key/value is written into
the module's own slot buffers here. Nothing then reads the module's ``layer_idx``,
so one compiled decoder layer serves every layer (see ``runner/compile.py``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

NAME = "mii_sdpa"


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs: Any
                             ) -> Tuple[torch.Tensor, None]:
    """Transformers' attention-function signature; output [rows, queries, heads, dim]."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    slot_keys = getattr(module, "mii_keys", None)
    if slot_keys is None and queries > 1:  # a prefill: what the static state's check compares
        module.mii_attended = (*key.shape[1::2], *value.shape[1::2])
    # A decode step without a cache object: one new key, a mask over the slot's columns.
    # (A one-token prompt prefilled eagerly also has one key, but a one-column mask.)
    if (slot_keys is not None and queries == 1 and attention_mask is not None
            and attention_mask.shape[-1] > key.shape[2]):
        key, value = write_step(slot_keys, module.mii_values, key, value,
                                module.mii_rows[:rows], module.mii_write_pos[:rows])
    if queries == 1 and attention_mask is not None:
        # The slot cache hands over whole slots; the mask says how many columns matter.
        # Sliced unconditionally (a no-op at full width): a shape test here would make
        # torch.compile guard on it and compile the step twice.
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    if (queries != 1 or heads == kv_heads or value.shape[-1] != dim
            or kwargs.get("softcap") is not None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scale = scaling if scaling is not None else dim ** -0.5
    scores = torch.matmul(grouped, key.transpose(2, 3)).float() * scale
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf"))
                  if attention_mask.dtype == torch.bool else scores + attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def write_step(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               index: torch.Tensor, columns: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write a decode step's key/value [rows, heads, 1, dim] into the slots ``index`` at
    ``columns``; return the rows' slots, which that step attends over."""
    keys[index, :, columns, :] = key[:, :, 0, :]
    values[index, :, columns, :] = value[:, :, 0, :]
    rows = key.shape[0]
    return keys[:rows], values[:rows]


def use_grouped_decode_attention(model: Any) -> bool:
    """Switch an SDPA model to :func:`grouped_decode_attention`; False if it is not SDPA."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_decode_attention)
    model.set_attn_implementation(NAME)
    return True


def bind_slots(module: Any, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor,
               rows: torch.Tensor) -> None:
    """Give an attention module its layer's slot buffers and the shared write columns.

    Buffers (not plain attributes): torch.compile treats a module's buffers as inputs,
    so every layer's buffers go through the same compiled code.
    """
    for name, tensor in (("mii_keys", keys), ("mii_values", values),
                         ("mii_write_pos", write_pos), ("mii_rows", rows)):
        module.register_buffer(name, tensor, persistent=False)
