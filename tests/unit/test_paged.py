"""The paged KV cache on the tiny model: block accounting, prefix caching, chunked
prefill, preemption, fallbacks. Real forward passes on the CPU (the paged attention's
torch reference; the Triton kernels have their own tests), no timings."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from engine_helpers import (GREEDY, PROMPTS, Collector, load, loop_for, run, running,
                            latent_attention_model, settled_stats)

from mii_core.config.models import GenerateParamsConfig, ModelConfig
from mii_core.errors import ConfigError, InvalidGenerateParams
from mii_engines.runtime.kv import choose
from mii_engines.runtime.kv.blocks import BlockPool, PagedSpace
from mii_engines.runtime.kv.paged import GRAPH_RESERVE_BYTES, PagedState, pool_blocks
from mii_engines.runtime.scheduler import Budgets

LONG = " ".join(f"word{i % 7}" for i in range(25))  # 100 tokens: several blocks


@pytest.fixture(scope="module")
def reference_texts(tiny_model):
    """What the dynamic cache gives for every prompt used here, greedy, 24 new tokens."""
    with running(loop_for(load(tiny_model), "dynamic")) as loop:
        prompts = PROMPTS + [LONG, LONG + " and more", PROMPTS[1] + " " + LONG]
        texts = run(loop, prompts, **GREEDY).texts()
        return {prompt: texts[i] for i, prompt in enumerate(prompts)}


def paged_loop(tiny_model, **kwargs):
    return loop_for(load(tiny_model), "paged", **kwargs)


# -- the pool and the tables -----------------------------------------------------------------
def test_blocks_are_counted_freed_and_never_shared_while_written():
    pool = BlockPool(9)  # block 0 is the trash block: 8 usable
    space = PagedSpace(pool, block_size=4, max_tokens=1000, prefix_caching=False)
    assert space.open(0, list(range(10))) == 0
    assert space.reserve(0, 10) and len(space.blocks_of(0)) == 3
    assert space.open(1, list(range(50, 70))) == 0
    assert space.reserve(1, 20) and len(space.blocks_of(1)) == 5
    assert pool.used() == 8 and pool.available() == 0
    assert not space.reserve(0, 13)  # a fourth block: none left, nothing changed
    assert len(space.blocks_of(0)) == 3
    assert set(space.blocks_of(0)).isdisjoint(space.blocks_of(1))
    assert 0 not in space.blocks_of(0) + space.blocks_of(1)
    space.close(1)
    assert space.reserve(0, 13) and pool.used() == 4
    space.close(0)
    assert pool.used() == 0 and pool.peak_used == 8
    updates = space.take_table_updates()
    assert updates[0] == (0, 0, updates[0][2]) and len(updates[0][2]) == 3
    assert space.take_table_updates() == []


def test_a_block_released_more_often_than_taken_is_an_error():
    pool = BlockPool(3)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(block)


def test_prefix_hits_share_full_prompt_blocks_and_always_leave_one_token():
    pool = BlockPool(32)
    space = PagedSpace(pool, block_size=4, max_tokens=1000)
    prompt = list(range(100, 114))  # 14 tokens: 3 full blocks + 2
    assert space.open(0, prompt) == 0
    assert space.reserve(0, 14)
    space.fed(0, prompt, 0)
    first = space.blocks_of(0)
    # The same prompt: the 3 full blocks are hits; the rest is computed.
    assert space.open(1, prompt) == 12
    assert space.blocks_of(1) == first[:3] and pool.refs[first[0]] == 2
    # A prompt that is exactly the cached blocks: the last block is computed again, so
    # that one token's logits give the first new token.
    assert space.open(2, prompt[:12]) == 8
    # A different second block: only the first block is shared.
    assert space.open(3, prompt[:4] + [7, 7, 7, 7] + prompt[8:]) == 4
    assert space.prefix_hit_tokens == 12 + 8 + 4
    for slot in (0, 1, 2, 3):
        space.close(slot)
    assert pool.used() == 0


def test_cached_blocks_are_evicted_least_recently_released_first():
    pool = BlockPool(5)  # 4 usable
    space = PagedSpace(pool, block_size=2, max_tokens=100)
    for slot, prompt in ((0, [1, 2, 3]), (1, [4, 5, 6])):
        space.open(slot, prompt)
        space.reserve(slot, 3)
        space.fed(slot, prompt, 0)
    space.close(0)  # its first block stays cached (evictable) ...
    space.close(1)  # ... and so does this one, released later
    assert pool.used() == 0 and pool.available() == 4
    space.open(2, [9, 9, 9, 9, 9])  # no hit: takes the two never-cached blocks first,
    assert space.reserve(2, 5)  # then the oldest cached one ([1, 2]); [4, 5] survives
    assert space.open(3, [4, 5, 6]) == 2
    assert space.open(4, [1, 2, 3]) == 0


@pytest.mark.parametrize("seed", range(3))
def test_randomized_tables_never_leak_or_share_written_blocks(seed):
    draw = random.Random(seed)
    pool = BlockPool(40)
    space = PagedSpace(pool, block_size=4, max_tokens=200)
    lengths = {}
    prefixes = [[draw.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(400):
        slot = draw.randrange(8)
        if slot in lengths and draw.random() < 0.3:
            space.close(slot)
            del lengths[slot]
        elif slot in lengths:
            if space.reserve(slot, lengths[slot] + 1):
                lengths[slot] += 1
        else:
            prompt = draw.choice(prefixes) + [draw.randrange(50) for _ in range(draw.randrange(1, 9))]
            hit = space.open(slot, prompt)
            if space.reserve(slot, len(prompt)):
                space.fed(slot, prompt[hit:], hit)
                lengths[slot] = len(prompt)
            else:
                space.close(slot)
        # Every block is referenced once per table holding it, and written blocks (past
        # the shared full prefix blocks) belong to one table only.
        counts = {}
        for open_slot in lengths:
            for block in space.blocks_of(open_slot):
                counts[block] = counts.get(block, 0) + 1
        assert all(pool.refs[block] == n for block, n in counts.items())
        for open_slot, length in lengths.items():
            tail = space.blocks_of(open_slot)[(length - 1) // 4:]
            assert all(counts[block] == 1 for block in tail)
    for slot in list(lengths):
        space.close(slot)
    assert pool.used() == 0 and sum(pool.refs) == 0


def test_the_pool_takes_the_memory_fraction_less_weights_activations_and_reserve():
    gib = 2**30
    # 140 GiB card, 10 GiB in use after loading, 2 GiB activation peak, 0.5 MiB blocks.
    blocks = pool_blocks(140 * gib, 130 * gib, 2 * gib, 2**19, 0.9, cap=10**9)
    expected = (0.9 * 140 * gib - 10 * gib - 4 * gib - GRAPH_RESERVE_BYTES) // 2**19
    assert blocks == expected
    assert pool_blocks(140 * gib, 130 * gib, 2 * gib, 2**19, 0.9, cap=1000) == 1000
    assert pool_blocks(80 * gib, 10 * gib, 2 * gib, 2**19, 0.9, cap=10**9) == 0  # no room


# -- the paged cache serving -------------------------------------------------------------------
def test_paged_greedy_equals_dynamic_with_prefix_caching_on_and_off(tiny_model, reference_texts):
    prompts = list(reference_texts)
    for prefix_caching in (True, False):
        with running(paged_loop(tiny_model, prefix_caching=prefix_caching)) as loop:
            first = run(loop, prompts, **GREEDY).texts()
            again = run(loop, prompts, **GREEDY).texts()  # prefix hits (when on)
            stats = settled_stats(loop).kv
        assert [first[i] for i in range(len(prompts))] == list(reference_texts.values())
        assert again == first
        assert (stats["prefix_hit_tokens"] > 0) == prefix_caching
        assert stats["blocks_used"] == 0 and stats["kind"] == "paged"


def test_chunked_prefill_gives_one_shot_tokens_while_rows_keep_decoding(tiny_model,
                                                                        reference_texts):
    """A 16-token budget splits LONG over several steps; the decoding row gets a token in
    every one of them."""
    loop = paged_loop(tiny_model, budgets=Budgets(idle=16, decoding=16), prefix_caching=False)
    steps = []
    original = loop.executor.state.apply
    loop.executor.state.apply = lambda plan: steps.append(plan) or original(plan)
    with running(loop):
        decoding = Collector(1)
        loop.submit([PROMPTS[0]], GenerateParamsConfig(**dict(GREEDY, stream=True)), decoding)
        assert decoding.first.wait(30)
        long = run(loop, [LONG], **GREEDY)
        assert decoding.done.wait(60)
    assert long.texts()[0] == reference_texts[LONG]
    assert decoding.texts()[0] == reference_texts[PROMPTS[0]]
    chunked = [plan for plan in steps if plan.chunks and not plan.chunks[-1].sample]
    assert len(chunked) >= 3, "the long prompt was fed over several steps"
    assert all(max(len(c.tokens) for c in plan.chunks) <= 16 for plan in steps if plan.chunks)
    assert all(plan.decode_slots for plan in chunked), "decoding went on while it was fed"


def test_a_step_with_decode_rows_stays_within_the_budget_they_count_in(tiny_model,
                                                                        reference_texts):
    """While rows decode, their tokens count against the step's budget
    (``prefill_chunk_tokens``; one packed forward: 16 prompt tokens beside 3 rows would pad
    to the next graph bucket), and at least half of it still goes to the prompt."""
    loop = paged_loop(tiny_model, prefill_chunk_tokens=16, prefix_caching=False)
    assert loop.scheduler.budgets == Budgets(idle=Budgets.idle, decoding=16)
    steps = []
    original = loop.executor.state.apply
    loop.executor.state.apply = lambda plan: steps.append(plan) or original(plan)
    with running(loop):
        decoding = Collector(3)
        loop.submit(PROMPTS[:3], GenerateParamsConfig(**dict(GREEDY, stream=True)), decoding)
        assert decoding.first.wait(30)
        long = run(loop, [LONG], **GREEDY)
        assert decoding.done.wait(60)
    assert long.texts()[0] == reference_texts[LONG]
    mixed = [(len(plan.decode_slots), sum(len(c.tokens) for c in plan.chunks))
             for plan in steps if plan.chunks and plan.decode_slots]
    assert mixed and all(rows + tokens <= 16 and tokens >= 1 for rows, tokens in mixed)
    assert (3, 13) in mixed, mixed  # the long prompt's chunks beside the three rows


def test_a_chunk_budget_above_the_idle_one_raises_it():
    """A step never feeds fewer prompt tokens with nothing decoding than while rows decode."""
    config = ModelConfig(model_name_or_path="m", prefill_chunk_tokens=12288)
    assert choose.budgets_for(config) == Budgets(idle=12288, decoding=12288)
    assert choose.budgets_for(ModelConfig(model_name_or_path="m")) == Budgets()


def test_preemption_recomputes_and_loses_nothing(tiny_model, reference_texts):
    """A pool far too small for the batch: sequences are preempted and recomputed, and
    every one still gets the tokens it gets alone."""
    prompts = list(reference_texts)
    with running(paged_loop(tiny_model, kv_blocks=12, max_batch_size=6,
                            prefix_caching=False)) as loop:
        out = run(loop, prompts, **GREEDY)
        stats = settled_stats(loop).kv
    assert [out.texts()[i] for i in range(len(prompts))] == list(reference_texts.values())
    assert all(out.final(i).finish_reason == "length" for i in range(len(prompts)))
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0


@pytest.mark.parametrize("blocks,prefix_caching", [(12, False), (14, True), (16, False)])
def test_preemption_in_the_pipelined_loop_loses_no_token_in_flight(tiny_model, blocks,
                                                                   prefix_caching):
    """Pipelined (the GPU default), the token sampled for a row is still on its way to the
    host when the next step is scheduled: a row preempted then must not be recomputed in
    that same step, or it misses that token and samples it twice."""
    long = " ".join(f"word{i % 7}" for i in range(25))
    prompts = PROMPTS + [long, long + " and more", PROMPTS[1] + " " + long] + [
        p + " again" for p in PROMPTS]
    params = dict(do_sample=False, max_new_tokens=40, ignore_eos=True)
    with running(loop_for(load(tiny_model), "dynamic", max_batch_size=16)) as loop:
        expected = run(loop, prompts, **params).texts()
    with running(paged_loop(tiny_model, kv_blocks=blocks, max_batch_size=8, pipelined=True,
                            prefix_caching=prefix_caching, max_queue_size=64)) as loop:
        got = run(loop, prompts, **params).texts()
        stats = settled_stats(loop).kv
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0
    assert [got[i] for i in range(len(prompts))] == [expected[i] for i in range(len(prompts))]


def test_a_sequence_longer_than_the_whole_pool_is_refused_at_submit(tiny_model):
    loop = paged_loop(tiny_model, kv_blocks=5, max_batch_size=2)  # 4 x 16 = 64 tokens
    with pytest.raises(InvalidGenerateParams, match="limit here is 64"):
        loop.submit([LONG], GenerateParamsConfig(max_new_tokens=4), Collector(1))


def test_randomized_joins_cancels_and_errors_leave_no_block_in_use(tiny_model):
    draw = random.Random(0)
    loop = paged_loop(tiny_model, kv_blocks=24, max_batch_size=4, max_queue_size=64)
    with running(loop):
        sinks, handles = [], []
        for index in range(24):
            sink = Collector(1)
            prompt = draw.choice(PROMPTS + [LONG])
            params = GenerateParamsConfig(do_sample=False, ignore_eos=True, stream=True,
                                          max_new_tokens=draw.randrange(1, 40))
            handles.append(loop.submit([prompt], params, sink))
            sinks.append(sink)
            if draw.random() < 0.3:
                handles[draw.randrange(len(handles))].cancel()
        for sink in sinks:
            assert sink.done.wait(60)
        stats = settled_stats(loop).kv
    reasons = {sink.final(0).finish_reason for sink in sinks}
    assert reasons <= {"length", "cancelled"} and "cancelled" in reasons
    assert stats["blocks_used"] == 0 and stats["blocks_peak"] <= 23


def test_a_failing_step_fails_its_rows_and_frees_their_blocks(tiny_model):
    loaded = load(tiny_model)
    loop = loop_for(loaded, "paged", max_batch_size=2)
    running_sink, queued = Collector(1), Collector(1)
    loop.submit([PROMPTS[0]], GenerateParamsConfig(**GREEDY), running_sink)
    loop.submit([PROMPTS[1]], GenerateParamsConfig(**GREEDY), queued)
    original = loop.executor.state.apply

    def broken(plan):
        raise RuntimeError("simulated device error")

    loop.executor.state.apply = broken
    raised = []
    thread = threading.Thread(target=lambda: raised.append(_run_and_catch(loop)))
    thread.start()
    thread.join(timeout=30)
    loop.executor.state.apply = original
    assert isinstance(raised[0], RuntimeError)
    assert running_sink.final(0).finish_reason == "error"
    assert loop.scheduler.space.stats().blocks_used == 0


def _run_and_catch(loop):
    try:
        loop.run()
    except Exception as error:
        return error
    return None


# -- when the paged cache cannot serve a model ---------------------------------------------------
def test_latent_attention_falls_back_to_the_dynamic_cache_with_the_reason(tiny_model, caplog):
    loaded = load(tiny_model)
    loaded.model = latent_attention_model()
    config = ModelConfig(model_name_or_path="x", max_batch_size=2, kv_blocks=16)
    with pytest.raises(ConfigError, match="differ in head size"):
        choose.paged_or_fallback(loaded, config, 1, fallback=False)
    setup = choose.paged_or_fallback(loaded, config, 1, fallback=True)
    assert setup.kind == "dynamic"
    assert "differ in head size" in caplog.text and "using the dynamic cache" in caplog.text
    assert loaded.model.config._attn_implementation == "sdpa"  # given back


def test_a_model_that_does_not_call_the_attention_interface_falls_back(tiny_model):
    loaded = load(tiny_model)
    for layer in loaded.model.model.layers:  # attention computed without the interface
        layer.self_attn.forward = _own_attention(layer.self_attn)
    config = ModelConfig(model_name_or_path="x", max_batch_size=2, kv_blocks=16)
    with pytest.raises(ConfigError, match="0 attention calls for"):
        choose.paged_or_fallback(loaded, config, 1, fallback=False)


def _own_attention(module):
    def forward(hidden_states, attention_mask=None, **kwargs):
        return module.o_proj(hidden_states), None
    return forward


def test_logits_that_disagree_with_the_model_are_refused(tiny_model, monkeypatch):
    import importlib

    kernels = importlib.import_module("mii_engines.runtime.kernels.paged_attention")

    loaded = load(tiny_model)
    real = kernels.write_and_attend
    monkeypatch.setattr(kernels, "write_and_attend",
                        lambda *args, **kwargs: real(*args, **kwargs) * 0.5)
    config = ModelConfig(model_name_or_path="x", max_batch_size=2, kv_blocks=16)
    with pytest.raises(ConfigError, match="logits differ from the model's own"):
        choose.paged_or_fallback(loaded, config, 1, fallback=False)
    monkeypatch.undo()
    assert choose.paged_or_fallback(loaded, config, 1, fallback=False).kind == "paged"


def test_auto_is_paged_on_a_gpu_and_dynamic_on_cpu(tiny_model):
    loaded = load(tiny_model)
    setup = choose.build(loaded, ModelConfig(model_name_or_path="x"), 1)
    assert setup.kind == "dynamic" and setup.max_batch_size == choose.ROW_BATCH
    paged = choose.build(load(tiny_model), ModelConfig(model_name_or_path="x",
                                                        kv_cache="paged"), 1)
    assert paged.kind == "paged" and paged.max_batch_size == choose.PAGED_BATCH
    assert isinstance(paged.state, PagedState)


def test_the_profiling_step_is_the_largest_step_within_the_context(tiny_model):
    """The step that sizes the pool on a GPU: step_tokens tokens split into sequences no
    longer than the context (one sequence of 8192 tokens would not fit a 4096-token
    table), run through the real forward."""
    from mii_engines.runtime.kv.paged import PagedSettings

    loaded = load(tiny_model)
    settings = PagedSettings(max_seqs=4, max_tokens=40, step_tokens=100, block_size=8,
                             num_blocks=64, cuda_graphs=False)
    state = PagedState(loaded.model, loaded.device, settings)
    plan, blocks = state.profile_plan()
    lengths = [len(chunk.tokens) for chunk in plan.chunks]
    assert lengths == [40, 40, 20] and plan.tokens == 100
    assert all(len(ids) <= state.max_blocks for _, _, ids in plan.tables)
    assert blocks == 1 + 5 + 5 + 3  # numbered from 1: the trash block is never used
    with torch.inference_mode():
        logits = state.apply(plan)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def test_a_graph_is_captured_over_a_padding_step_whatever_ran_before(tiny_model):
    """Graphs are captured over ``stage_empty``'s inputs: after the profiling step (whose
    sample indices point far past a small bucket's tokens) every index the forward reads
    must be inside the bucket's shape."""
    from mii_engines.runtime.kv.blocks import TRASH_BLOCK
    from mii_engines.runtime.kv.paged import PagedSettings

    loaded = load(tiny_model)
    settings = PagedSettings(max_seqs=4, max_tokens=40, step_tokens=100, block_size=8,
                             num_blocks=64, cuda_graphs=False)
    state = PagedState(loaded.model, loaded.device, settings)
    plan, _ = state.profile_plan()
    with torch.inference_mode():
        state.apply(plan)
    assert int(state.sample_index[:3].max()) >= 40  # stale, and out of a 1-token bucket
    for decode_only, tokens, seqs in ((True, 1, 1), (True, 4, 4), (False, 16, 4)):
        state.stage_empty(decode_only, tokens, seqs, seqs)
        assert int(state.sample_index[:seqs].max()) < tokens
        assert (state.meta.slot_mapping[:tokens] // 8 == TRASH_BLOCK).all()
        assert (state.meta.query_start[:seqs + 1] == 0).all()
        assert (state.meta.seq_lens[:seqs] == 0).all()
        assert int(state.positions[:tokens].max()) == 0


def test_write_and_attend_writes_the_step_then_attends_over_it():
    """The one op the model calls: the step's keys/values land at their slots (and
    nowhere else), and the output is the reference attention over the updated pool."""
    from mii_engines.runtime.kernels.paged_attention import (reference_paged_attention,
                                                             write_and_attend)

    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(6, 4, 2, 8, generator=gen), torch.randn(6, 4, 2, 8, generator=gen)
    before_keys, before_values = keys.clone(), values.clone()
    tables = torch.tensor([[2, 5, 0], [1, 3, 4]], dtype=torch.int32)
    # seq 0: 3 cached tokens + 2 new (positions 3, 4 -> block 2 slot 3, block 5 slot 0);
    # seq 1: one decode token at position 9 (block 4 slot 1); then a padding token.
    slots = torch.tensor([2 * 4 + 3, 5 * 4 + 0, 4 * 4 + 1, 0])
    new_keys, new_values = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    query = torch.randn(4, 4, 8, generator=gen)
    lens, starts = torch.tensor([5, 10], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32)
    out = write_and_attend(query, new_keys, new_values, slots, keys, values, tables, lens, starts,
                           scale=8 ** -0.5)
    flat_keys, flat_before = keys.view(-1, 2, 8), before_keys.view(-1, 2, 8)
    assert torch.equal(flat_keys[slots], new_keys)
    assert torch.equal(values.view(-1, 2, 8)[slots], new_values)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_keys[untouched], flat_before[untouched])
    expected = torch.empty_like(query)
    reference_paged_attention(query, keys, values, tables, lens, starts, expected, 8 ** -0.5, 0, 0.0)
    assert torch.equal(out, expected)


def test_a_layer_type_the_paged_attention_does_not_know_falls_back(tiny_model, caplog):
    """Chunked attention (Llama 4) and other layer types would be served wrongly: the
    paged cache refuses them by name, before a logits check that short prompts pass."""
    loaded = load(tiny_model)
    loaded.model.config.layer_types = ["chunked_attention"] * loaded.model.config.num_hidden_layers
    config = ModelConfig(model_name_or_path="x", max_batch_size=2, kv_blocks=16)
    with pytest.raises(ConfigError, match="chunked_attention"):
        choose.paged_or_fallback(loaded, config, 1, fallback=False)
    # The dynamic cache refuses it too (the same rule), so "auto" fails with the name
    # rather than serve wrong text.
    with pytest.raises(ValueError, match="chunked_attention"):
        choose.paged_or_fallback(loaded, config, 1, fallback=True)
    assert "chunked_attention" in caplog.text and "using the dynamic cache" in caplog.text


def test_the_compiled_decoder_layer_is_one_graph(tiny_model):
    """torch_compile on the paged state: dynamo traces each decoder layer as one graph,
    the attention op inside it. A graph break there (dynamo could not trace the
    argument checks' math.isfinite on symbolic floats) made ten graphs of every layer:
    a longer trace at every start and ten guard checks a layer call."""
    from torch._dynamo.utils import counters

    from mii_engines.runtime.kv.paged import PagedSettings

    loaded = load(tiny_model)
    settings = PagedSettings(max_seqs=4, max_tokens=40, step_tokens=100, block_size=8,
                             num_blocks=64, cuda_graphs=False, compile=True)
    state = PagedState(loaded.model, loaded.device, settings)
    torch._dynamo.reset()
    counters.clear()
    try:
        plan, _ = state.profile_plan()
        with torch.inference_mode():
            logits = state.apply(plan)
        assert torch.isfinite(logits).all()
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        state.undo()
        torch._dynamo.reset()


def test_warm_up_compiles_first_and_leaves_the_other_graphs_for_later():
    from mii_engines.runtime.kv.paged import warm_up_order
    from mii_engines.runtime.runner.graphs import row_buckets, token_buckets

    decode, mixed = row_buckets(256), token_buckets(8192)
    now, later = warm_up_order(decode, mixed)
    # the compiling captures: the dynamic-shape one, the size-1 one, the other attention kind
    assert now == [(True, 256), (True, 1), (False, 8192)]
    assert sorted(now + later) == sorted([(True, r) for r in decode] + [(False, t) for t in mixed])
    assert later[:3] == [(True, 2), (True, 4), (True, 8)]  # the common batches first
    assert [key for key in later if not key[0]] == [(False, t) for t in sorted(mixed)[:-1]]
    assert warm_up_order([1], [16]) == ([(True, 1), (False, 16)], [])


def test_deferred_warm_up_runs_only_while_idle_and_delays_no_request(tiny_model):
    """The loop gives the cache's deferred warm-up (graph captures, on a GPU) one piece at a
    time while nothing is scheduled, in flight or submitted, until it says it is done;
    requests that come meanwhile are served whole."""
    loaded = load(tiny_model)
    loop = loop_for(loaded, "paged", max_batch_size=2)
    calls, busy_at_call = [], []

    def piece():
        busy_at_call.append(loop.scheduler.has_work() or loop.inbox.pending_prompts() > 0)
        calls.append(time.monotonic())
        time.sleep(0.02)
        return len(calls) < 40

    loop.executor.state.warm_up_step = piece
    sinks = [Collector(1) for _ in range(6)]
    with running(loop):
        for sink, prompt in zip(sinks, PROMPTS * 2):
            loop.submit([prompt], GenerateParamsConfig(**GREEDY), sink)
            time.sleep(0.01)
        assert all(sink.done.wait(30) for sink in sinks)
        deadline = time.monotonic() + 10
        while len(calls) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    assert len(calls) == 40  # until it said it was done, and never after
    assert not any(busy_at_call)
    assert all(sink.final(0).finish_reason == "length" for sink in sinks)
