"""The Triton paged-attention kernels against the torch reference on the GPU, for the
shapes the engine feeds them that the small cases of ``kernel_check.py`` miss: prefill
chunks longer than a query tile, after a context (a cached prefix), beside decode rows.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu/varlen_probe.py [cuda]
    TRITON_INTERPRET=1 python3 bench/gpu/varlen_probe.py cpu      # the same, interpreted

One line per case: how many tokens are off (|diff| > 1e-3) and the largest difference.
"""
import sys

import torch

from mii_engines.runtime.kernels.paged_attention import reference_paged_attention
from mii_engines.runtime.kernels.triton_paged import run_paged_attention

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
# (query tokens per seq, context before them per seq, decode-only kernel)
CASES = [([40, 70, 1, 33, 100], [0, 50, 30, 64, 10], False),
         ([65] * 6, [2049] * 6, False),  # the prefix-cache case: hits, then own tokens
         ([65, 65], [0, 0], False),
         ([1] * 8, [2100] * 8, True),
         ([1] * 3, [5, 300, 2000], True),
         ([300, 1, 1], [0, 40, 900], False)]  # a long chunk beside decode rows


def case(seed, q_lens, contexts, heads, kv_heads, dim, block=16, dtype=torch.float32):
    """Random pools and block tables holding each seq's context and queries."""
    gen = torch.Generator().manual_seed(seed)
    seqs = len(q_lens)
    lens = [q + c for q, c in zip(q_lens, contexts)]
    max_blocks = max(-(-length // block) for length in lens) + 1
    pool = seqs * max_blocks + 2
    keys = torch.randn(pool, block, kv_heads, dim, generator=gen).to(dtype)
    values = torch.randn(pool, block, kv_heads, dim, generator=gen).to(dtype)
    tables = torch.randperm(pool - 1, generator=gen)[:seqs * max_blocks] + 1
    tables = tables.view(seqs, max_blocks).to(torch.int32).contiguous()
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1] + 3, heads, dim, generator=gen).to(dtype)  # 3 padding
    return [t.to(DEVICE) for t in (query, keys, values, tables,
                                   torch.tensor(lens, dtype=torch.int32),
                                   torch.tensor(starts, dtype=torch.int32))]


for dim, heads, kv_heads in ((16, 4, 2), (64, 32, 8)):
    for q_lens, contexts, decode_only in CASES:
        args = case(0, q_lens, contexts, heads, kv_heads, dim)
        expected = torch.full_like(args[0], float("nan"))
        got = torch.full_like(args[0], float("nan"))
        reference_paged_attention(*args, expected, dim ** -0.5, 0, 0.0)
        run_paged_attention(*args, got, dim ** -0.5, 0, 0.0, decode_only)
        tokens = int(args[5][-1])
        error = (got[:tokens] - expected[:tokens]).abs().amax(dim=(1, 2))
        bad = (error > 1e-3).nonzero().flatten().tolist()
        print("dim", dim, q_lens[:3], contexts[:3], "decode" if decode_only else "varlen",
              "nan", bool(torch.isnan(got[:tokens]).any()), "bad", len(bad), bad[:8],
              "maxerr %.2e" % float(error.max()), flush=True)
