"""The batching loop in-process on the tiny model, over every KV cache: real forward
passes, no timings."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from engine_helpers import GREEDY, PROMPTS, Collector, load, loop_for, run, running, setup

from mii_core.config.models import GenerateParamsConfig
from mii_core.errors import InvalidGenerateParams, ServerOverloaded
from mii_core.routing.stats import ServingMetrics
from mii_engines.runtime.executor import Executor
from mii_engines.runtime.intake import Intake
from mii_engines.runtime.loop import EngineLoop
from mii_engines.runtime.output import Outputs
from mii_engines.runtime.scheduler import Budgets, Scheduler

KINDS = ["dynamic", "static-pipelined", "paged", "paged-pipelined"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load(tiny_model)


def _loop(tiny_model, kind: str, **kwargs):
    """A fresh model per loop: the static and paged caches patch the model they serve."""
    cache, _, pipelined = kind.partition("-")
    extra = dict(max_length=512) if cache == "static" else {}
    return loop_for(load(tiny_model), cache, pipelined=bool(pipelined), **extra, **kwargs)


@pytest.fixture(scope="module", params=KINDS)
def generator(tiny_model, request):
    """The loop as it runs by default on CPU (dynamic), as it runs on a GPU with the paged
    cache (pipelined: device-resident tokens, host work one step behind the forward), and
    with kv_cache="static"."""
    with running(_loop(tiny_model, request.param)) as loop:
        yield loop


def test_batched_greedy_equals_one_at_a_time(generator):
    batched = run(generator, PROMPTS, **GREEDY).texts()
    single = {i: run(generator, [p], **GREEDY).texts()[0] for i, p in enumerate(PROMPTS)}
    assert batched == single
    assert len(set(batched.values())) == len(PROMPTS)


def test_request_joining_mid_generation_gets_same_tokens(generator):
    expected = run(generator, [PROMPTS[1]], **GREEDY).texts()[0]
    long_run = Collector(1)
    generator.submit([PROMPTS[0]], GenerateParamsConfig(do_sample=False, max_new_tokens=200,
                                                        ignore_eos=True, stream=True), long_run)
    assert long_run.first.wait(30)  # the first request is decoding
    joined = run(generator, [PROMPTS[1]], **GREEDY)
    assert not long_run.done.is_set(), "the first request should still be running"
    assert joined.texts()[0] == expected
    assert long_run.done.wait(60)


def test_mixed_sampling_params_in_one_batch(generator):
    sink = Collector(3)
    greedy = GenerateParamsConfig(**GREEDY)
    generator.submit([PROMPTS[0]], greedy, sink)
    generator.submit([PROMPTS[0]], GenerateParamsConfig(do_sample=True, top_k=5, temperature=2.0,
                                                        max_new_tokens=24, ignore_eos=True), sink)
    generator.submit([PROMPTS[0]], GenerateParamsConfig(do_sample=False, max_new_tokens=5,
                                                        ignore_eos=True), sink)
    assert sink.done.wait(60)
    texts = [e.text for e in sink.events if e.finish_reason]
    lengths = sorted(e.token_count for e in sink.events if e.finish_reason)
    alone = run(generator, [PROMPTS[0]], **GREEDY).texts()[0]
    assert alone in texts  # the greedy row was unaffected by its neighbours
    assert lengths == [5, 24, 24]


def test_a_seeded_request_reproduces_and_the_seed_decides(generator):
    """The same seed gives the same sampled text, alone or beside other sampled rows;
    other seeds give other texts (5 seeds, 24 tokens at temperature 2: distinct)."""
    sampled = dict(do_sample=True, temperature=2.0, top_p=1.0, max_new_tokens=24,
                   ignore_eos=True)
    first = run(generator, [PROMPTS[0]], seed=7, **sampled).texts()[0]
    assert run(generator, [PROMPTS[0]], seed=7, **sampled).texts()[0] == first
    sink = Collector(2)
    generator.submit([PROMPTS[0]], GenerateParamsConfig(seed=7, **sampled), sink)
    generator.submit([PROMPTS[1]], GenerateParamsConfig(seed=8, **sampled), sink)
    assert sink.done.wait(60)
    assert first in [e.text for e in sink.events if e.finish_reason]
    others = {run(generator, [PROMPTS[0]], seed=seed, **sampled).texts()[0]
              for seed in (1, 2, 3, 4)}
    assert first not in others and len(others) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_cancellation_frees_the_slot(tiny_model, kind):
    loop = _loop(tiny_model, kind, max_batch_size=1, max_queue_size=4)
    with running(loop):
        release = threading.Event()
        blocker = Collector(1)

        def gated(event):  # holds the loop at the blocker's first token until released
            blocker(event)
            release.wait(30)

        handle = loop.submit([PROMPTS[0]], GenerateParamsConfig(
            max_new_tokens=200, ignore_eos=True, stream=True, do_sample=False), gated)
        assert blocker.first.wait(30)  # it holds the only slot
        waiting = Collector(1)
        loop.submit([PROMPTS[1]], GenerateParamsConfig(**GREEDY), waiting)
        handle.cancel()
        release.set()
        assert blocker.done.wait(10) and blocker.final(0).finish_reason == "cancelled"
        assert waiting.done.wait(30) and waiting.final(0).finish_reason == "length"
        assert loop.stats().cancelled == 1


def test_max_length_short_vs_long(generator):
    short = run(generator, [PROMPTS[0]], do_sample=False, max_length=6 + 4, ignore_eos=True)
    prompt_length = short.final(0).prompt_length
    assert short.final(0).token_count == 10 - prompt_length
    assert short.final(0).finish_reason == "length"
    long = run(generator, [PROMPTS[0]], do_sample=False, max_length=prompt_length + 30,
               ignore_eos=True)
    assert long.final(0).token_count == 30
    assert long.texts()[0].startswith(short.texts()[0])


def test_max_new_tokens_and_min_new_tokens(generator, loaded):
    eos = loaded.tokenizer.eos_token_id
    out = run(generator, PROMPTS[:2], do_sample=False, max_new_tokens=7, min_new_tokens=7)
    assert [out.final(i).token_count for i in range(2)] == [7, 7]
    assert all(out.final(i).finish_reason == "length" for i in range(2))
    assert eos is not None


def test_stop_string_ends_generation_before_it(generator):
    full = run(generator, [PROMPTS[2]], **GREEDY).texts()[0]
    stop = full[5:8]
    cut = run(generator, [PROMPTS[2]], stop=stop, **GREEDY)
    assert cut.final(0).finish_reason == "stop"
    assert cut.texts()[0] == full[: full.index(stop)]
    streamed = run(generator, [PROMPTS[2]], stop=[stop], stream=True, **GREEDY)
    assert streamed.texts()[0] == cut.texts()[0]


def test_return_full_text_prepends_prompt(generator):
    plain = run(generator, [PROMPTS[0]], **GREEDY).texts()[0]
    full = run(generator, [PROMPTS[0]], return_full_text=True, **GREEDY).texts()[0]
    assert full == PROMPTS[0] + plain


def test_streaming_deltas_concatenate_to_unary_text(generator):
    unary = run(generator, PROMPTS[:2], **GREEDY)
    streamed = run(generator, PROMPTS[:2], stream=True, **GREEDY)
    assert streamed.texts() == unary.texts()
    assert len(streamed.events) > 4


@pytest.mark.parametrize("kind", KINDS)
def test_eos_finishes_with_stop(tiny_model, kind):
    cache, _, pipelined = kind.partition("-")
    loaded = load(tiny_model)
    eos = loaded.tokenizer.eos_token_id

    def favour_eos(module, inputs, output):  # make EOS the most likely token
        output[..., eos] += 1e4
        return output

    extra = dict(max_length=512) if cache == "static" else {}
    with running(loop_for(loaded, cache, pipelined=bool(pipelined), **extra)) as generator:
        hook = loaded.model.lm_head.register_forward_hook(favour_eos)
        try:
            out = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=20)
            delayed = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=20,
                          min_new_tokens=3)
            ignored = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=6,
                          ignore_eos=True)
        finally:
            hook.remove()
    assert out.final(0).finish_reason == "stop" and out.final(0).token_count == 1
    assert delayed.final(0).finish_reason == "stop" and delayed.final(0).token_count == 4
    assert ignored.final(0).finish_reason == "length" and ignored.final(0).token_count == 6


def test_prompt_too_long_is_rejected_with_field(generator):
    with pytest.raises(InvalidGenerateParams, match=r"prompts\[0\].*max_length=4"):
        generator.submit(["a long prompt with many many words"],
                         GenerateParamsConfig(max_length=4), Collector(1))


def test_queue_bound_answers_overloaded(loaded):
    gen = loop_for(loaded, max_batch_size=1, max_queue_size=2)  # not running
    gen.submit(["a"], GenerateParamsConfig(), Collector(1))
    gen.submit(["b"], GenerateParamsConfig(), Collector(1))
    with pytest.raises(ServerOverloaded, match="queue is full"):
        gen.submit(["c"], GenerateParamsConfig(), Collector(1))


def test_greedy_matches_transformers_generate(generator, loaded):
    ours = run(generator, PROMPTS, **GREEDY)
    for index, prompt in enumerate(PROMPTS):
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
        expected = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert ours.texts()[index] == expected


def test_engine_failure_fails_every_request_and_stops_the_loop(loaded):
    gen = loop_for(loaded, max_batch_size=1, max_queue_size=4)
    running, queued = Collector(1), Collector(1)
    gen.submit([PROMPTS[0]], GenerateParamsConfig(**GREEDY), running)
    gen.submit([PROMPTS[1]], GenerateParamsConfig(**GREEDY), queued)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated device error")

    loaded.model.forward = broken_forward  # instance attribute shadows the method
    raised = []
    thread = threading.Thread(target=lambda: raised.append(_run_and_catch(gen)))
    try:
        thread.start()
        thread.join(timeout=30)
    finally:
        del loaded.model.forward
    assert isinstance(raised[0], RuntimeError) and gen.failed is raised[0]
    assert running.final(0).finish_reason == "error"
    assert "simulated device error" in str(running.final(0).error)
    assert queued.final(0).finish_reason == "cancelled"
    assert gen.stats().errors == 1


def _run_and_catch(gen):
    try:
        gen.run()
    except Exception as error:  # the loop re-raises so the replica process exits
        return error
    return None


@pytest.fixture(scope="module")
def reference(tiny_model):
    with running(_loop(tiny_model, "dynamic")) as loop:
        yield loop


def test_every_cache_gives_the_dynamic_cache_tokens(generator, reference):
    assert run(generator, PROMPTS, **GREEDY).texts() == run(reference, PROMPTS, **GREEDY).texts()


def test_rows_leave_and_join(generator, reference):
    """Rows of different lengths leave at different steps; queued ones take their place."""
    lengths = [5, 40, 12, 30, 7, 25, 18, 3, 9, 33]
    expected = [run(reference, [PROMPTS[i % 4]], do_sample=False, max_new_tokens=n,
                    ignore_eos=True).texts()[0] for i, n in enumerate(lengths)]
    sinks = []
    for i, n in enumerate(lengths):
        sink = Collector(1)
        generator.submit([PROMPTS[i % 4]], GenerateParamsConfig(
            do_sample=False, max_new_tokens=n, ignore_eos=True), sink)
        sinks.append(sink)
    assert all(sink.done.wait(60) for sink in sinks)
    assert [sink.texts()[0] for sink in sinks] == expected


class _SlowReadExecutor(Executor):
    """An executor whose token reads wait ``delay`` seconds, as reading a GPU step's
    tokens waits for the step."""

    delay = 0.3

    def read(self, step):
        time.sleep(self.delay)
        return super().read(step)


def test_token_times_include_the_wait_for_the_step(loaded):
    """TTFT and inter-token latency are taken once a step's tokens are read, not when the
    host starts waiting for them (on a GPU that wait is the step's forward)."""
    kv = setup(loaded, "dynamic", max_batch_size=4)
    metrics = ServingMetrics()
    loop = EngineLoop(Intake(loaded.tokenizer, loaded.context_length, kv.space.max_tokens(), 0),
                      Scheduler(kv.space, 4, Budgets()),
                      _SlowReadExecutor(kv.state, loaded.device, 4),
                      Outputs(loaded.tokenizer, metrics), max_queue_size=4)
    with running(loop):
        sink = run(loop, ["DeepSpeed is"], do_sample=False, max_new_tokens=3, ignore_eos=True)
    final = sink.final(0)
    assert final.time_to_first_token_s >= _SlowReadExecutor.delay
    assert final.total_time_s >= 3 * _SlowReadExecutor.delay
    assert metrics.inter_token_latency.count == 2
    assert metrics.inter_token_latency.total >= 2 * _SlowReadExecutor.delay


class _SlowTokenizer:
    """The model's tokenizer, taking ``delay`` seconds to encode (a long prompt)."""

    delay = 0.3

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        time.sleep(self.delay)
        return self.tokenizer(text, **kwargs)


def test_time_to_first_token_includes_tokenizing(loaded):
    """A request arrives when the replica takes it, before its prompt is tokenized: the
    tokenizing is part of what a client waits for."""
    kv = setup(loaded, "dynamic", max_batch_size=4)
    intake = Intake(_SlowTokenizer(loaded.tokenizer), loaded.context_length,
                    kv.space.max_tokens(), 0)
    request = intake.request(1, ["DeepSpeed is"], GenerateParamsConfig(), lambda event: None)
    assert time.time() - request.info.arrived_at >= _SlowTokenizer.delay
