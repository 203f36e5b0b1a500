"""The Triton paged-attention kernels against the torch reference, in Triton's interpreter
on CPU tensors (the GPU run of the same check is ``bench/gpu/kernel_check.py``).

Random caches, block tables, query and context lengths; decode (with and without
split-KV) and mixed steps; GQA, sliding windows, softcap, padding tokens. Outputs are
poisoned with NaN first, so an unwritten element fails."""
from __future__ import annotations

import importlib
import os
import random
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
triton = pytest.importorskip("triton", reason="triton is not installed")

from engine_helpers import Collector, load, loop_for, running  # noqa: E402

from mii_core.config.models import GenerateParamsConfig  # noqa: E402
from mii_engines.runtime.kernels.paged_attention import reference_paged_attention  # noqa: E402
from mii_engines.runtime.kernels.triton_paged import (  # noqa: E402
    NewKeys, decode_splits, run_paged_attention)


def _case(seed, decode_only, heads, kv_heads, dim, block, max_blocks=6):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = rnd.randint(1, 4)
    pool = max(40, 4 * max_blocks + 1)
    keys = torch.randn(pool, block, kv_heads, dim, generator=gen)
    values = torch.randn(pool, block, kv_heads, dim, generator=gen)
    tables = (torch.randperm(pool - 1, generator=gen)[:seqs * max_blocks] + 1)
    tables = tables.view(seqs, max_blocks).to(torch.int32).contiguous()
    q_lens = [1 if decode_only else rnd.choice([0, 1, rnd.randint(2, 11)]) for _ in range(seqs)]
    lens = [rnd.randint(q, max_blocks * block) if q else 0 for q in q_lens]
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1] + rnd.randint(0, 3), heads, dim, generator=gen)
    return (query, keys, values, tables, torch.tensor(lens, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32))


@pytest.mark.parametrize("decode_only,splits", [(True, None), (True, 3), (False, None),
                                                (False, 3)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 4.0), (7, 4.0)])
@pytest.mark.parametrize("heads,kv_heads,dim,block", [(4, 2, 16, 4), (6, 6, 8, 8),
                                                      (8, 1, 24, 4)])
def test_kernels_match_the_reference(decode_only, splits, window, softcap, heads, kv_heads,
                                     dim, block):
    for seed in range(3):
        args = _case(seed * 100 + heads + dim, decode_only, heads, kv_heads, dim, block)
        expected = torch.full_like(args[0], float("nan"))
        got = torch.full_like(args[0], float("nan"))
        reference_paged_attention(*args, expected, dim ** -0.5, window, softcap)
        run_paged_attention(*args, got, dim ** -0.5, window, softcap, decode_only, splits)
        assert not torch.isnan(got).any()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("small_rows,heavy_first,apart,unmasked", [
    (True, True, True, True), (False, True, True, True), (True, False, True, True),
    (False, False, False, True), (True, True, False, False), (True, True, True, False)])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 1, 0), (4, 2, 0), (6, 6, 0),
                                                   (4, 2, 9)])
def test_varlen_short_runs_on_the_small_tile_and_long_ones_on_the_wide(
        monkeypatch, small_rows, heavy_first, apart, unmasked, heads, kv_heads, window):
    """A mixed step whose seqs have 1, SMALL_Q, SMALL_Q + 1 and several tiles' worth of
    queries (fp32 tiles: 64 rows; the small tile 16): the ones up to SMALL_Q take the
    16-row tile, the others the wide one, in either program order, the seqs of one query
    in a decode launch of their own (``apart``; the last one past MIXED_APART_SEQS, as 2
    here, stays in the varlen launch), whole key tiles unmasked or not; every output
    matches the reference, padding tokens included."""
    paged = importlib.import_module("mii_engines.runtime.kernels.triton_paged")
    chosen = paged.varlen_tiles(16, heads // kv_heads, 4)
    monkeypatch.setattr(paged, "varlen_tiles", lambda *_: paged.Tiles(
        chosen.block_m, chosen.block_n, chosen.num_warps, chosen.num_stages,
        small_rows=small_rows, heavy_first=heavy_first, mixed_rows_apart=apart,
        whole_unmasked=unmasked))
    monkeypatch.setattr(paged, "MIXED_APART_SEQS", 2)
    group_p2 = triton.next_power_of_2(heads // kv_heads)
    small_q, block_q = max(1, 16 // group_p2), chosen.block_m // group_p2
    assert small_q < block_q  # both tiles are used
    dim, block = 16, 4
    gen = torch.Generator().manual_seed(heads + kv_heads + window)
    q_lens = [1, small_q, small_q + 1, 2 * block_q + 3, 1]
    contexts = [70, 5, 0, 17, 0]
    blocks = [-(-(q + c) // block) for q, c in zip(q_lens, contexts)]
    pool = sum(blocks) + 1
    keys = torch.randn(pool, block, kv_heads, dim, generator=gen)
    values = torch.randn(pool, block, kv_heads, dim, generator=gen)
    order = (torch.randperm(pool - 1, generator=gen) + 1).to(torch.int32)
    tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    taken = 0
    for seq, count in enumerate(blocks):
        tables[seq, :count] = order[taken:taken + count]
        taken += count
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    query = torch.randn(int(starts[-1]) + 5, heads, dim, generator=gen)  # 5 padding tokens
    lens = torch.tensor([q + c for q, c in zip(q_lens, contexts)], dtype=torch.int32)
    args = (query, keys, values, tables, lens, starts)
    expected = torch.full_like(query, float("nan"))
    got = torch.full_like(query, float("nan"))
    reference_paged_attention(*args, expected, dim ** -0.5, window, 0.0)
    run_paged_attention(*args, got, dim ** -0.5, window, 0.0, False, splits=3, share_keys=16)
    assert not torch.isnan(got).any()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("splits,share_keys", [(2, 1), (3, 1), (5, 64), (4, 10_000)])
@pytest.mark.parametrize("window", [0, 37])
def test_decode_shares_split_long_contexts_and_merge(splits, share_keys, window):
    """Contexts of up to 240 keys in 32-key tiles (fp32): split into at most ``splits``
    shares of at least ``share_keys`` keys, some shares left unused, merged by the
    combine; one share (share_keys beyond every context) writes the output alone."""
    heads, kv_heads, dim, block = 4, 2, 16, 8
    longest = 0
    for seed in range(6):
        args = _case(seed, True, heads, kv_heads, dim, block, max_blocks=30)
        longest = max(longest, int(args[4].max()))
        expected = torch.full_like(args[0], float("nan"))
        got = torch.full_like(args[0], float("nan"))
        reference_paged_attention(*args, expected, dim ** -0.5, window, 0.0)
        run_paged_attention(*args, got, dim ** -0.5, window, 0.0, True, splits,
                            share_keys=share_keys)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert longest > 160  # five tiles or more: every split count above has work


@pytest.mark.parametrize("splits,share_keys", [(1, 256), (3, 256), (3, 1)])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_kernel_writes_the_new_keys_then_attends(splits, share_keys, window):
    """Given the step's keys/values, the decode kernel stores them at their slots (the
    pool there holds NaN before) and attends as if they had been written first; keys and
    values are read with their own strides (with the keys' strides for both, every
    value but token 0's came from the wrong row: wrong tokens on the GPU, 2026-12-02)."""
    heads, kv_heads, dim, block = 4, 2, 16, 4
    for seed in range(4):
        query, keys, values, tables, lens, starts = _case(seed, True, heads, kv_heads, dim,
                                                          block, max_blocks=30)
        tokens = query.shape[0]
        gen = torch.Generator().manual_seed(seed)
        # As a model hands them over: views with the same shape but rows of different
        # strides (the values here are half of a wider projection's output).
        new_keys = torch.randn(tokens, kv_heads, dim, generator=gen)
        new_values = torch.randn(tokens, 2 * kv_heads, dim, generator=gen)[:, kv_heads:]
        assert new_keys.stride(0) != new_values.stride(0)
        slots = torch.zeros(tokens, dtype=torch.long)  # padding tokens: slot 0, unwritten
        for seq, length in enumerate(lens.tolist()):
            position = length - 1
            slots[seq] = tables[seq, position // block] * block + position % block
        expected_keys, expected_values = keys.clone(), values.clone()
        for cache, new in ((expected_keys, new_keys), (expected_values, new_values)):
            cache.view(-1, kv_heads, dim)[slots[:len(lens)]] = new[:len(lens)]
        for cache in (keys, values):
            cache.view(-1, kv_heads, dim)[slots[:len(lens)]] = float("nan")
        expected = torch.full_like(query, float("nan"))
        got = torch.full_like(query, float("nan"))
        reference_paged_attention(query, expected_keys, expected_values, tables, lens,
                                  starts, expected, dim ** -0.5, window, 0.0)
        run_paged_attention(query, keys, values, tables, lens, starts, got, dim ** -0.5,
                            window, 0.0, True, splits, new=NewKeys(new_keys, new_values, slots),
                            share_keys=share_keys)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.parametrize("splits", [1, 3])
def test_a_mixed_steps_decode_launch_takes_its_first_single_query_seqs_only(monkeypatch,
                                                                           splits):
    """Run alone, the decode launches of a mixed step write exactly the seqs of one query
    among its first MIXED_APART_SEQS (here 3), and those right; the varlen launch alone
    writes every other token (chunks, a single query past the first 3, padding) and none
    of those: each launch owns its rows, neither relies on the other overwriting it."""
    paged = importlib.import_module("mii_engines.runtime.kernels.triton_paged")
    monkeypatch.setattr(paged, "MIXED_APART_SEQS", 3)
    heads, kv_heads, dim, block = 4, 2, 16, 4
    gen = torch.Generator().manual_seed(splits)
    q_lens, contexts = [1, 6, 1, 1, 0, 3], [70, 9, 33, 5, 0, 0]
    blocks = [max(1, -(-(q + c) // block)) for q, c in zip(q_lens, contexts)]
    keys = torch.randn(sum(blocks) + 1, block, kv_heads, dim, generator=gen)
    values = torch.randn(sum(blocks) + 1, block, kv_heads, dim, generator=gen)
    tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    taken = 1
    for seq, count in enumerate(blocks):
        tables[seq, :count] = torch.arange(taken, taken + count, dtype=torch.int32)
        taken += count
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor([q + c for q, c in zip(q_lens, contexts)], dtype=torch.int32)
    query = torch.randn(int(starts[-1]) + 2, heads, dim, generator=gen)  # 2 padding tokens
    args = (query, keys, values, tables, lens, starts)
    expected = torch.full_like(query, float("nan"))
    reference_paged_attention(*args, expected, dim ** -0.5, 0, 0.0)
    expected[int(starts[-1]):] = 0.0
    launches = paged.plan_launches(*args, torch.empty_like(query), dim ** -0.5, 0, 0.0, False,
                                   splits, share_keys=16)
    assert [launch.kernel for launch in launches] == (
        [paged._decode_kernel] + [paged._combine_kernel] * (splits > 1) + [paged._varlen_kernel])
    apart_tokens = [int(starts[s]) for s in (0, 2)]  # seq 3 is the 4th: not apart
    for part in (launches[:-1], launches[-1:]):
        out = torch.full_like(query, float("nan"))
        for launch in part:
            launch.args["out_ptr"] = out
            launch.run()
        written = [t for t in range(query.shape[0]) if not torch.isnan(out[t]).any()]
        if part[-1].kernel is paged._varlen_kernel:
            assert written == [t for t in range(query.shape[0]) if t not in apart_tokens]
        else:
            assert written == apart_tokens
        assert torch.allclose(out[written], expected[written], atol=1e-5, rtol=1e-4)


def test_decode_splits_fill_the_gpu_only_when_the_batch_does_not():
    assert decode_splits(1, 8, 256, 16, 64, 132) == 16  # capped at MAX_DECODE_SPLITS
    assert decode_splits(64, 8, 256, 16, 64, 132) == 1
    assert decode_splits(1, 8, 2, 16, 64, 132) == 1  # never more shares than key tiles


@contextmanager
def triton_on_cpu(checked: list):
    """CPU tensors take the ops' CUDA implementations (the Triton kernels, in the
    interpreter): what a GPU runs, on the tiny model. Each decode step's fused write is
    also run as write-then-attend on copies; ``checked`` gets (rows, largest difference
    of the pools and the outputs)."""
    ops = importlib.import_module("mii_engines.runtime.kernels.paged_attention")

    def write_and_attend(query, new_keys, new_values, slots, keys, values, *rest):
        tables, lens, starts, out, scale, window, softcap, decode_only = rest
        if decode_only:
            keys2, values2, out2 = keys.clone(), values.clone(), out.clone()
            ops._write(new_keys, new_values, slots, keys2, values2)
            ops._paged_attention_cuda(query, keys2, values2, tables, lens, starts, out2,
                                      scale, window, softcap, True)
        ops._write_and_attend_cuda(query, new_keys, new_values, slots, keys, values, *rest)
        if decode_only:
            checked.append((tables.shape[0], max(float((a - b).abs().max()) for a, b in
                                                 ((keys, keys2), (values, values2),
                                                  (out, out2)))))

    ops._paged_attention_op.register_kernel("cpu")(ops._paged_attention_cuda)
    ops._write_and_attend_op.register_kernel("cpu")(write_and_attend)
    try:
        yield
    finally:
        ops._paged_attention_op.register_kernel("cpu")(ops._paged_attention_default)
        ops._write_and_attend_op.register_kernel("cpu")(ops._write_and_attend_default)


def test_the_engine_on_the_triton_kernels_gives_the_dynamic_caches_tokens(tiny_model):
    """Prompts arriving one by one while others decode (decode steps of several rows,
    mixed steps with a cached prefix) give each prompt's tokens alone on the dynamic
    cache, and every fused decode write stores what writing first stores. The kernels'
    own tests feed them one memory layout; the model feeds others (its values were
    read with the keys' strides: wrong tokens on the GPU, 2026-12-02)."""
    shared = "Seattle is a city in the northwest corner of the United States and"
    prompts = [shared + tail for tail in (" DeepSpeed", " graphics", " the model")]
    params = GenerateParamsConfig(do_sample=False, max_new_tokens=12, ignore_eos=True,
                                  stream=True)  # a first event at the first token

    def generate(loop, texts):
        sinks = [Collector(1) for _ in texts]
        for text, sink in zip(texts, sinks):
            loop.submit([text], params, sink)
            assert sink.first.wait(60)  # the next arrives while this one decodes
        assert all(sink.done.wait(120) for sink in sinks)
        return [sink.texts()[0] for sink in sinks]

    with running(loop_for(load(tiny_model), "dynamic")) as loop:
        expected = [generate(loop, [text])[0] for text in prompts]
    checked = []
    with triton_on_cpu(checked), running(loop_for(load(tiny_model), "paged",
                                                  pipelined=True)) as loop:
        generate(loop, [shared])  # its blocks are then a cached prefix
        got = generate(loop, prompts)
    assert any(rows > 1 for rows, _ in checked), f"no decode step of several rows: {checked}"
    assert max(difference for _, difference in checked) == 0.0
    assert got == expected
