"""The paged-attention kernels on the GPU: checked against the torch reference, then timed.

    python3 bench/gpu/kernel_check.py      # JSON lines to $OUT/kernels.jsonl

Correctness: random caches, block tables, query lengths and context lengths (decode and
mixed steps, GQA, sliding windows, softcap) in bf16 and fp32; ||out - ref|| / ||ref||
against the reference computed in fp32 from the same inputs; outputs poisoned with NaN
first. Timing (CUDA graphs of 50 launches, median of 5): decode at the Llama-1B and
Mistral-7B head shapes, bytes of K/V read per call over the time = achieved bandwidth;
with block tables as wide as a served model's context (``table`` tokens: the split count a
graph gets) for each ``share_keys`` (the fewest keys a decode share takes). The greedy
argmax kernel against torch's argmax (ties, NaN, -inf rows) and timed against the torch
chunked argmax.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mii_engines.runtime.kernels.paged_attention import (  # noqa: E402
    paged_attention, reference_paged_attention, write_and_attend)
from mii_engines.runtime.kernels.triton_argmax import run_argmax  # noqa: E402
from mii_engines.runtime.kernels import triton_paged  # noqa: E402
from mii_engines.runtime.kernels.triton_paged import DECODE_SHARE_KEYS  # noqa: E402
from mii_engines.runtime.kernels.triton_paged import run_paged_attention  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")


@contextlib.contextmanager
def kernel_tiles(**fields):
    """Both tile choices of the paged kernels (varlen, decode) with ``fields`` replaced,
    for A/B timing in one process (``probe_paged.py`` uses it too)."""
    varlen, decode = triton_paged.varlen_tiles, triton_paged.decode_tiles
    triton_paged.varlen_tiles = lambda *a: dataclasses.replace(varlen(*a), **fields)
    triton_paged.decode_tiles = lambda *a: dataclasses.replace(decode(*a), **fields)
    try:
        yield
    finally:
        triton_paged.varlen_tiles, triton_paged.decode_tiles = varlen, decode


def log(**fields):
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(OUT, "kernels.jsonl"), "a") as out:
        out.write(line + "\n")


def inputs(seed, decode_only, heads, kv_heads, dim, dtype, block=16, max_blocks=64, seqs=None):
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_seqs = seqs or rnd.randint(1, 12)
    blocks = num_seqs * max_blocks + 1
    kc = torch.randn(blocks, block, kv_heads, dim, generator=gen, device="cuda").to(dtype)
    vc = torch.randn(blocks, block, kv_heads, dim, generator=gen, device="cuda").to(dtype)
    perm = torch.randperm(blocks - 1, generator=gen, device="cuda") + 1
    tables = perm[:num_seqs * max_blocks].view(num_seqs, max_blocks).to(torch.int32).contiguous()
    q_lens = [1 if decode_only else rnd.choice([0, 1, rnd.randint(1, 300)]) for _ in range(num_seqs)]
    lens = [max(q, rnd.randint(q, max_blocks * block)) if q else 0 for q in q_lens]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    tokens = starts[-1] + rnd.randint(0, 5)
    q = torch.randn(tokens, heads, dim, generator=gen, device="cuda").to(dtype)
    i32 = dict(dtype=torch.int32, device="cuda")
    return q, kc, vc, tables, torch.tensor(lens, **i32), torch.tensor(starts, **i32)


def check() -> bool:
    ok = True
    shapes = [(32, 8, 64), (32, 8, 128), (8, 1, 256), (12, 12, 64)]
    for seed in range(24):
        heads, kv_heads, dim = shapes[seed % len(shapes)]
        for dtype in (torch.bfloat16, torch.float32):
            decode_only = seed % 2 == 0
            window = [0, 0, 37, 300][seed % 4]
            softcap = 30.0 if seed % 5 == 4 else 0.0
            args = inputs(seed, decode_only, heads, kv_heads, dim, dtype)
            out = torch.full_like(args[0], float("nan"))
            paged_attention(*args, scale=dim ** -0.5, window=window, softcap=softcap,
                            decode_only=decode_only, out=out)
            ref = torch.empty(args[0].shape, dtype=torch.float32, device="cuda")
            fargs = [a.float() if a.is_floating_point() else a for a in args]
            reference_paged_attention(*fargs, ref, dim ** -0.5, window, softcap)
            torch.cuda.synchronize()
            error = float((out.float() - ref).norm() / ref.norm().clamp(min=1e-6))
            limit = 2e-2 if dtype == torch.bfloat16 else 1e-3
            good = error == error and error < limit and not torch.isnan(out).any().item()
            ok &= good
            log(kind="check", seed=seed, dtype=str(dtype), heads=heads, kv_heads=kv_heads,
                dim=dim, decode_only=decode_only, window=window, softcap=softcap,
                error=error, ok=good)
    return ok


def check_write() -> bool:
    """Decode steps through ``write_and_attend``: the decode kernel stores the new keys
    and values itself (the pool holds NaN at their slots before); against writing first
    and the reference, three times over."""
    ok = True
    for seed in range(12):
        heads, kv_heads, dim = [(32, 8, 64), (32, 8, 128), (12, 12, 64)][seed % 3]
        window = [0, 37][seed % 2]
        q, kc, vc, tables, lens, starts = inputs(seed, True, heads, kv_heads, dim,
                                                 torch.bfloat16)
        seqs, block = len(lens), kc.shape[1]
        positions = lens.long() - 1
        slots = torch.zeros(q.shape[0], dtype=torch.long, device="cuda")
        slots[:seqs] = tables.long()[torch.arange(seqs, device="cuda"), positions // block] \
            * block + positions % block
        gen = torch.Generator(device="cuda").manual_seed(seed)
        new_k = torch.randn(q.shape[0], kv_heads, dim, generator=gen, device="cuda").bfloat16()
        # the values as a model hands them over: a view whose rows are further apart
        # than the keys' (read with the keys' strides, they were wrong: 2026-12-02)
        new_v = torch.randn(q.shape[0], 2 * kv_heads, dim, generator=gen,
                            device="cuda").bfloat16()[:, kv_heads:]
        want_k, want_v = kc.clone(), vc.clone()
        for cache, new in ((want_k, new_k), (want_v, new_v)):
            cache.view(-1, kv_heads, dim)[slots[:seqs]] = new[:seqs]
        ref = torch.empty(q.shape, dtype=torch.float32, device="cuda")
        reference_paged_attention(q.float(), want_k.float(), want_v.float(), tables, lens,
                                  starts, ref, dim ** -0.5, window, 0.0)
        worst = 0.0
        for _ in range(3):
            for cache in (kc, vc):
                cache.view(-1, kv_heads, dim)[slots[:seqs]] = float("nan")
            out = write_and_attend(q, new_k, new_v, slots, kc, vc, tables, lens, starts,
                                   dim ** -0.5, window, 0.0, decode_only=True)
            torch.cuda.synchronize()
            error = float((out.float() - ref).norm() / ref.norm().clamp(min=1e-6))
            worst = max(worst, error if error == error else float("inf"))
        good = worst < 2e-2 and torch.equal(kc, want_k) and torch.equal(vc, want_v)
        ok &= good
        log(kind="check_write", seed=seed, heads=heads, kv_heads=kv_heads, dim=dim,
            window=window, error=worst, ok=good)
    return ok


def replay_seconds(graph: torch.cuda.CUDAGraph, calls: int, reps: int = 5) -> float:
    """Seconds per call of a graph capturing ``calls`` calls: the median of ``reps`` replays."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls * 1e-3)
    return statistics.median(times)


def graph_seconds(call, calls: int = 50) -> float:
    """Seconds per call of ``call`` replayed in a CUDA graph of ``calls`` calls."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize()
    return replay_seconds(graph, calls)


def time_decode(seqs, context, heads, kv_heads, dim, block=16, table=0,
                share_keys=DECODE_SHARE_KEYS, unmasked=True):
    """``table``: tokens the block tables hold (0: the context), which sets the split count
    as in a served graph (the model's whole context). ``unmasked`` False: every key tile
    masked (the kernel before 2026-12-03 e), for A/B."""
    max_blocks = -(-max(context, table) // block)
    args = list(inputs(0, True, heads, kv_heads, dim, torch.bfloat16, block, max_blocks, seqs))
    args[4] = torch.full((seqs,), context, dtype=torch.int32, device="cuda")
    out = torch.empty_like(args[0])
    call = lambda: run_paged_attention(*args, out, dim ** -0.5, 0, 0.0, True,  # noqa: E731
                                       share_keys=share_keys)
    with kernel_tiles(whole_unmasked=unmasked):  # the graph captures the launches' tiles
        seconds = graph_seconds(call)  # the output of the 50th launch of a replay is checked
    ref = torch.empty(args[0].shape, dtype=torch.float32, device="cuda")
    reference_paged_attention(*[a.float() if a.is_floating_point() else a for a in args], ref,
                              dim ** -0.5, 0, 0.0)
    error = float((out.float() - ref).norm() / ref.norm())
    kv_bytes = 2 * seqs * context * kv_heads * dim * 2
    log(kind="time_decode", seqs=seqs, context=context, table=table, share_keys=share_keys,
        unmasked=unmasked,
        heads=heads, kv_heads=kv_heads, dim=dim, us=round(seconds * 1e6, 2),
        kv_gb_s=round(kv_bytes / seconds / 1e9, 1), error=error, ok=error < 2e-2)
    return error < 2e-2


def check_argmax() -> bool:
    """The argmax kernel = torch's argmax, then both timed (bf16, 128,256 tokens)."""
    from mii_engines.runtime import sampling

    ok = True
    vocab = 128256
    for rows in (1, 16, 64, 256):
        gen = torch.Generator(device="cuda").manual_seed(rows)
        logits = torch.randn(rows, vocab + 8, generator=gen, device="cuda").bfloat16()[:, :vocab]
        logits[0, 5000:] = 40.0  # ties across chunks: the first wins
        if rows > 1:
            logits[1, [7000, 90000]] = float("nan")
        if rows > 2:
            logits[2] = float("-inf")
        good = torch.equal(run_argmax(logits), logits.argmax(dim=-1))
        kernel_s = graph_seconds(lambda: run_argmax(logits))
        wanted = sampling.kernel_wanted
        sampling.kernel_wanted = lambda device: False  # the torch chunked path
        try:
            torch_s = graph_seconds(lambda: sampling.argmax_rows(logits))
        finally:
            sampling.kernel_wanted = wanted
        ok &= good
        log(kind="argmax", rows=rows, ok=good, kernel_us=round(kernel_s * 1e6, 2),
            torch_chunked_us=round(torch_s * 1e6, 2))
    return ok


if __name__ == "__main__":
    good = check() & check_write() & check_argmax()
    for seqs, context in ((1, 256), (64, 256), (256, 640), (64, 4096)):
        good &= time_decode(seqs, context, 32, 8, 64)
        good &= time_decode(seqs, context, 32, 8, 128)
    # as served: one row's table spans a 128k context (1.5B) / 32k (7.2B), so it gets the
    # most splits; at 16 and 64 rows filling the GPU sets them (an 8k table suffices)
    for seqs, context in ((1, 256), (1, 1024), (1, 4096), (16, 256), (64, 256)):
        for share_keys in (64, 256, 512):
            good &= time_decode(seqs, context, 32, 8, 64, table=131072 if seqs == 1 else 8192,
                                share_keys=share_keys)
        good &= time_decode(seqs, context, 32, 8, 128, table=32768 if seqs == 1 else 8192)
    for unmasked in (True, False):  # the long case's decode tail (32 rows), one long row
        good &= time_decode(32, 3900, 32, 8, 64, unmasked=unmasked)
        good &= time_decode(1, 4096, 32, 8, 64, table=131072, unmasked=unmasked)
    log(kind="summary", all_ok=good)
    sys.exit(0 if good else 1)
