"""The fast-path pieces on the tiny model: fused projections, the batched sampler,
token-budgeted admission and the static state's warm-up. Real forward passes, no timings."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import (GREEDY, PROMPTS, Collector, latent_attention_model, load, loop_for,
                            make_loop, run, running)

from mii_core.config.models import GenerateParamsConfig
from mii_engines.runtime.kv.dynamic import DynamicState
from mii_engines.runtime.kv.rows import RowSpace
from mii_engines.runtime.kv.slots import SlotState, make_slot_state
from mii_engines.runtime.patches.fusion import FusedLinear, LinearPart, fuse_projections
from mii_engines.runtime.plan import Chunk, StepPlan
from mii_engines.runtime.requests import Phase
from mii_engines.runtime.sampling import row_params, sample
from mii_engines.runtime.scheduler import Budgets


def _load(tiny_model):
    return load(tiny_model)


@pytest.fixture(scope="module")
def plain(tiny_model):
    return _load(tiny_model)


@pytest.fixture(scope="module")
def fused(tiny_model):
    loaded = _load(tiny_model)
    assert fuse_projections(loaded.model) == 2 * loaded.model.config.num_hidden_layers
    return loaded


def slot_state(loaded, max_rows: int = 4, **kwargs) -> SlotState:
    """kv_cache="static" as a replica builds it (fused projections, mii's attention)."""
    return make_slot_state(loaded, max_rows, cuda_graphs=True, world_size=1,
                           compile_decode=kwargs.pop("compile_decode", False),
                           length_given=True, prefill_budget=8192)


def _serve(loaded, state=None, max_batch_size: int = 4, **kwargs):
    """A running loop over ``state`` (None: the dynamic cache)."""
    state = state or DynamicState(loaded.model, loaded.device)
    space = RowSpace(getattr(state, "max_len", loaded.context_length), "rows")
    return running(make_loop(loaded, state, space, max_batch_size, 32, **kwargs))


def test_fused_projections_give_the_same_logits(plain, fused):
    ids = plain.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = plain.model(**ids).logits
        got = fused.model(**ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer = fused.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LinearPart)
    assert isinstance(layer.mlp._fused_gate_up, FusedLinear)
    original = plain.model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(layer.self_attn.k_proj.weight, original)


def test_a_part_called_out_of_order_still_projects_its_own_input(plain, fused):
    attn, reference = fused.model.model.layers[0].self_attn, plain.model.model.layers[0].self_attn
    x, y = torch.randn(2, 3, attn.q_proj.in_features), torch.randn(2, 3, attn.q_proj.in_features)
    with torch.inference_mode():
        attn.q_proj(x)
        got_v = attn.v_proj(y)  # not the input the group just projected
        got_k = attn.k_proj(x)
        torch.testing.assert_close(got_v, reference.v_proj(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_k, reference.k_proj(x), rtol=1e-5, atol=1e-5)


def test_make_state_fuses_and_static_greedy_matches_the_unfused_dynamic_path(tiny_model, plain):
    loaded = _load(tiny_model)
    state = slot_state(loaded)
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, LinearPart)
    assert state.warm_up() >= 0 and state.rows == 0  # the warm-up row is gone again
    with _serve(loaded, state) as fast, _serve(plain) as reference:
        assert run(fast, PROMPTS, **GREEDY).texts() == run(reference, PROMPTS, **GREEDY).texts()


def test_prompts_beyond_the_prefill_budget_join_at_later_steps(plain):
    state = SlotState(plain.model, plain.device, max_rows=4, max_len=160)
    steps = []
    original = state.apply
    state.apply = lambda plan: steps.append(len(plan.chunks)) or original(plan)
    with _serve(plain, state, budgets=Budgets(idle=6, decoding=6)) as staggered:
        got = run(staggered, PROMPTS, **GREEDY).texts()
    assert max(steps) < len(PROMPTS) and sum(steps) == len(PROMPTS)  # joined over several steps
    with _serve(plain) as reference:
        assert got == run(reference, PROMPTS, **GREEDY).texts()


def _params(**kw):
    return GenerateParamsConfig(**kw)


def test_sampler_greedy_rows_take_the_argmax_and_bans_hold():
    logits = torch.randn(3, 50)
    rows = row_params([_params(do_sample=False)] * 3, 50, logits.device)
    assert sample(logits, rows).tolist() == logits.argmax(-1).tolist()
    top = logits.argmax(-1)
    banned = sample(logits, rows, banned=[int(top[0]), None, None])
    assert banned[0] != top[0] and banned[1:].tolist() == top[1:].tolist()


@pytest.mark.parametrize("vocab", [100, 4 * 4096, 4 * 4096 + 77, 128256])
def test_chunked_argmax_is_argmax_ties_included(vocab):
    from mii_engines.runtime.sampling import argmax_rows

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator).to(torch.bfloat16)
    logits[1] = 0.0  # all tied: index 0
    logits[2, [5, vocab - 1]] = 100.0  # tie across the first chunk and the tail
    logits[3, vocab - 1] = 100.0  # the maximum in the tail
    if vocab > 4 * 4096:
        logits[4, [4096 * 2 + 3, 4096 * 3 + 1]] = 50.0  # tie across two chunks
        logits[5, 4095:4097] = 70.0  # tie across a chunk border
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax_rows(logits[:, :vocab - 3]), logits[:, :vocab - 3].argmax(dim=-1))
    logits[0, vocab - 2] = float("nan")  # a NaN wins, as in argmax: in the tail,
    logits[1, 7] = float("nan")  # in the first chunk,
    logits[2, [7, vocab - 2]] = float("nan")  # in both (the first one wins)
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_sampler_top_k_one_and_tiny_top_p_are_greedy_within_a_mixed_batch():
    logits = torch.randn(4, 50)
    params = [_params(do_sample=True, top_k=1), _params(do_sample=False),
              _params(do_sample=True, top_p=1e-6), _params(do_sample=True, top_k=3)]
    rows = row_params(params, 50, logits.device)
    for _ in range(20):
        got = sample(logits, rows)
        assert got[:3].tolist() == logits.argmax(-1)[:3].tolist()
        assert int(got[3]) in torch.topk(logits[3], 3).indices.tolist()


def test_sampler_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    rows = row_params([_params(do_sample=True, top_p=1.0, temperature=2.0)], 4, logits.device)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, rows, generator=generator) for _ in range(8000)])
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.02, rtol=0)


def test_sampler_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rows = row_params([_params(do_sample=True, top_p=0.7)], 4, logits.device)
    generator = torch.Generator().manual_seed(1)
    seen = {int(sample(logits, rows, generator=generator)) for _ in range(400)}
    assert seen == {0, 1}


def test_grouped_decode_attention_equals_repeated_keys():
    from transformers.integrations.sdpa_attention import repeat_kv

    from mii_engines.runtime.patches.attention import grouped_decode_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    mask = (torch.arange(20)[None, :] <= torch.tensor([4, 19, 11])[:, None])[:, None, None, :]
    got, _ = grouped_decode_attention(torch.nn.Module(), query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_bucketed_prefill_fills_the_same_slots_as_the_eager_prefill(plain):
    prompts = [plain.tokenizer(p)["input_ids"] for p in PROMPTS]
    eager = SlotState(plain.model, plain.device, max_rows=8, max_len=64)
    bucketed = SlotState(plain.model, plain.device, max_rows=8, max_len=64,
                         bucketed_prefill=True)
    with torch.inference_mode():
        for state in (eager, bucketed):  # one row first, so the batch lands at slot 1
            state.prefill(prompts[:1])
        expected = eager.prefill(prompts[1:])
        got = bucketed.prefill(prompts[1:])
    assert bucketed.prefill_graphs.bucket(3, max(len(p) for p in prompts)) == (4, 16)
    assert bucketed.prefill_graphs.padded_rows == 1  # 1 row in bucket 1, 3 rows in bucket 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bucketed.lengths == eager.lengths == [len(p) for p in prompts]
    for layer in range(len(eager.cache.keys)):
        for slot, length in enumerate(eager.lengths):  # what decode steps will read
            torch.testing.assert_close(bucketed.cache.keys[layer][slot, :, :length],
                                       eager.cache.keys[layer][slot, :, :length])
            torch.testing.assert_close(bucketed.cache.values[layer][slot, :, :length],
                                       eager.cache.values[layer][slot, :, :length])


@pytest.mark.parametrize("compile_decode", [False, True])
def test_a_model_caching_latents_decodes_through_the_cache_object(compile_decode):
    """DeepSeek-V3's attention caches compressed latents (one "head", keys and values of
    different sizes) and expands them before attending: the attention modules' slots
    would hold the wrong thing, so decode steps go through the cache object (and a
    compiled step is the whole step), with the dynamic cache's logits."""
    import random

    from mii_engines.runtime.patches.attention import use_grouped_decode_attention

    model = latent_attention_model()
    assert use_grouped_decode_attention(model)
    static = SlotState(model, torch.device("cpu"), 4, 64, compile_decode=compile_decode)
    dynamic = DynamicState(model, torch.device("cpu"))
    draw = random.Random(0)
    with torch.inference_mode():
        plan = StepPlan(chunks=[Chunk(slot, [draw.randrange(3, 300) for _ in range(n)])
                                for slot, n in enumerate((7, 1, 12))])
        for step in range(7):
            torch.testing.assert_close(static.apply(plan), dynamic.apply(plan), rtol=1e-4,
                                       atol=1e-4)
            rows = 2 if step >= 3 else 3
            plan = StepPlan(keep=[0, 2] if step == 3 else None,
                            decode=[draw.randrange(3, 300) for _ in range(rows)])
    assert static.attention_modules is None and static.regions is None
    assert tuple(static.cache.keys[0].shape[1::2]) != tuple(static.cache.values[0].shape[1::2])


def test_regional_compile_picks_the_decoder_layers_not_a_longer_list():
    from torch import nn

    from mii_engines.runtime.runner.compile import repeated_blocks

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(2, 2)
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))  # longer

    model = nn.Module()
    model.layers = nn.ModuleList(Layer() for _ in range(3))
    attention = [layer.attn for layer in model.layers]
    assert repeated_blocks(model, attention) is model.layers
    assert repeated_blocks(model, attention[:2]) is None  # no list matches layer for layer


def test_row_buckets_double_to_8_step_by_8_to_64_then_by_32():
    from mii_engines.runtime.runner.graphs import row_buckets

    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192,
                                224, 256]
    assert row_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100]
    assert row_buckets(65) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 65]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert row_buckets(8) == [1, 2, 4, 8] and row_buckets(3) == [1, 2, 3]
    assert row_buckets(1) == [1]


def test_stats_count_prefills_and_admitted_rows(plain):
    state = SlotState(plain.model, plain.device, max_rows=8, max_len=64, bucketed_prefill=True)
    with _serve(plain, state, max_batch_size=8) as gen:
        run(gen, PROMPTS[:3], **GREEDY)  # one request: its 3 prompts join in one step
    stats = gen.stats()
    assert (stats.prefills, stats.prefill_rows, stats.padded_prefill_rows) == (1, 3, 1)


def test_decode_writes_through_the_attention_modules_slots_and_other_attention_keeps_the_cache(
        tiny_model, plain):
    """mii's decode attention writes each layer's new key/value into that layer's slots
    (no cache object: what lets one compiled layer serve all); a model on another
    attention implementation decodes through the cache object. Same greedy text."""
    expected = None
    for attention in ("sdpa", "eager"):
        loaded = _load(tiny_model)
        loaded.model.set_attn_implementation(attention)
        state = slot_state(loaded)
        assert (state.attention_modules is not None) == (attention == "sdpa")
        with _serve(loaded, state) as fast:
            texts = run(fast, PROMPTS, **GREEDY).texts()
        if attention == "sdpa":
            layers = loaded.model.model.layers
            assert all(layer.self_attn.mii_keys is keys
                       for layer, keys in zip(layers, state.cache.keys))
        expected = expected or run_reference(plain)
        assert texts == expected


def run_reference(loaded):
    with _serve(loaded) as reference:
        return run(reference, PROMPTS, **GREEDY).texts()


def test_decode_attends_only_to_the_columns_in_use(tiny_model, plain):
    loaded = _load(tiny_model)
    state = slot_state(loaded, max_rows=2)
    assert state.narrow and state.widths()[0] == 128 < state.widths()[-1]
    seen = []
    layer = loaded.model.model.layers[0].self_attn
    hook = layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        kwargs["attention_mask"].shape[-1]), with_kwargs=True)
    try:
        with _serve(loaded, state, max_batch_size=2) as fast, _serve(plain) as reference:
            long = dict(do_sample=False, max_new_tokens=140, ignore_eos=True)  # > 128 columns
            assert (run(fast, PROMPTS[:2], **long).texts()
                    == run(reference, PROMPTS[:2], **long).texts())
    finally:
        hook.remove()
    assert 128 in seen and 256 in seen


def compiled_matching_eager(loaded, max_rows: int):
    """A compiled static state checked, bucket by width, against an eager one on the same
    model; returns it and how many graphs torch.compile built."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compiled = slot_state(loaded, max_rows=max_rows, compile_decode=True)
    eager = SlotState(loaded.model, loaded.device, max_rows=max_rows, max_len=compiled.max_len)
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        for state in (compiled, eager):
            state.prefill(prompts)
            state.inputs[1, :3] = torch.tensor(state.lengths)
        for bucket in sorted(compiled.buckets(), reverse=True):  # largest first, as warm_up
            for width in compiled.widths():
                torch.testing.assert_close(compiled._forward(bucket, width),
                                           eager._forward(bucket, width), rtol=1e-3, atol=1e-3)
    return compiled, counters["stats"]["unique_graphs"]


def test_compiled_decode_is_compiled_once_for_every_bucket_and_width(tiny_model):
    """torch_compile=True: one compilation of one decoder layer covers every layer and
    every graph shape (start-up time), and the compiled step computes what the eager
    one does. 16 rows = the tiny model's head_dim: the largest bucket, compiled first
    as in warm_up, must not be taken for the same size as the head_dim."""
    loaded = _load(tiny_model)
    head_dim = loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
    compiled, graphs = compiled_matching_eager(loaded, max_rows=head_dim)
    assert compiled.regions is not None and loaded.model.config.num_hidden_layers > 1
    assert graphs == 1
    assert len(compiled.buckets()) * len(compiled.widths()) >= 4


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_freed_slot_is_taken_in_the_step_that_frees_it(plain, pipelined):
    state = SlotState(plain.model, plain.device, max_rows=1, max_len=256)
    plans = []
    original = state.apply
    state.apply = lambda plan: plans.append(plan) or original(plan)
    first, second = Collector(1), Collector(1)
    loop = make_loop(plain, state, RowSpace(256, "slots"), max_batch_size=1, max_queue_size=4,
                     pipelined=pipelined)
    loop.submit([PROMPTS[0]], GenerateParamsConfig(**dict(GREEDY, max_new_tokens=3)), first)
    loop.submit([PROMPTS[1]], GenerateParamsConfig(**dict(GREEDY, max_new_tokens=3)), second)
    with running(loop):
        assert first.done.wait(30) and second.done.wait(30)
    swap = [p for p in plans if p.keep == [] and p.chunks]
    assert len(swap) == 1, "the second request joins in the step that retires the first"
    assert not [p for p in plans if p.keep == [] and not p.chunks and p.decode is None][:-1]


def test_admission_budgets_the_padded_prefill_not_the_token_sum(plain):
    long_prompt = " ".join(["word"] * 30)
    width = len(plain.tokenizer(long_prompt)["input_ids"])
    # The token sum (width + 3 short prompts) fits; 2 rows padded to `width` do not.
    budget = width + width // 2
    loop = loop_for(plain, max_batch_size=8, max_queue_size=8,
                    budgets=Budgets(idle=budget, decoding=budget))  # not running
    for index, prompt in enumerate((long_prompt, "a", "b", "c")):
        request = loop.inbox.intake.request(index, [prompt], GenerateParamsConfig(**GREEDY),
                                      Collector(1))
        loop.scheduler.add(request.sequences)
    first = loop.scheduler.schedule()
    assert [len(chunk.tokens) for chunk in first.plan.chunks] == [width]
    assert len(loop.scheduler.schedule().plan.chunks) == 3  # the short ones join together


def test_while_rows_decode_fewer_prompt_tokens_join_per_step(plain):
    """A prefill stalls the running rows' next token: with rows running, the smaller
    budget applies (a lone long prompt still joins)."""
    width = len(plain.tokenizer("x")["input_ids"])
    loop = loop_for(plain, max_batch_size=16, max_queue_size=16,
                    budgets=Budgets(idle=8 * width, decoding=2 * width))  # not running
    for index in range(12):
        request = loop.inbox.intake.request(index, ["x"], GenerateParamsConfig(**GREEDY), Collector(1))
        loop.scheduler.add(request.sequences)
    first = loop.scheduler.schedule()  # nothing running: the whole budget
    assert len(first.rows) == 8 and all(seq.phase is Phase.RUNNING for seq in first.rows)
    assert len(loop.scheduler.schedule().plan.chunks) == 2  # 8 rows decoding: the smaller one


def test_static_slots_without_max_length_take_half_the_free_memory():
    from mii_engines.runtime.kv.slots import fitting_length

    per_token = 2 * 16 * 8 * 64 * 2  # a 1B Llama in bf16: 32 KiB per token
    free = 2 * 2**30 + 64 * 2**30  # 64 GiB beyond the 2 GiB kept back
    assert fitting_length(per_token, 64, free, context=131072) == 16384  # 32 GiB / 2 MiB
    assert fitting_length(per_token, 64, free, context=4096) == 4096  # the model's limit
    assert fitting_length(per_token, 1, 2**30, context=4096) == 0  # under the reserve


def test_size_slots_lowers_the_served_context_to_what_fits(plain, monkeypatch):
    import types

    from mii_engines.runtime.kv import slots as static_state

    per_token = static_state._bytes_per_token(plain.model)
    free = 2 * 2**30 + 2 * per_token * 4 * 320  # half of it: 320 tokens for 4 rows
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 4 * free))
    loaded = types.SimpleNamespace(model=plain.model, device=torch.device("cuda"),
                                   context_length=2048)
    static_state.size_slots(loaded, max_rows=4)
    assert loaded.context_length == 320
    with pytest.raises(RuntimeError, match="max_batch_size=4096"):
        static_state.size_slots(loaded, max_rows=4096)
