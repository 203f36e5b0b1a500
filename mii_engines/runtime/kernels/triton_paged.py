"""Triton kernels of paged attention, launched by ``paged_attention`` for CUDA tensors.

Two kernels share one inner loop (``_attend_keys``: gather a tile of keys/values through
the block table, online softmax in fp32, base-2 exponentials):

- ``_decode_kernel`` (``decode_only``): flash-decoding. Grid (max(S, T), KVH, splits);
  program (s, kvh, k) takes every query head of kv head ``kvh`` at once (the group is the M
  dimension of the ``tl.dot``, padded to 16) over the k-th share of seq s's keys. A share
  takes at least ``DECODE_SHARE_KEYS`` keys, so the number of shares follows the context
  at run time (the grid is the most a graph's table allows): a context that short is one
  share, which writes the output; with more, each writes (max, sum, acc) partials that
  ``_combine_kernel`` (grid (S, KVH)) merges. Given the step's new keys/values, the
  program whose share holds the newest position first writes them into the pool: two
  launches per layer fewer (the K and V writes). Merging in the decode kernel instead
  (the last share, found by an atomic count) measured slower at one stream (1.48 against
  1.40 ms a step on an H200) though faster at 16 and 64: not kept.
- ``_varlen_kernel`` (prefill chunks, mixed steps): grid (KVH, cdiv(T, BLOCK_Q) + S); a
  program finds its (seq, query tile) by binary search over ``query_start`` and takes
  BLOCK_Q queries x the group's heads as its M rows; a seq of a few queries (a decode row
  beside a prefill chunk) takes a 16-row tile instead. A seq's tiles run from its last
  (the most keys) to its first. A mixed step's decode rows (its first seqs of one query)
  are not the varlen kernel's: a decode-kernel launch of their own attends them first.

Within a range of keys only the partial last tile and the causal diagonal are masked.

Every grid depends on shapes only and nothing here reads a tensor on the host, so a call
can be captured in a CUDA graph. Importing this module needs triton, not a GPU: the tests
run the kernels in triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same, for the kernels (globals they read are constexpr)
# Start of the running max: finite, so a row that has seen only masked keys so far gets
# exp2(-inf - (-1e30)) = 0 instead of exp2(-inf - -inf) = NaN.
MAX_START = tl.constexpr(-1.0e30)
# Shares of one (seq, kv head) at most, and the fewest keys one takes (a context of up to
# that many is one share, written straight to the output). Chosen on the H200
# (kernel_check.py, one row, 128k-token tables, us a layer call): before, 32 shares with
# no minimum: a 256-key context left 28 shares empty and took 4.1 us + 5.0 in the combine.
# At 256 / 1,024 / 4,096 keys: 64 keys a share 5.5 / 9.6 / 16.7 us, 256 keys 7.3 / 9.6 /
# 14.9, 512 keys 7.2 / 12.6 / 15.6; 16 shares of >= 64 keys is the best of each column.
MAX_DECODE_SPLITS = 16
DECODE_SHARE_KEYS = 64
# A mixed step's decode rows (its seqs of one query, packed first) run in a decode-kernel
# launch of their own: the first MIXED_APART_SEQS seqs at most (a shape-only grid), each in
# up to MIXED_SPLITS shares of its keys. The varlen kernel's 8 warps took 116 us a layer
# for 32 rows of 3,900 keys on an H200, the decode kernel's 4 warps 61 us in a decode step.
MIXED_APART_SEQS = 64
MIXED_SPLITS = 4


@triton.jit
def _softcapped(scores, softcap):
    """softcap * tanh(scores / softcap); tanh via exp saturates to +-1 without NaN."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))


@triton.jit
def _key_tile(q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, kv_head, tile_start, key_end,
              q_pos, window, qk_scale, softcap, stride_block, stride_slot, stride_head,
              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_P2: tl.constexpr, MASKED: tl.constexpr, PER_ROW_MASK: tl.constexpr,
              USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One tile of BLOCK_N keys from ``tile_start`` folded into the online softmax.

    MASKED: positions at or past ``key_end`` are not read and score -inf (the last tile of
    a range), and with PER_ROW_MASK row r sees position p only if p <= q_pos[r] (and
    p > q_pos[r] - window). A tile wholly inside the range loads and scores without
    masks, and without softcap the scale is applied inside the exponent's multiply-add:
    a head_dim of 64 gives a tile as much softmax work per element as matrix work, so
    each per-element instruction shows in the kernel's time.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P2)
    pos = tile_start + offs_n
    if MASKED:
        key_ok = pos < key_end
        block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table_row_ptr + pos // BLOCK_SIZE).to(tl.int64)
    row_off = block * stride_block + (pos % BLOCK_SIZE) * stride_slot + kv_head * stride_head
    tile_ptrs = row_off[:, None] + offs_d[None, :]
    if MASKED:
        tile_ok = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + tile_ptrs, mask=tile_ok, other=0.0)
        v = tl.load(v_ptr + tile_ptrs, mask=tile_ok, other=0.0)
    elif D_P2 != HEAD_DIM:
        d_ok = (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + tile_ptrs, mask=d_ok, other=0.0)
        v = tl.load(v_ptr + tile_ptrs, mask=d_ok, other=0.0)
    else:
        k = tl.load(k_ptr + tile_ptrs)
        v = tl.load(v_ptr + tile_ptrs)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if USE_SOFTCAP:  # base 2 after the tanh: the scores leave here scaled
        scores = _softcapped(scores * qk_scale, softcap) * LOG2E_C
    if MASKED:
        visible = key_ok[None, :]
        if PER_ROW_MASK:
            visible = visible & (pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
    if USE_SOFTCAP:
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
    else:  # qk_scale > 0 (checked): the max of the scaled scores is the scaled max
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        p = tl.exp2(scores * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, kv_head, key_start, key_end,
                 q_pos, window, qk_scale, softcap,
                 stride_block, stride_slot, stride_head,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_P2: tl.constexpr, PER_ROW_MASK: tl.constexpr, USE_WINDOW: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 WHOLE_UNMASKED: tl.constexpr):
    """Online softmax of the rows ``q`` over key positions [key_start, key_end).

    ``m_i``/``l_i``/``acc`` are the running max (base 2), sum and output of each row.
    With PER_ROW_MASK, row r sees position p only if p <= q_pos[r] (and p > q_pos[r] -
    window); otherwise every row sees the whole range (decode: the range is already the
    window ending at the query), and with WHOLE_UNMASKED the range's whole tiles run
    without masks, its last partial one masked (off: every tile masked, the kernel
    before 2026-12-03, for A/B timing). Block-table entries past key_end are never read.
    """
    if PER_ROW_MASK or not WHOLE_UNMASKED:
        for tile_start in range(key_start, key_end, BLOCK_N):
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, kv_head, tile_start, key_end,
                q_pos, window, qk_scale, softcap, stride_block, stride_slot, stride_head,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, True, PER_ROW_MASK, USE_WINDOW,
                USE_SOFTCAP, DOT_PRECISION)
    else:
        whole_end = key_start + tl.maximum(key_end - key_start, 0) // BLOCK_N * BLOCK_N
        for tile_start in range(key_start, whole_end, BLOCK_N):
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, kv_head, tile_start, key_end,
                q_pos, window, qk_scale, softcap, stride_block, stride_slot, stride_head,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, False, False, USE_WINDOW, USE_SOFTCAP,
                DOT_PRECISION)
        for tile_start in range(whole_end, key_end, BLOCK_N):  # the partial tile, if any
            m_i, l_i, acc = _key_tile(
                q, m_i, l_i, acc, k_ptr, v_ptr, table_row_ptr, kv_head, tile_start, key_end,
                q_pos, window, qk_scale, softcap, stride_block, stride_slot, stride_head,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, True, False, USE_WINDOW, USE_SOFTCAP,
                DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _write_new_key(new_k_ptr, new_v_ptr, slots_ptr, k_ptr, v_ptr, token, kv_head,
                   stride_nt, stride_nh, stride_nvt, stride_nvh,
                   stride_block, stride_slot, stride_head,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr):
    """Store token ``token``'s key and value of kv head ``kv_head`` at its pool slot.

    Keys and values have strides of their own: both are often views of one fused
    projection's output, with the same shape but different row strides."""
    offs_d = tl.arange(0, D_P2)
    d_ok = offs_d < HEAD_DIM
    slot = tl.load(slots_ptr + token).to(tl.int64)
    key_src = token * stride_nt + kv_head * stride_nh + offs_d
    value_src = token * stride_nvt + kv_head * stride_nvh + offs_d
    dst = ((slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
           + kv_head * stride_head + offs_d)
    tl.store(k_ptr + dst, tl.load(new_k_ptr + key_src, mask=d_ok), mask=d_ok)
    tl.store(v_ptr + dst, tl.load(new_v_ptr + value_src, mask=d_ok), mask=d_ok)


@triton.jit
def _key_shares(seq_len, window, SPLITS: tl.constexpr, MIN_TILES: tl.constexpr,
                BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """(first key, keys per share, shares used) of one sequence in a decode step: at most
    SPLITS shares of at least MIN_TILES key tiles each. A context that short is one share,
    which writes the output itself: nothing to combine, no partials."""
    first_key = 0
    if USE_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)
    tiles = tl.cdiv(seq_len - first_key, BLOCK_N)
    per_share = tl.maximum(tl.cdiv(tiles, SPLITS), MIN_TILES)
    return first_key, per_share * BLOCK_N, tl.cdiv(tiles, per_share)


@triton.jit
def _merge_splits(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, token, first, used, heads,
                  g_ok, rows_ok, offs_d, stride_ot, stride_oh, HEAD_DIM: tl.constexpr):
    """Merge the ``used`` partials (max, sum, acc) from index ``first`` of each head into
    the output row of ``token``, in one pass (the running max rescales what came before)."""
    m_all = tl.full(heads.shape, MAX_START, dtype=tl.float32)
    total = tl.zeros(heads.shape, dtype=tl.float32)
    acc = tl.zeros(rows_ok.shape, dtype=tl.float32)
    for k in range(used):
        m_k = tl.load(part_m_ptr + first + k, mask=g_ok, other=MAX_START)
        m_new = tl.maximum(m_all, m_k)
        before, weight = tl.exp2(m_all - m_new), tl.exp2(m_k - m_new)
        total = total * before + weight * tl.load(part_l_ptr + first + k, mask=g_ok, other=0.0)
        acc = acc * before[:, None] + weight[:, None] * tl.load(
            part_acc_ptr + (first + k)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=rows_ok, other=0.0)
        m_all = m_new
    result = acc / tl.where(g_ok, total, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             result.to(out_ptr.dtype.element_ty), mask=rows_ok)


# Counts and the window change from step to step: not specialised, so no new compile.
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "window"])
def _decode_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                   new_k_ptr, new_v_ptr, slots_ptr,
                   q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, query_start_ptr,
                   num_seqs, num_tokens, num_heads, window, qk_scale, softcap,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_nt, stride_nh,
                   stride_nvt, stride_nvh,
                   stride_table, stride_block, stride_slot, stride_head,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr, MIN_TILES: tl.constexpr, WRITE_NEW: tl.constexpr,
                   USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, WHOLE_UNMASKED: tl.constexpr,
                   MIXED: tl.constexpr):
    """Program (i, kvh, split): seq i's share ``split`` of its keys (``_key_shares``;
    a share beyond those the context needs does nothing); and, in split 0, the zeros of
    padding token i (i >= query_start[S]).

    MIXED (a mixed step's decode rows, ``mixed_rows_apart``): only seqs of exactly one
    query are attended, and nothing else is written: the varlen launch of the same step
    takes the others and the padding.

    WRITE_NEW: ``new_k``/``new_v`` [T, KVH, D] hold the step's keys/values, to be stored
    at ``slots[token]`` first. Only the share holding the newest position (seq_len - 1)
    reads that slot, and it is the program that writes it: a barrier orders the store
    before the loads (CTA scope is enough), with no other program involved.
    """
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_P2)
    heads = kv_head * GROUP + offs_g
    rows_ok = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]

    if (split == 0) & (not MIXED):
        real_tokens = tl.load(query_start_ptr + num_seqs)
        if (i >= real_tokens) & (i < num_tokens):
            zeros = tl.zeros([GROUP_PAD, D_P2], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + i * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     zeros, mask=rows_ok)

    if i < num_seqs:
        token = tl.load(query_start_ptr + i)
        q_len = tl.load(query_start_ptr + i + 1) - token
        seq_len = tl.load(seq_lens_ptr + i)
        first_key, share_keys, used = _key_shares(seq_len, window, SPLITS, MIN_TILES, BLOCK_N,
                                                  USE_WINDOW)
        if MIXED:
            attended = q_len == 1
        else:
            attended = q_len > 0
        if attended & (split < used):
            key_start = first_key + split * share_keys
            key_end = tl.minimum(key_start + share_keys, seq_len)
            if WRITE_NEW:
                if (key_start <= seq_len - 1) & (seq_len - 1 < key_end):
                    _write_new_key(new_k_ptr, new_v_ptr, slots_ptr, k_ptr, v_ptr, token,
                                   kv_head, stride_nt, stride_nh, stride_nvt, stride_nvh,
                                   stride_block, stride_slot,
                                   stride_head, BLOCK_SIZE, HEAD_DIM, D_P2)
                tl.debug_barrier()

            q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=rows_ok, other=0.0)
            m_i = tl.full([GROUP_PAD], MAX_START, dtype=tl.float32)
            l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
            acc = tl.zeros([GROUP_PAD, D_P2], dtype=tl.float32)
            m_i, l_i, acc = _attend_keys(
                q, m_i, l_i, acc, k_ptr, v_ptr, tables_ptr + i * stride_table, kv_head,
                key_start, key_end, offs_g, window, qk_scale, softcap,
                stride_block, stride_slot, stride_head,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, False, USE_WINDOW, USE_SOFTCAP,
                DOT_PRECISION, WHOLE_UNMASKED)
            if used == 1:
                result = acc / l_i[:, None]
                tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh
                         + offs_d[None, :], result.to(out_ptr.dtype.element_ty), mask=rows_ok)
            else:
                # Partials [S, H, SPLITS] and [S, H, SPLITS, HEAD_DIM]; the combine reads
                # the first ``used`` of each head.
                part = (i * num_heads + heads) * SPLITS + split
                g_ok = offs_g < GROUP
                tl.store(part_m_ptr + part, m_i, mask=g_ok)
                tl.store(part_l_ptr + part, l_i, mask=g_ok)
                tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                         mask=rows_ok)


@triton.jit(do_not_specialize=["window"])
def _combine_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, query_start_ptr,
                    seq_lens_ptr, window, num_heads, stride_ot, stride_oh,
                    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                    D_P2: tl.constexpr, SPLITS: tl.constexpr, MIN_TILES: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, MIXED: tl.constexpr):
    """Program (s, kvh): merge seq s's split partials of kv head kvh's query heads (none
    when its keys took one share: the decode kernel wrote that output; MIXED: only seqs
    of one query, as the decode kernel's)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    token = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - token
    _, _, used = _key_shares(tl.load(seq_lens_ptr + seq), window, SPLITS, MIN_TILES, BLOCK_N,
                             USE_WINDOW)
    if MIXED:
        merged = q_len == 1
    else:
        merged = q_len > 0
    if merged & (used > 1):
        offs_g = tl.arange(0, GROUP_P2)
        offs_d = tl.arange(0, D_P2)
        g_ok = offs_g < GROUP
        rows_ok = g_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        heads = kv_head * GROUP + offs_g
        _merge_splits(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, token,
                      (seq * num_heads + heads) * SPLITS, used, heads, g_ok, rows_ok, offs_d,
                      stride_ot, stride_oh, HEAD_DIM)


@triton.jit
def _query_rows(token_start, q_len, local, kv_head, GROUP: tl.constexpr,
                GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """The BLOCK_Q * GROUP_P2 rows of query tile ``local`` of a seq starting at token
    ``token_start``: each row's query index in the seq, token and query head, which rows
    are real, and which of their [rows, D_P2] elements."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = local * BLOCK_Q + offs_m // GROUP_P2
    in_group = offs_m % GROUP_P2
    row_ok = (q_idx < q_len) & (in_group < GROUP)
    tile_ok = row_ok[:, None] & (tl.arange(0, D_P2) < HEAD_DIM)[None, :]
    return q_idx, token_start + q_idx, kv_head * GROUP + in_group, row_ok, tile_ok


@triton.jit
def _attend_query_tile(out_ptr, q_ptr, k_ptr, v_ptr, table_row, seq_len, token_start, q_len,
                       local, kv_head, window, qk_scale, softcap,
                       stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_block, stride_slot, stride_head,
                       GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                       D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                       USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASK_ALL_TILES: tl.constexpr, WHOLE_UNMASKED: tl.constexpr):
    """Queries [local * BLOCK_Q, (local + 1) * BLOCK_Q) of one seq x kv head ``kv_head``'s
    query heads (BLOCK_Q * GROUP_P2 rows), attended over the seq's keys and stored."""
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    offs_d = tl.arange(0, D_P2)
    q_idx, tokens, heads, row_ok, tile_ok = _query_rows(
        token_start, q_len, local, kv_head, GROUP, GROUP_P2, HEAD_DIM, D_P2, BLOCK_Q)
    context = seq_len - q_len  # positions before this step's first query
    q_pos = context + q_idx
    key_end = context + tl.minimum(q_len, (local + 1) * BLOCK_Q)
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(context + local * BLOCK_Q - window + 1, 0)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=tile_ok, other=0.0)
    m_i = tl.full([BLOCK_M], MAX_START, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], dtype=tl.float32)
    diagonal = key_start
    if not (USE_WINDOW or MASK_ALL_TILES):
        # Keys before the tile's first query are visible to each of its rows: no per-row
        # mask there, only on the last BLOCK_Q keys (causal prefill).
        diagonal = context + local * BLOCK_Q
        m_i, l_i, acc = _attend_keys(
            q, m_i, l_i, acc, k_ptr, v_ptr, table_row, kv_head,
            key_start, diagonal, q_pos, window, qk_scale, softcap,
            stride_block, stride_slot, stride_head,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, False, False, USE_SOFTCAP, DOT_PRECISION,
            WHOLE_UNMASKED)
    m_i, l_i, acc = _attend_keys(
        q, m_i, l_i, acc, k_ptr, v_ptr, table_row, kv_head,
        diagonal, key_end, q_pos, window, qk_scale, softcap,
        stride_block, stride_slot, stride_head,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, D_P2, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION,
        WHOLE_UNMASKED)
    # Rows past q_len saw nothing (l_i = 0): they are masked out of the store.
    result = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], result.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "window", "apart"])
def _varlen_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, query_start_ptr,
                   num_seqs, num_tokens, window, apart, qk_scale, softcap,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
                   stride_block, stride_slot, stride_head,
                   GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, MASK_ALL_TILES: tl.constexpr,
                   SMALL_Q: tl.constexpr, SMALL_LIMIT: tl.constexpr,
                   HEAVY_FIRST: tl.constexpr, WHOLE_UNMASKED: tl.constexpr):
    """Program (kvh, tile): BLOCK_Q queries of one seq x kv head kvh's query heads.

    Seq s owns tiles [query_start[s] // BLOCK_Q + s, ...): that start grows by at least
    cdiv(q_len, BLOCK_Q) from one seq to the next, so cdiv(T, BLOCK_Q) + S programs cover
    every seq's tiles, and the tiles from query_start[S] // BLOCK_Q + S on cover the
    padding tokens [query_start[S], T), which are written with zeros.

    A seq of at most SMALL_LIMIT queries (a decode row of a mixed step; SMALL_LIMIT is
    SMALL_Q, or 0 with the small tile off) takes a tile of SMALL_Q * GROUP_P2 rows
    instead of BLOCK_Q * GROUP_P2, most of which it would leave empty while doing their
    dot products over its whole context.
    HEAVY_FIRST: a seq's query tiles run from its last, which sees the most keys, to its
    first, so the longest programs are not the ones left running alone at the end of the
    launch. Seqs keep query order, in which a mixed step's decode rows come first: each
    walks its whole context in one program, the longest of all.
    A seq of one query among the first ``apart`` is left to the decode kernel's launch
    of the same step (``mixed_rows_apart``).
    """
    # kv heads vary fastest in launch order: every head of a tile is dispatched before the
    # next tile, so the order over tiles holds for the whole launch, not for each head's
    # programs in turn.
    kv_head = tl.program_id(0)
    tile = tl.program_id(1)
    # The largest s in [0, S] whose first tile is <= tile (s == S: the padding tokens).
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    token_start = tl.load(query_start_ptr + seq)
    is_padding = seq == num_seqs
    token_end = tl.where(is_padding, num_tokens,
                         tl.load(query_start_ptr + tl.minimum(seq + 1, num_seqs)))
    q_len = token_end - token_start
    local = tile - (token_start // BLOCK_Q + seq)
    if HEAVY_FIRST:  # the seq's last query tile first
        needed = tl.cdiv(q_len, BLOCK_Q)
        local = tl.where(local < needed, needed - 1 - local, local)

    if local * BLOCK_Q < q_len:
        if is_padding:
            BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
            offs_d = tl.arange(0, D_P2)
            _, tokens, heads, _, tile_ok = _query_rows(
                token_start, q_len, local, kv_head, GROUP, GROUP_P2, HEAD_DIM, D_P2, BLOCK_Q)
            tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
                     + offs_d[None, :],
                     tl.zeros([BLOCK_M, D_P2], dtype=out_ptr.dtype.element_ty), mask=tile_ok)
        elif (seq >= apart) | (q_len != 1):
            seq_len = tl.load(seq_lens_ptr + seq)
            table_row = tables_ptr + seq * stride_table
            if q_len <= SMALL_LIMIT:  # never with the small tile off (limit 0)
                _attend_query_tile(
                    out_ptr, q_ptr, k_ptr, v_ptr, table_row, seq_len, token_start, q_len, 0,
                    kv_head, window, qk_scale, softcap, stride_qt, stride_qh, stride_ot,
                    stride_oh, stride_block, stride_slot, stride_head, GROUP, GROUP_P2,
                    HEAD_DIM, D_P2, BLOCK_SIZE, SMALL_Q, BLOCK_N, USE_WINDOW, USE_SOFTCAP,
                    DOT_PRECISION, MASK_ALL_TILES, WHOLE_UNMASKED)
            else:
                _attend_query_tile(
                    out_ptr, q_ptr, k_ptr, v_ptr, table_row, seq_len, token_start, q_len,
                    local, kv_head, window, qk_scale, softcap, stride_qt, stride_qh,
                    stride_ot, stride_oh, stride_block, stride_slot, stride_head, GROUP,
                    GROUP_P2, HEAD_DIM, D_P2, BLOCK_SIZE, BLOCK_Q, BLOCK_N, USE_WINDOW,
                    USE_SOFTCAP, DOT_PRECISION, MASK_ALL_TILES, WHOLE_UNMASKED)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one kernel, chosen from shapes only."""

    block_m: int  # rows of the score tile (queries x group heads)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    # varlen: the causal mask on every key tile, not only the diagonal one (the kernel
    # before 2026-12-02; kept for A/B timing in bench/gpu/varlen_tiles.py)
    mask_all_tiles: bool = False
    # varlen: a seq of few queries (a decode row of a mixed step) takes a tile of
    # max(16, group) rows, not block_m; off for A/B timing (the kernel before 2026-12-03)
    small_rows: bool = True
    # varlen: a seq's last query tile, which sees the most keys, starts first
    heavy_first: bool = True
    # both: a range's whole key tiles load and score without masks (only its partial
    # last tile and the diagonal are masked); off for A/B timing (before 2026-12-03 e)
    whole_unmasked: bool = True
    # varlen: a mixed step's first MIXED_APART_SEQS seqs of one query (its decode rows)
    # run in a decode-kernel launch of their own (4 warps, their keys in shares); off for
    # A/B timing (before 2026-12-03 e: every seq in the varlen launch)
    mixed_rows_apart: bool = True
    # varlen: those decode rows' launches on a second stream, alongside the varlen launch
    # (a fork and join inside the step's graph): memory-bound rows beside a compute-bound
    # chunk. H200, 32 rows of 3,900 keys beside a 4,064-token chunk: 455 -> 434 us a
    # layer (16 rows: 107 -> 96); off for A/B timing
    rows_alongside: bool = True


def varlen_tiles(head_dim: int, group: int, element_size: int) -> Tiles:
    """Tiles of the varlen kernel: 128 x 64 for 2-byte types up to head_dim 128; halved
    where shared memory (K and V tiles per pipeline stage) or registers would run out.

    Two pipeline stages: with the small tile and the last-tile-first order (launch order
    kv heads fastest), two stages took 67 / 161 / 421 us on an H200 for the 1.5B's
    chunk at context 0 / 1,802 / two whole prompts and 279 us beside 32 decode rows,
    three stages 89 / 222 / 614 and 420 us, and three stages without that order 83 /
    177 / 444 and 292 (one device call, bench/gpu/varlen_tiles.py,
    bench/results/h200_1203c_kernels_llama1b.jsonl). Before that order three stages
    had been 2-3 % faster than two; 128 x 128 tiles were 30 % slower
    (bench/results/h200_1202b_defaults_llama1b.jsonl)."""
    d_p2 = _pow2(head_dim)
    if element_size <= 2 and d_p2 <= 128:
        block_m, block_n, warps = 128, 64, 8
    elif element_size <= 2:
        block_m, block_n, warps = 64, 32, 8
    elif d_p2 <= 128:
        block_m, block_n, warps = 64, 32, 4
    else:
        block_m, block_n, warps = 32, 16, 8
    return Tiles(max(block_m, _pow2(group)), block_n, warps, 2)


def decode_tiles(head_dim: int, element_size: int) -> Tiles:
    """Tiles of the decode kernel: the group padded to 16 rows, 64 keys a step (32 for
    head_dim 256 or fp32, so two stages of K and V stay well inside shared memory)."""
    block_n = 64 if element_size <= 2 and _pow2(head_dim) <= 128 else 32
    return Tiles(16, block_n, 4, 2)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int,
                  block_n: int, multiprocessors: int) -> int:
    """How many shares of its keys each (seq, kv head) of a decode step is split into.

    Enough programs to fill the GPU about twice when S x KVH is small (at most
    MAX_DECODE_SPLITS), 1 when it is large; never more shares than key tiles in the
    longest context the table can hold (max_blocks x block_size): a shape-only choice,
    so one graph serves any lengths.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = -(-2 * multiprocessors // programs)
    most_tiles = max(1, -(-max_blocks * block_size // block_n))
    return max(1, min(wanted, most_tiles, MAX_DECODE_SPLITS))


def _pow2(value: int) -> int:
    return triton.next_power_of_2(max(1, value))


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constants, **options)``."""

    kernel: triton.JITFunction
    grid: Tuple[int, ...]
    args: Dict[str, Any]  # the runtime arguments, by name
    constants: Dict[str, Any]  # the constexpr arguments, by name
    num_warps: int
    num_stages: int
    alongside: bool = False  # on the side stream, beside the launches that are not

    def run(self) -> None:
        """Launch it."""
        self.kernel[self.grid](**self.args, **self.constants, num_warps=self.num_warps,
                               num_stages=self.num_stages)


@dataclass(frozen=True)
class NewKeys:
    """A decode step's keys and values [T, KVH, D], for the decode kernel to store at
    ``slots[t]`` (pool slot: block * block_size + offset) before it attends."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor


def plan_launches(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start: torch.Tensor, out: torch.Tensor, scale: float, window: int,
                  softcap: float, decode_only: bool, splits: Optional[int] = None,
                  new: Optional[NewKeys] = None,
                  share_keys: int = DECODE_SHARE_KEYS) -> List[Launch]:
    """The launches that write paged attention into ``out`` (arguments as
    ``paged_attention``'s, already checked), with the split-KV scratch they need allocated.

    ``splits`` forces the decode kernel's number of key shares (tests, benchmarks), in a
    mixed step that of its decode rows' launch; by default it comes from ``decode_splits``
    in a decode step, MIXED_SPLITS in a mixed one (1 for tensors that are not on a GPU).
    ``new`` (decode only): the step's keys/values, which the decode kernel writes into the
    pool itself; otherwise they must be in the pool already. ``share_keys``: the fewest
    keys a decode share takes (benchmarks vary it).
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs, max_blocks = block_tables.shape
    if num_tokens == 0:
        return []
    if new is not None and not decode_only:
        raise ValueError("paged_attention: new keys are written by the decode kernel only")
    group = num_heads // num_kv_heads
    use_softcap = softcap > 0.0
    # Without softcap the base-2 factor folds into the scale; with it, it follows the tanh.
    qk_scale = scale if use_softcap else scale * LOG2E
    d_p2 = max(16, _pow2(head_dim))
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, D_P2=d_p2, BLOCK_SIZE=block_size,
        USE_WINDOW=window > 0, USE_SOFTCAP=use_softcap,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32")
    inputs = dict(
        q_ptr=query, k_ptr=key_cache, v_ptr=value_cache, tables_ptr=block_tables,
        seq_lens_ptr=seq_lens, query_start_ptr=query_start, num_seqs=num_seqs,
        num_tokens=num_tokens, window=window, qk_scale=qk_scale, softcap=softcap,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0),
        stride_oh=out.stride(1), stride_table=block_tables.stride(0),
        stride_block=key_cache.stride(0), stride_slot=key_cache.stride(1),
        stride_head=key_cache.stride(2))
    if decode_only:
        tiles = decode_tiles(head_dim, query.element_size())
        if splits is None:
            splits = (decode_splits(num_seqs, num_kv_heads, max_blocks, block_size,
                                    tiles.block_n, _multiprocessors(query.device.index or 0))
                      if query.is_cuda else 1)
        return _decode_launches(query, out, inputs, common, tiles, num_seqs,
                                max(num_seqs, num_tokens), splits, new, share_keys, False)
    tiles = varlen_tiles(head_dim, group, query.element_size())
    group_p2 = _pow2(group)
    block_q = tiles.block_m // group_p2
    # 16 rows is the smallest tile tl.dot takes: 4 queries of a group of 4 heads
    small_q = max(1, 16 // group_p2)
    small_limit = small_q if tiles.small_rows and small_q < block_q else 0
    apart = min(num_seqs, MIXED_APART_SEQS) if tiles.mixed_rows_apart else 0
    launches = []
    if apart:
        if splits is None:
            splits = MIXED_SPLITS if query.is_cuda else 1
        rows_tiles = dataclasses.replace(decode_tiles(head_dim, query.element_size()),
                                         whole_unmasked=tiles.whole_unmasked)
        launches = _decode_launches(query, out, inputs, common, rows_tiles, apart, apart,
                                    splits, None, share_keys, True,
                                    alongside=tiles.rows_alongside and query.is_cuda)
    launches.append(Launch(_varlen_kernel, (num_kv_heads,
                                            triton.cdiv(num_tokens, block_q) + num_seqs),
                           dict(out_ptr=out, apart=apart, **inputs),
                           dict(common, GROUP_P2=group_p2, BLOCK_Q=block_q,
                                BLOCK_N=tiles.block_n, MASK_ALL_TILES=tiles.mask_all_tiles,
                                SMALL_Q=small_q, SMALL_LIMIT=small_limit,
                                HEAVY_FIRST=tiles.heavy_first,
                                WHOLE_UNMASKED=tiles.whole_unmasked),
                           tiles.num_warps, tiles.num_stages))
    return launches


def _decode_launches(query: torch.Tensor, out: torch.Tensor, inputs: Dict[str, Any],
                     common: Dict[str, Any], tiles: Tiles, seqs: int, programs: int,
                     splits: int, new: Optional[NewKeys], share_keys: int,
                     mixed: bool, alongside: bool = False) -> List[Launch]:
    """The decode kernel over the first ``seqs`` seqs (``programs`` along its first grid
    axis: padding tokens too in a decode step) in ``splits`` shares, and the combine
    that merges the shares; ``mixed``: only their seqs of one query (a mixed step);
    ``alongside``: both on the side stream."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = inputs["k_ptr"].shape[2]
    # Partials [S, H, splits] (running max, sum) and [S, H, splits, D] (output); with one
    # split the kernel writes ``out`` directly and never touches them.
    part_m = torch.empty((seqs, num_heads, splits) if splits > 1 else (1,),
                         dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((seqs, num_heads, splits, head_dim) if splits > 1 else (1,),
                           dtype=torch.float32, device=query.device)
    partials = dict(part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc)
    written = new if new is not None else NewKeys(query, query, inputs["seq_lens_ptr"])
    args = dict(out_ptr=out, **partials, new_k_ptr=written.keys, new_v_ptr=written.values,
                slots_ptr=written.slots, stride_nt=written.keys.stride(0),
                stride_nh=written.keys.stride(1), stride_nvt=written.values.stride(0),
                stride_nvh=written.values.stride(1), **inputs, num_heads=num_heads)
    shares = dict(SPLITS=splits, MIN_TILES=max(1, share_keys // tiles.block_n),
                  BLOCK_N=tiles.block_n, USE_WINDOW=common["USE_WINDOW"])
    launches = [Launch(_decode_kernel, (programs, num_kv_heads, splits), args,
                       dict(common, **shares, GROUP_PAD=max(16, _pow2(num_heads // num_kv_heads)),
                            WRITE_NEW=new is not None, WHOLE_UNMASKED=tiles.whole_unmasked,
                            MIXED=mixed),
                       tiles.num_warps, tiles.num_stages, alongside)]
    if splits > 1 and seqs > 0:
        launches.append(Launch(
            _combine_kernel, (seqs, num_kv_heads),
            dict(out_ptr=out, **partials, query_start_ptr=inputs["query_start_ptr"],
                 seq_lens_ptr=inputs["seq_lens_ptr"], window=inputs["window"],
                 num_heads=num_heads, stride_ot=out.stride(0), stride_oh=out.stride(1)),
            dict(shares, GROUP=common["GROUP"], GROUP_P2=_pow2(common["GROUP"]),
                 HEAD_DIM=head_dim, D_P2=common["D_P2"], MIXED=mixed),
            num_warps=4, num_stages=1, alongside=alongside))
    return launches


def run_paged_attention(query: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start: torch.Tensor, out: torch.Tensor,
                        scale: float, window: int, softcap: float, decode_only: bool,
                        splits: Optional[int] = None, new: Optional[NewKeys] = None,
                        share_keys: int = DECODE_SHARE_KEYS) -> None:
    """Write paged attention into ``out``: every launch of ``plan_launches``, in order, those
    ``alongside`` on a side stream that forks from the current one first and joins it
    before this returns (so the scratch they use is freed after they are done)."""
    launches = plan_launches(query, key_cache, value_cache, block_tables, seq_lens,
                             query_start, out, scale, window, softcap, decode_only, splits,
                             new, share_keys)
    beside = [launch for launch in launches if launch.alongside]
    if beside:
        main = torch.cuda.current_stream(query.device)
        side = _side_stream(query.device.index or 0)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for launch in beside:
                launch.run()
    for launch in launches:
        if not launch.alongside:
            launch.run()
    if beside:
        main.wait_stream(side)


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device_index)
