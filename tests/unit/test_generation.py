"""The batching loop in-process on the tiny model: real forward passes, no timings."""
from __future__ import annotations

import threading
import time
from typing import Dict, List

import pytest
import torch

from mii_core.config.models import GenerateParamsConfig, ModelConfig
from mii_core.errors import InvalidGenerateParams, ServerOverloaded
from mii_core.plugins.interfaces import RankInfo, TokenEvent
from mii_engines.runtime.loop import Generator
from mii_engines.transformers.engine import TransformersEngine

PROMPTS = ["DeepSpeed is", "Seattle is a city by the sea and", "The weather", "Computers"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    rank = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device="cpu", dist_port=0)
    return TransformersEngine().load(ModelConfig(model_name_or_path=tiny_model), rank)


class Collector:
    """A sink that records events and signals when every prompt finished."""

    def __init__(self, count: int) -> None:
        self.events: List[TokenEvent] = []
        self.done = threading.Event()
        self.pending = count

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.finish_reason:
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

    def texts(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        for event in self.events:
            out[event.index] = out.get(event.index, "") + event.text
        return out

    def final(self, index: int) -> TokenEvent:
        return [e for e in self.events if e.index == index and e.finish_reason][-1]


@pytest.fixture(params=["dynamic", "static-pipelined"])
def generator(loaded, request):
    """The loop as it runs by default, and as it runs on a GPU with kv_cache="static"
    (slot cache, device-resident tokens, host work one step behind the forward)."""
    state = None
    if request.param == "static-pipelined":
        from mii_engines.runtime.kv.slots import StaticBatchState

        state = StaticBatchState(loaded.model, loaded.device, max_rows=8,
                                 max_len=min(loaded.context_length, 512), bucketed_prefill=True)
    gen = Generator(loaded, replica=0, max_batch_size=8, max_queue_size=16, state=state,
                    pipelined=state is not None)
    thread = threading.Thread(target=gen.run, daemon=True)
    thread.start()
    yield gen
    gen.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def run(gen: Generator, prompts: List[str], **params) -> Collector:
    sink = Collector(len(prompts))
    gen.submit(prompts, GenerateParamsConfig(**params), sink)
    assert sink.done.wait(60), "generation did not finish"
    return sink


GREEDY = dict(do_sample=False, max_new_tokens=24, ignore_eos=True)


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
    while not long_run.events:  # wait until the first request is decoding
        time.sleep(0.005)
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


@pytest.mark.parametrize("pipelined", [False, True])
def test_cancellation_frees_the_slot(loaded, pipelined):
    state = None
    if pipelined:
        from mii_engines.runtime.kv.slots import StaticBatchState

        state = StaticBatchState(loaded.model, loaded.device, max_rows=1, max_len=512)
    gen = Generator(loaded, replica=0, max_batch_size=1, max_queue_size=4, state=state,
                    pipelined=pipelined)
    thread = threading.Thread(target=gen.run, daemon=True)
    thread.start()
    try:
        blocker = Collector(1)
        handle = gen.submit([PROMPTS[0]], GenerateParamsConfig(max_new_tokens=400,
                                                               ignore_eos=True), blocker)
        waiting = Collector(1)
        gen.submit([PROMPTS[1]], GenerateParamsConfig(**GREEDY), waiting)
        time.sleep(0.2)
        assert not waiting.done.is_set()  # the only slot is taken
        handle.cancel()
        assert blocker.done.wait(10) and blocker.final(0).finish_reason == "cancelled"
        assert waiting.done.wait(30) and waiting.final(0).finish_reason == "length"
        assert gen.stats()["cancelled"] == 1
    finally:
        gen.stop()
        thread.join(timeout=10)


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


def test_eos_finishes_with_stop(loaded, generator):
    eos = loaded.tokenizer.eos_token_id

    def favour_eos(module, inputs, output):  # make EOS the most likely token
        output[..., eos] += 1e4
        return output

    hook = loaded.model.lm_head.register_forward_hook(favour_eos)
    try:
        out = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=20)
        delayed = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=20,
                      min_new_tokens=3)
        ignored = run(generator, [PROMPTS[0]], do_sample=False, max_new_tokens=6, ignore_eos=True)
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
    gen = Generator(loaded, replica=0, max_batch_size=1, max_queue_size=2)  # loop not running
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
    gen = Generator(loaded, replica=0, max_batch_size=1, max_queue_size=4)
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
    assert gen.stats()["errors"] == 1


def _run_and_catch(gen):
    try:
        gen.run()
    except Exception as error:  # the loop re-raises so the replica process exits
        return error
    return None


@pytest.fixture
def static_generator(loaded):
    from mii_engines.runtime.kv.slots import StaticBatchState

    state = StaticBatchState(loaded.model, loaded.device, max_rows=4, max_len=160)
    gen = Generator(loaded, replica=0, max_batch_size=4, max_queue_size=32, state=state)
    thread = threading.Thread(target=gen.run, daemon=True)
    thread.start()
    yield gen
    gen.stop()
    thread.join(timeout=10)


def test_static_cache_gives_the_dynamic_cache_tokens(generator, static_generator):
    assert run(static_generator, PROMPTS, **GREEDY).texts() == run(generator, PROMPTS,
                                                                    **GREEDY).texts()


def test_static_cache_rows_leave_and_join(generator, static_generator):
    """Rows of different lengths leave at different steps; queued ones take their slots."""
    lengths = [5, 40, 12, 30, 7, 25, 18, 3]
    expected = [run(generator, [PROMPTS[i % 4]], do_sample=False, max_new_tokens=n,
                    ignore_eos=True).texts()[0] for i, n in enumerate(lengths)]
    sinks = []
    for i, n in enumerate(lengths):
        sink = Collector(1)
        static_generator.submit([PROMPTS[i % 4]], GenerateParamsConfig(
            do_sample=False, max_new_tokens=n, ignore_eos=True), sink)
        sinks.append(sink)
    assert all(sink.done.wait(60) for sink in sinks)
    assert [sink.texts()[0] for sink in sinks] == expected
