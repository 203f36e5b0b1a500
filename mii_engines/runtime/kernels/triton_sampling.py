"""One Triton kernel that picks every row's next token: greedy, temperature, top-p, bans
and per-row seeds, with no sort and no host synchronisation.

Program r reads row r of the logits a tile at a time:

1. One pass: the row's max and softmax sum (online), and the winner of a Gumbel race,
   argmax of z_i + g_i with z = logits / temperature and g_i Gumbel noise from Philox
   keyed by (the row's seed, i). Without top-p that winner is an exact categorical draw
   (a greedy row, temperature 0, takes argmax z instead; the first maximum, as torch).
2. Top-p by rejection: token j is in the nucleus iff the mass of the tokens above it,
   sum of p_i over z_i > z_j, is below top_p (the sorted cumulative sum's rule, ties
   aside). Each round checks the candidate in one pass; the same pass races the tokens
   above it with the *same* noise. A rejected j is outside the nucleus and so is every
   token at or below it, and the race over the tokens above j is, given everything seen
   so far, a fresh categorical draw among them (in a Gumbel race the argmax over a subset
   is independent of that subset's maximum and of the other tokens' noise), so the next
   candidate is that race's winner. The accepted token is a draw from the nucleus; each
   round is accepted with probability mass(nucleus) / mass(tokens left) >= top_p, so a
   row takes at most 1 / top_p rounds on average (1.1 at the default 0.9).

Rows with a top-k are finished by the caller (``sampling.py``, a top-k on those rows):
the renormalised nucleus inside a top-k needs the top-k's mass, which this kernel does
not find. Grids depend on shapes only. Importing this module needs triton, not a GPU:
the tests run the kernel in triton's interpreter on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Tile of the vocabulary a program reads per iteration (4 * QUARTER): one Philox call
# gives four uniforms, so a quarter as many calls as tokens.
QUARTER = 1024
NUM_WARPS = 8
# Smallest uniform used: u = 0 would give the token a key of -inf, and a row whose
# remaining tokens all had such keys would race forever.
MIN_UNIFORM = tl.constexpr(1.0e-30)


@triton.jit
def _tile(row_ptr, start, vocab, inv_t, noisy, ban, seed, QUARTER: tl.constexpr):
    """Positions [start, start + 4 * QUARTER) of one row: their indices, scaled logits z
    (-inf past the vocabulary and at the banned token) and race keys (z + Gumbel noise;
    z itself for a greedy row). The noise of position i depends only on (seed, i)."""
    quarter = tl.arange(0, QUARTER)
    # start is a multiple of 4 * QUARTER, so these counters are this tile's alone
    r0, r1, r2, r3 = tl.rand4x(seed, start // 4 + quarter)
    # [QUARTER, 2, 2] -> flat q * 4 + 2a + b holds r_{2a+b}[q]: position start + flat
    u = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [4 * QUARTER])
    index = start + tl.arange(0, 4 * QUARTER)
    x = tl.load(row_ptr + index, mask=index < vocab, other=float("-inf")).to(tl.float32)
    z = tl.where(index == ban, float("-inf"), x * inv_t)
    gumbel = -tl.log(-tl.log(tl.maximum(u, MIN_UNIFORM)))
    return index, z, tl.where(noisy, z + gumbel, z)


@triton.jit
def _scaled(row_ptr, index, inv_t):
    """The z of one position, computed as ``_tile`` does (bit for bit)."""
    return tl.load(row_ptr + index).to(tl.float32) * inv_t


@triton.jit
def _sample_kernel(logits_ptr, stride_row, out_ptr, temperature_ptr, top_p_ptr, seeds_ptr,
                   bans_ptr, step_seed, vocab, QUARTER: tl.constexpr,
                   HAS_SEEDS: tl.constexpr, HAS_BANS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    if HAS_SEEDS:
        seed = tl.load(seeds_ptr + row)
    else:  # Philox keys one apart still give independent streams
        seed = step_seed + row.to(tl.int64)
    if HAS_BANS:
        ban = tl.load(bans_ptr + row)
    else:
        ban = -1
    noisy = temperature > 0
    inv_t = tl.where(noisy, 1.0 / tl.where(noisy, temperature, 1.0), 1.0)
    TILE: tl.constexpr = 4 * QUARTER

    # 1. max and softmax sum of z; the race's winner (argmax z for a greedy row)
    m = float("-inf")
    total = 0.0
    best_key = float("-inf")
    best = 0
    for start in range(0, vocab, TILE):
        index, z, key = _tile(row_ptr, start, vocab, inv_t, noisy, ban, seed, QUARTER)
        m_new = tl.maximum(m, tl.max(z, 0))
        # while every z so far is -inf (a banned first token), keep the sum at 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        m = m_new
        tile_key = tl.max(key, 0)
        better = tile_key > best_key  # strictly: on a tie the earlier tile's token stays
        best = tl.where(better, start + tl.argmax(key, 0), best)
        best_key = tl.where(better, tile_key, best_key)

    # 2. top-p: reject the candidate while the mass above it reaches top_p
    threshold = top_p * total
    z_best = _scaled(row_ptr, best, inv_t)
    go = noisy & (top_p < 1.0)
    while go:
        above_mass = 0.0
        next_key = float("-inf")
        nxt = best
        for start in range(0, vocab, TILE):
            index, z, key = _tile(row_ptr, start, vocab, inv_t, noisy, ban, seed, QUARTER)
            above = z > z_best
            above_mass += tl.sum(tl.where(above, tl.exp(z - m), 0.0), 0)
            key = tl.where(above, key, float("-inf"))
            tile_key = tl.max(key, 0)
            better = tile_key > next_key
            nxt = tl.where(better, start + tl.argmax(key, 0), nxt)
            next_key = tl.where(better, tile_key, next_key)
        go = above_mass >= threshold
        best = tl.where(go, nxt, best)
        z_best = _scaled(row_ptr, best, inv_t)
    tl.store(out_ptr + row, best.to(tl.int64))


def run_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
               step_seed: int, seeds: Optional[torch.Tensor] = None,
               bans: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab] (any float dtype, unit stride along
    the vocabulary). ``temperature`` [rows] float32, 0 for greedy; ``top_p`` [rows]
    float32, >= 1 keeps every token. Row r's Philox seed is ``seeds[r]`` (int64 >= 0)
    or, without ``seeds``, ``step_seed + r`` (0 <= step_seed < 2**62): a step of
    unseeded rows copies nothing to the device. ``bans`` [rows] int64: the token each
    row may not produce (-1: none)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    quarter = min(QUARTER, max(16, triton.next_power_of_2(triton.cdiv(vocab, 4))))
    _sample_kernel[(rows,)](logits, logits.stride(0), out, temperature, top_p,
                            out if seeds is None else seeds, out if bans is None else bans,
                            step_seed, vocab, QUARTER=quarter, HAS_SEEDS=seeds is not None,
                            HAS_BANS=bans is not None, num_warps=NUM_WARPS)
    return out
