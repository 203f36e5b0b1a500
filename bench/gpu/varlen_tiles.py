"""Tile sizes of the varlen (prefill) attention kernel on the GPU: each candidate checked
against the torch reference, then timed on the prefill shapes of issue 17's long prompts.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu/varlen_tiles.py   # $OUT/varlen_tiles.jsonl

The 1.5B Llama's heads (32 query, 8 kv, head_dim 64), bf16, 16-token blocks. Shapes: a
2,048-token chunk at context 0 and at context 1,802 (the second chunk of a 3,850-token
prompt, as the scheduler feeds it while others decode), and two whole 3,850-token
prompts in one step (the idle budget); mixed steps, a chunk after 16, 32 or 64 decode
rows at 3,900 keys (the long case once prompts have joined), and 32 rows alone; a
4,096-token chunk alone and beside 32 rows in a table of 256 seqs, as a served step's
graph has (the rest empty).
Time: a CUDA graph of 20 launches, median of 5; TFLOP/s counts the causal attention's
4 * head_dim * heads multiply-adds per visible (query, key) pair.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from mii_engines.runtime.kernels import triton_paged
from mii_engines.runtime.kernels.paged_attention import reference_paged_attention
from mii_engines.runtime.kernels.triton_paged import run_paged_attention
from kernel_check import replay_seconds  # this folder: run as a script

OUT = os.environ.get("OUT", "/tmp")
HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 64, 16
# (name, Tiles fields replaced in today's default, MIXED_SPLITS or None): the default
# first (a mixed step's decode rows apart, on a side stream, in 4 shares), then in 2 or
# 8 shares, apart but not alongside, and without each change of 2026-12-03 e (whole key
# tiles unmasked, the decode rows apart)
CANDIDATES = [("default", {}, None), ("splits2", {}, 2), ("splits8", {}, 8),
              ("not_alongside", {"rows_alongside": False}, None),
              ("apart_off", {"mixed_rows_apart": False}, None),
              ("before_e", {"whole_unmasked": False, "mixed_rows_apart": False}, None)]
DECODE_ROWS = [(1, 3900)] * 64  # the decode rows beside a chunk, at the long case's context
EMPTY = [(0, 0)] * 255  # a served mixed step's graph has room for 256 seqs
SHAPES = {"chunk2048_ctx0": [(2048, 0)], "chunk2048_ctx1802": [(2048, 1802)],
          "two_prompts_3850": [(3850, 0), (3850, 0)],
          "chunk4096_ctx0_256seqs": [(4096, 0)] + EMPTY,
          # decode rows first, as a mixed step packs them (kv/paged.py)
          "mixed_ctx0_16rows": DECODE_ROWS[:16] + [(2032, 0)],
          "mixed_ctx1802_32rows": DECODE_ROWS[:32] + [(2016, 1802)],
          "mixed4096_ctx1802_32rows_256seqs": DECODE_ROWS[:32] + [(4064, 1802)] + EMPTY[32:],
          "mixed_ctx1802_64rows": DECODE_ROWS + [(1984, 1802)],
          "decode_rows_32": DECODE_ROWS[:32]}


def log(**fields):
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(OUT, "varlen_tiles.jsonl"), "a") as out:
        out.write(line + "\n")


def inputs(seqs, seed=0):
    """Query, pools and tables for seqs of (query tokens, context before them)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per = [-(-(q + c) // BLOCK) for q, c in seqs]
    pool = sum(blocks_per) + 1
    keys = torch.randn(pool, BLOCK, KV_HEADS, DIM, generator=gen, device="cuda").bfloat16()
    values = torch.randn(pool, BLOCK, KV_HEADS, DIM, generator=gen, device="cuda").bfloat16()
    perm = (torch.randperm(pool - 1, generator=gen, device="cuda") + 1).int()
    tables = torch.zeros(len(seqs), max(blocks_per), dtype=torch.int32, device="cuda")
    used = 0
    for i, count in enumerate(blocks_per):
        tables[i, :count] = perm[used:used + count]
        used += count
    starts = [0]
    for q, _ in seqs:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], HEADS, DIM, generator=gen, device="cuda").bfloat16()
    i32 = dict(dtype=torch.int32, device="cuda")
    lens = torch.tensor([q + c for q, c in seqs], **i32)
    return query, keys, values, tables, lens, torch.tensor(starts, **i32)


def attend(args, out):
    run_paged_attention(*args, out, DIM ** -0.5, 0, 0.0, False)


def pairs(seqs):
    return sum(q * c + q * (q + 1) // 2 for q, c in seqs)


def main():
    default = triton_paged.varlen_tiles(DIM, HEADS // KV_HEADS, 2)
    default_splits = triton_paged.MIXED_SPLITS
    for name, fields, splits in CANDIDATES:
        tiles = dataclasses.replace(default, **fields)
        triton_paged.varlen_tiles = lambda *_a, _t=tiles: _t
        triton_paged.MIXED_SPLITS = splits or default_splits
        try:
            args = inputs([(300, 0), (65, 2049), (1, 900), (130, 37), (3, 40), (5, 7)], seed=1)
            out = torch.full_like(args[0], float("nan"))
            attend(args, out)
            ref = torch.empty(args[0].shape, dtype=torch.float32, device="cuda")
            reference_paged_attention(*[a.float() if a.is_floating_point() else a
                                        for a in args], ref, DIM ** -0.5, 0, 0.0)
            error = float((out.float() - ref).norm() / ref.norm())
            timed = {}
            for shape, seqs in SHAPES.items():
                args = inputs(seqs)
                out = torch.empty_like(args[0])
                for _ in range(2):
                    attend(args, out)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        attend(args, out)
                seconds = replay_seconds(graph, 20)
                timed[shape] = dict(us=round(seconds * 1e6, 1), tflops=round(
                    4 * DIM * HEADS * pairs(seqs) / seconds / 1e12, 1))
            log(tiles=name, error=error, ok=error < 2e-2, **timed)
        except Exception as failure:  # a candidate that does not fit: the next one runs
            log(tiles=name, error=repr(failure)[:300], ok=False)


if __name__ == "__main__":
    sys.exit(main())
