"""One Triton kernel that picks every row's next token: greedy, temperature, top-p, bans
and per-row seeds, with no sort and no host synchronisation.

Program r reads row r of the logits a tile at a time:

1. One pass: the row's max and softmax sum (online), and the winner of a Gumbel race,
   argmax of z_i + g_i with z = logits / temperature and g_i Gumbel noise from a hash of
   (the row's 64-bit seed, i). Without top-p that winner is an exact categorical draw
   (a greedy row, temperature 0, takes argmax z instead; the first maximum, as torch).
2. Top-p by rejection: token j is in the nucleus iff the mass of the tokens above it,
   sum of p_i over z_i > z_j, is below top_p (the sorted cumulative sum's rule; tokens
   tied at the cut are all kept). A pass over the logits checks the candidate. A
   rejected j is outside the nucleus and so is every token at or below it; the tokens
   above it are raced again with the *same* noise, and that race is, given everything
   seen so far, a fresh categorical draw among them (in a Gumbel race the argmax over a
   subset is independent of that subset's maximum and of the other tokens' noise), so
   its winner is the next candidate. The accepted token is a draw from the nucleus; each
   round is accepted with probability mass(nucleus) / mass(tokens left) >= top_p, so a
   row takes at most 1 / top_p rounds on average (1.1 at the default 0.9).

The noise is computed in pass 1 and in rejected rounds only; a hash (lowbias32, twice)
costs a tenth of Philox's work per token, which at one row was most of the kernel's
time (175 us for 128k tokens on an H200 with Philox).

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

TILE = 4096  # tokens of a row a program reads per iteration
NUM_WARPS = 8
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mix(x):
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32) of uint32 ``x``."""
    x ^= x >> 16
    x *= tl.full([], 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full([], 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def _noise_key(seed):
    """A row's 32-bit noise key from its 64-bit seed (once per program)."""
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix(low ^ _mix(high))


@triton.jit
def _gumbel(key, index):
    """Gumbel noise of position ``index`` under a row's ``key``: a uniform in (0, 1) from
    two rounds of the hash (a tenth of Philox's work per token), then -ln(-ln u). The key
    enters before the first round and between them: an index XORed or offset by the key
    alone would only permute the same noise among the positions."""
    bits = _mix(_mix(index.to(tl.uint32) + key) ^ key)
    # 24 bits, centred in their interval: never 0 or 1, so the noise is always finite
    u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) + (0.5 / 16777216.0)
    return -tl.log2(-tl.log2(u) * LN2) * LN2


@triton.jit
def _tile(row_ptr, start, vocab, inv_t, ban, TILE: tl.constexpr):
    """Positions [start, start + TILE) of one row: their indices and scaled logits z
    (-inf past the vocabulary and at the banned token)."""
    index = start + tl.arange(0, TILE)
    x = tl.load(row_ptr + index, mask=index < vocab, other=float("-inf")).to(tl.float32)
    return index, tl.where(index == ban, float("-inf"), x * inv_t)


@triton.jit
def _scaled(row_ptr, index, inv_t):
    """The z of one position, computed as ``_tile`` does (bit for bit)."""
    return tl.load(row_ptr + index).to(tl.float32) * inv_t


@triton.jit(do_not_specialize=["step_seed"])  # a new value every step: one compilation
def _sample_kernel(logits_ptr, stride_row, out_ptr, temperature_ptr, top_p_ptr, seeds_ptr,
                   bans_ptr, step_seed, vocab, TILE: tl.constexpr,
                   HAS_SEEDS: tl.constexpr, HAS_BANS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    if HAS_SEEDS:
        seed = tl.load(seeds_ptr + row)
    else:  # seeds one apart hash to unrelated keys
        seed = step_seed + row.to(tl.int64)
    noise_key = _noise_key(seed)
    if HAS_BANS:
        ban = tl.load(bans_ptr + row)
    else:
        ban = -1
    noisy = temperature > 0
    inv_t = tl.where(noisy, 1.0 / tl.where(noisy, temperature, 1.0), 1.0)

    # 1. max and softmax sum of z; the race's winner (argmax z for a greedy row)
    m = float("-inf")
    total = 0.0
    best_key = float("-inf")
    best = 0
    for start in range(0, vocab, TILE):
        index, z = _tile(row_ptr, start, vocab, inv_t, ban, TILE)
        m_new = tl.maximum(m, tl.max(z, 0))
        # while every z so far is -inf (a banned first token), keep the sum at 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        m = m_new
        race = tl.where(noisy, z + _gumbel(noise_key, index), z)
        tile_key = tl.max(race, 0)
        better = tile_key > best_key  # strictly: on a tie the earlier tile's token stays
        best = tl.where(better, start + tl.argmax(race, 0), best)
        best_key = tl.where(better, tile_key, best_key)

    # 2. top-p: while the mass above the candidate reaches top_p, race the tokens above
    threshold = top_p * total
    z_best = _scaled(row_ptr, best, inv_t)
    go = noisy & (top_p < 1.0)
    while go:
        above_mass = 0.0
        for start in range(0, vocab, TILE):  # the check reads logits only: no noise
            index, z = _tile(row_ptr, start, vocab, inv_t, ban, TILE)
            above_mass += tl.sum(tl.where(z > z_best, tl.exp(z - m), 0.0), 0)
        go = above_mass >= threshold
        if go:  # rejected (at most 1 - top_p of the time): the next candidate
            next_key = float("-inf")
            nxt = best
            for start in range(0, vocab, TILE):
                index, z = _tile(row_ptr, start, vocab, inv_t, ban, TILE)
                race = tl.where(z > z_best, z + _gumbel(noise_key, index), float("-inf"))
                tile_key = tl.max(race, 0)
                better = tile_key > next_key
                nxt = tl.where(better, start + tl.argmax(race, 0), nxt)
                next_key = tl.where(better, tile_key, next_key)
            best = nxt
            z_best = _scaled(row_ptr, best, inv_t)
    tl.store(out_ptr + row, best.to(tl.int64))


def run_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
               step_seed: int, seeds: Optional[torch.Tensor] = None,
               bans: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab] (any float dtype, unit stride along
    the vocabulary). ``temperature`` [rows] float32, 0 for greedy; ``top_p`` [rows]
    float32, >= 1 keeps every token. Row r's noise seed is ``seeds[r]`` (int64 >= 0)
    or, without ``seeds``, ``step_seed + r`` (0 <= step_seed < 2**62): a step of
    unseeded rows copies nothing to the device. ``bans`` [rows] int64: the token each
    row may not produce (-1: none)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    tile = min(TILE, max(64, triton.next_power_of_2(vocab)))
    # above 2**32 always: the argument stays int64, whatever the draw
    step_seed = (1 << 32) | step_seed
    _sample_kernel[(rows,)](logits, logits.stride(0), out, temperature, top_p,
                            out if seeds is None else seeds, out if bans is None else bans,
                            step_seed, vocab, TILE=tile, HAS_SEEDS=seeds is not None,
                            HAS_BANS=bans is not None, num_warps=NUM_WARPS)
    return out
