"""Attention kernels over the paged KV cache (Triton on GPUs, a torch reference elsewhere)."""
from mii_engines.runtime.kernels.paged_attention import paged_attention

__all__ = ["paged_attention"]
