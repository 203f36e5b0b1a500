"""Greedy tokens of the paged cache on the GPU against the dynamic cache, with requests
that share a prefix arriving while others run (the ``prefix`` case of latency_bench.py).

    python3 bench/gpu/prefix_check.py tiny            # the trained tiny Llama, fp32
    MODEL_DIR=/tmp/llama1b python3 bench/gpu/prefix_check.py big

The replica's own runtime (``service.build_service``, pipelined as on one GPU) serves
each configuration in-process; the reference is each prompt alone on the dynamic cache.
Prompts arrive one by one, 2 ms apart, so steps mix decode rows, prefix hits and new
chunks. One JSON line per configuration ($OUT/prefix_check.jsonl): how many of the
prompts match the reference, in each of two rounds.
"""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Dict, List

from mii_core.config.models import GenerateParamsConfig, ModelConfig
from mii_core.plugins.interfaces import RankInfo
from mii_engines.runtime.service import build_service
from mii_engines.transformers.engine import TransformersEngine
from workload_bench import append_result  # this folder: run as a script

OUT = os.environ.get("OUT", "/tmp")
DEVICE = os.environ.get("DEVICE", "cuda:0")
RANK = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device=DEVICE, dist_port=0)
GREEDY = dict(do_sample=False, ignore_eos=True)


def log(**fields) -> None:
    append_result("prefix_check.jsonl", fields)


class Texts:
    """Sinks of one batch of requests: text per prompt, set when all finished."""

    def __init__(self, count: int) -> None:
        self.texts: Dict[int, str] = {}
        self.pending = count
        self.lock = threading.Lock()
        self.done = threading.Event()

    def sink(self, index: int):
        def receive(event) -> None:
            with self.lock:
                self.texts[index] = self.texts.get(index, "") + event.text
                if event.finish_reason:
                    self.pending -= 1
                    if not self.pending:
                        self.done.set()
        return receive


def generate(loop, prompts: List[str], new: int, gap_s: float) -> List[str]:
    texts = Texts(len(prompts))
    params = GenerateParamsConfig(max_new_tokens=new, **GREEDY)
    for index, prompt in enumerate(prompts):
        loop.submit([prompt], params, texts.sink(index))
        time.sleep(gap_s)
    assert texts.done.wait(300), "generation did not finish"
    return [texts.texts[i] for i in range(len(prompts))]


def serve_loop(path: str, **config):
    model_config = ModelConfig(model_name_or_path=path, max_batch_size=64, **config)
    loaded = TransformersEngine().load(model_config, RANK)
    loop = build_service(loaded, model_config, RANK, max_queue_size=1024)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    return loop, thread


def check(path: str, shared: str, prompts: List[str], new: int, configs: Dict[str, dict],
          dtype: str) -> None:
    loop, thread = serve_loop(path, kv_cache="dynamic", dtype=dtype)
    reference = [generate(loop, [p], new, 0.0)[0] for p in prompts]
    loop.stop()
    thread.join(60)
    for name, config in configs.items():
        started = time.time()
        loop, thread = serve_loop(path, dtype=dtype, **config)
        ready = time.time() - started
        generate(loop, [shared], new, 0.0)  # computes the shared prefix's blocks
        rounds = [generate(loop, prompts, new, 0.002) for _ in range(2)]
        kv = loop.stats().kv
        loop.stop()
        thread.join(60)
        log(model=path, dtype=dtype, config=name, settings=config, prompts=len(prompts),
            ready_s=round(ready, 1),
            match=[sum(a == b for a, b in zip(r, reference)) for r in rounds],
            first_mismatch=next((i for i, (a, b) in enumerate(zip(rounds[0], reference))
                                 if a != b), None),
            prefix_hit_tokens=kv.get("prefix_hit_tokens"))


CONFIGS = {
    "paged": dict(kv_cache="paged"),
    "paged_no_prefix": dict(kv_cache="paged", prefix_caching=False),
    "paged_no_compile": dict(kv_cache="paged", torch_compile=False),
    "paged_no_graphs": dict(kv_cache="paged", cuda_graphs=False),
    "paged_eager": dict(kv_cache="paged", cuda_graphs=False, torch_compile=False),
}


def main(which: str) -> None:
    rnd = random.Random(0)
    if which == "tiny":
        from mii.testing.tiny_model import CORPUS_PATH, build_tiny_model

        path = str(build_tiny_model(os.path.join(OUT, "tiny-llama")))
        words = sorted(set(CORPUS_PATH.read_text().split()))
        shared = " ".join(rnd.choice(words) for _ in range(60))
        prompts = [shared + " " + " ".join(rnd.choice(words) for _ in range(3 + i % 5))
                   for i in range(32)]
        check(path, shared, prompts, 24, CONFIGS, "float32")
        check(path, shared, prompts, 24, {k: CONFIGS[k] for k in ("paged", "paged_no_prefix")},
              "bfloat16")
    else:
        path, vocab = os.environ.get("MODEL_DIR", "/tmp/llama1b"), 128000
        shared = " ".join(f"w{rnd.randrange(10, vocab)}" for _ in range(2048))
        prompts = [shared + " " + " ".join(f"w{rnd.randrange(10, vocab)}" for _ in range(64))
                   for _ in range(16)]
        check(path, shared, prompts, 16,
              {k: CONFIGS[k] for k in os.environ.get("CONFIGS", "paged paged_no_prefix").split()},
              "float32")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
