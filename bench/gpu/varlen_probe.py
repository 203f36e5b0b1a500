import os, sys, torch
from mii_engines.runtime.kernels.paged_attention import reference_paged_attention
from mii_engines.runtime.kernels.triton_paged import run_paged_attention
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
def case(seed, q_lens, contexts, heads=8, kv_heads=2, dim=16, block=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    seqs = len(q_lens); lens = [q + c for q, c in zip(q_lens, contexts)]
    max_blocks = max(-(-l // block) for l in lens) + 1; pool = seqs * max_blocks + 2
    keys = torch.randn(pool, block, kv_heads, dim, generator=gen).to(dtype)
    values = torch.randn(pool, block, kv_heads, dim, generator=gen).to(dtype)
    tables = (torch.randperm(pool - 1, generator=gen)[:seqs * max_blocks] + 1).view(seqs, max_blocks).to(torch.int32).contiguous()
    starts = [0]
    for q in q_lens: starts.append(starts[-1] + q)
    query = torch.randn(starts[-1] + 3, heads, dim, generator=gen).to(dtype)
    return [t.to(dev) for t in (query, keys, values, tables, torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32))]
for dim, heads, kvh in ((16, 4, 2), (64, 32, 8)):
  for q_lens, ctx, dec in [([40, 70, 1, 33, 100], [0, 50, 30, 64, 10], False), ([65]*6, [2049]*6, False), ([65, 65], [0, 0], False), ([1]*8, [2100]*8, True), ([1]*3, [5, 300, 2000], True), ([300, 1, 1], [0, 40, 900], False)]:
    args = case(0, q_lens, ctx, heads, kvh, dim)
    exp = torch.full_like(args[0], float('nan')); got = torch.full_like(args[0], float('nan'))
    reference_paged_attention(*args, exp, dim ** -0.5, 0, 0.0)
    run_paged_attention(*args, got, dim ** -0.5, 0, 0.0, dec)
    T = int(args[5][-1]); err = (got[:T] - exp[:T]).abs().amax(dim=(1, 2))
    bad = (err > 1e-3).nonzero().flatten().tolist()
    print("dim", dim, q_lens[:3], ctx[:3], "decode" if dec else "varlen", "nan", bool(torch.isnan(got[:T]).any()), "bad", len(bad), bad[:8], "maxerr %.2e" % float(err.max()), flush=True)
