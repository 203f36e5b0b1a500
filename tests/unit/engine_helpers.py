"""Running the engine loop in-process on the tiny model, for the unit tests.

The loop is assembled from the same parts ``mii_engines.runtime.service`` uses (the
KV cache ``kv.choose.build`` picks, a scheduler, an executor, the output stage); only
``pipelined`` can be forced, so the pipelined loop is tested on the CPU as well.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from mii_core.config.models import GenerateParamsConfig, ModelConfig
from mii_core.plugins.interfaces import LoadedModel, RankInfo, TokenEvent
from mii_core.routing.stats import ServingMetrics
from mii_engines.runtime.executor import Executor
from mii_engines.runtime.intake import Intake
from mii_engines.runtime.kv.choose import KVSetup, build
from mii_engines.runtime.kv.interface import KVSpace, KVState
from mii_engines.runtime.loop import EngineLoop
from mii_engines.runtime.output import Outputs
from mii_engines.runtime.scheduler import Budgets, Scheduler
from mii_engines.transformers.engine import TransformersEngine

PROMPTS = ["DeepSpeed is", "Seattle is a city by the sea and", "The weather", "Computers"]
GREEDY = dict(do_sample=False, max_new_tokens=24, ignore_eos=True)
CPU = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device="cpu", dist_port=0)


def load(path: str, **config) -> LoadedModel:
    """The model at ``path`` on the CPU, loaded as the transformers engine does."""
    return TransformersEngine().load(ModelConfig(model_name_or_path=path, **config), CPU)


class Collector:
    """A sink that records events and signals when every prompt finished."""

    def __init__(self, count: int) -> None:
        self.events: List[TokenEvent] = []
        self.done = threading.Event()
        self.first = threading.Event()  # set at the first event
        self.pending = count

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        self.first.set()
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


def setup(loaded: LoadedModel, kv_cache: str = "dynamic", **config) -> KVSetup:
    """The KV cache ``kv.choose.build`` gives for these settings."""
    model_config = ModelConfig(model_name_or_path="tiny", kv_cache=kv_cache, **config)
    return build(loaded, model_config, world_size=1)


def make_loop(loaded: LoadedModel, state: KVState, space: KVSpace, max_batch_size: int = 8,
              max_queue_size: int = 16, pipelined: bool = False,
              budgets: Optional[Budgets] = None) -> EngineLoop:
    """A loop over ``state`` (not running)."""
    executor = Executor(state, loaded.device, max_batch_size, pipelined=pipelined)
    intake = Intake(loaded.tokenizer, loaded.context_length, space.max_tokens(), replica=0)
    scheduler = Scheduler(space, max_batch_size, budgets or Budgets())
    return EngineLoop(intake, scheduler, executor,
                      Outputs(loaded.tokenizer, ServingMetrics()), max_queue_size)


def loop_for(loaded: LoadedModel, kv_cache: str = "dynamic", max_batch_size: int = 8,
             max_queue_size: int = 16, pipelined: bool = False,
             budgets: Optional[Budgets] = None, **config) -> EngineLoop:
    """A loop over the KV cache ``kv_cache`` (not running); ``budgets`` replace the ones the
    configuration gives."""
    kv = setup(loaded, kv_cache, max_batch_size=max_batch_size, **config)
    return make_loop(loaded, kv.state, kv.space, max_batch_size, max_queue_size, pipelined,
                     budgets or kv.budgets)


@contextmanager
def running(loop: EngineLoop) -> Iterator[EngineLoop]:
    """Run ``loop`` on a thread; stop it (and check it stopped) on the way out."""
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the engine loop did not stop"


def settled_stats(loop: EngineLoop, timeout: float = 10.0):
    """The loop's stats once it has nothing left to schedule: a sequence's last event
    reaches its sink before the loop's next step frees its blocks (a step later still
    when the loop is pipelined)."""
    deadline = time.monotonic() + timeout
    while loop.scheduler.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.scheduler.has_work(), "the loop kept work after every request ended"
    return loop.stats()


def run(loop: EngineLoop, prompts: List[str], **params) -> Collector:
    """Submit and wait for every prompt to finish."""
    sink = Collector(len(prompts))
    loop.submit(prompts, GenerateParamsConfig(**params), sink)
    assert sink.done.wait(60), "generation did not finish"
    return sink


def latent_attention_model():
    """A 2-layer DeepSeek-V3 (latent attention: it caches something other than what it
    attends over), random weights, SDPA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
        max_position_embeddings=256, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        kv_lora_rank=32, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
