"""The attention function of the paged KV cache, installed into a Hugging Face model.

mii registers ``mii_paged`` in transformers' ``AttentionInterface`` and switches the
model to it. The model is then called with every token of a step packed into one
row (``input_ids`` [1, T]) and no cache object; each attention module hands us its
queries, keys and values for those T tokens (rotary already applied). Here the keys
and values are written into the layer's block pool at each token's slot, then
every query attends over its own sequence's blocks, in one op (``kernels/paged_attention.py``).

What a step needs besides the model's own inputs travels in ``PagedMeta``: static
tensors, registered as buffers on every attention module so that one compiled
decoder layer serves all layers (torch.compile treats buffers as inputs) and CUDA
graphs replay them. The step's sequence count S reaches the function as the last
dimension of the 4D "attention mask" we pass (transformers forwards a 4D mask
unchanged): a shape, so that one compiled graph serves every S.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

NAME = "mii_paged"


@dataclass
class PagedMeta:
    """Per-step inputs of the paged attention, shared by all layers (device tensors of
    their largest size; a step uses leading slices)."""

    slot_mapping: torch.Tensor  # [max tokens] pool slot (block * block_size + offset) per token
    query_start: torch.Tensor  # [max seqs + 1] cumulative query counts per sequence
    seq_lens: torch.Tensor  # [max seqs] tokens of each sequence in the cache, this step's included
    block_tables: torch.Tensor  # [max seqs, max blocks] each sequence's blocks
    marker: torch.Tensor  # [max seqs] bool; its first S entries, as [1, 1, 1, S], carry S
    decode_only: bool = False  # every sequence of the step has one query (set per step)
    # The shape probe: no pools yet; each layer records (kv heads, key dim, value dim,
    # dtype) of what it would cache, in call order, and attends plainly.
    probing: bool = False
    seen: List[Tuple[int, int, int, torch.dtype]] = field(default_factory=list)

    def mask_for(self, seqs: int) -> torch.Tensor:
        """What the model gets as ``attention_mask``: a 4D tensor whose last size is S."""
        return self.marker[:seqs].view(1, 1, 1, seqs)


def paged_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            dropout: float = 0.0, scaling: Optional[float] = None,
                            sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, **kwargs: Any
                            ) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature; output [1, T, heads, head_dim]."""
    from mii_engines.runtime.kernels.paged_attention import write_and_attend

    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by mii_paged")
    meta: PagedMeta = module.mii_meta
    if meta.probing:
        meta.seen.append((key.shape[1], key.shape[3], value.shape[3], key.dtype))
        return _plain_causal(query, key, value, scaling), None
    keys_pool = module.mii_key_pool
    tokens = query.shape[2]
    seqs = attention_mask.shape[-1]
    slots = module.mii_slot_mapping[:tokens]
    window = sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else 0
    common = dict(scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                  window=window, softcap=float(softcap or 0.0), decode_only=meta.decode_only)
    # [1, heads, T, dim] -> [T, heads, dim]. The write happens inside the op: written as
    # index_copy_ on the pools in the compiled layer, torch.compile (torch 2.11, H200)
    # functionalized it into two copies of the whole pool per layer, 34 ms a step
    # instead of 1.4 (bench/gpu/probe_paged.py, docs/benchmarks.md).
    out = write_and_attend(query[0].transpose(0, 1), key[0].transpose(0, 1),
                           value[0].transpose(0, 1), slots, keys_pool, module.mii_value_pool,
                           module.mii_block_tables[:seqs], module.mii_seq_lens[:seqs],
                           module.mii_query_start[:seqs + 1], **common)
    return out[None], None


def _plain_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: Optional[float]) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                           scale=scaling)
    return out.transpose(1, 2)


def install(model: Any) -> Optional[str]:
    """Switch ``model`` to ``mii_paged``; returns the implementation it had (None when it
    cannot be switched: a model without transformers' attention interface)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous is None:
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention_forward)
    model.set_attn_implementation(NAME)
    return previous


def uninstall(model: Any, previous: str, modules: List[Any]) -> None:
    """Give the model its own attention back and drop our buffers (a fallback)."""
    model.set_attn_implementation(previous)
    for module in modules:
        for name in [name for name, _ in module.named_buffers(recurse=False)
                     if name.startswith("mii_")]:
            delattr(module, name)
        module.__dict__.pop("mii_meta", None)


def bind(modules: List[Any], meta: PagedMeta,
         pools: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
    """Give each attention module the shared step inputs and its layer's pools (none
    while probing shapes)."""
    for module in modules:
        object.__setattr__(module, "mii_meta", meta)  # a plain reference, not a submodule
    for module, (keys, values) in zip(modules, pools or []):
        for name, tensor in (("mii_key_pool", keys), ("mii_value_pool", values),
                             ("mii_slot_mapping", meta.slot_mapping),
                             ("mii_query_start", meta.query_start),
                             ("mii_seq_lens", meta.seq_lens),
                             ("mii_block_tables", meta.block_tables)):
            module.register_buffer(name, tensor, persistent=False)
