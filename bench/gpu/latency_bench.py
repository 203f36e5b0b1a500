"""Latency on the GPU with ``mii.serve(model)`` defaults: the latency targets of issue 17.

    CASES="ttft4k itl_long prefix" python3 bench/gpu/latency_bench.py
    SERVE_EXTRA='{"prefix_caching": false}' LABEL=no_prefix CASES=prefix python3 ...

- ``ttft4k``: one ~4k-token prompt at a time (a different one each time, so the prefix
  cache never hits), 8 new tokens; TTFT as the replica measures it (arrival to first
  token, ``Response.time_to_first_token_s``) and as the client sees it (streamed).
- ``itl_long``: 63 streams decode (128-token prompts, 384 new); once each has 16 tokens,
  one 4k-token prompt arrives. Inter-chunk gaps of the 63 streams, client side: p50 over
  the whole run and p50 / p99 / max of the gaps that end while the long prompt is being
  prefilled (its arrival to its first token, + 50 ms).
- ``prefix``: one request computes a 2,048-token prefix, then 64 concurrent requests of
  that prefix + 64 own tokens (16 new), twice; replica-side TTFT p50 / p90 and each
  greedy text's digest (compare them with a ``prefix_caching: false`` run; the second
  round shows how often the same requests agree with themselves in another batch).

Every request is greedy (MII's default samples). Prompts are the anchors' words (one
token each, as in ``workload_bench.py``). Results: one line per case in
$OUT/latency.jsonl.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
import traceback
from typing import List

# this folder: run as a script
from workload_bench import append_result, pct, wait_for_deferred_warm_up

MODEL = os.environ.get("MODEL_DIR", "/tmp/llama1b")
VOCAB = int(os.environ.get("VOCAB", 128000))
LABEL = os.environ.get("LABEL", "ours_defaults")
GREEDY = dict(ignore_eos=True, do_sample=False)  # MII's default request samples


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(10, VOCAB)}" for _ in range(count))


def ms(value: float) -> float:
    return round(value * 1000, 2)


def log(**fields) -> None:
    append_result("latency.jsonl", dict(fields, system=LABEL, model=MODEL))


async def ttft4k(client) -> None:
    await client.agenerate(words(7, 4000), max_new_tokens=8, **GREEDY)  # the shape
    replica, seen = [], []
    for rep in range(10):
        text = words(100 + rep, 4000)
        t0 = time.perf_counter()
        first = None
        async for chunk in client.astream(text, max_new_tokens=8, **GREEDY):
            if first is None and chunk.generated_length:
                first = time.perf_counter() - t0
            if chunk.finish_reason not in ("none", ""):
                replica.append(chunk.time_to_first_token_s)
        seen.append(first)
    from transformers import AutoTokenizer  # what the replica spends before arrival

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    t0 = time.perf_counter()
    for rep in range(10):
        tokenizer(words(100 + rep, 4000))
    tokenize = (time.perf_counter() - t0) / 10
    log(case="ttft4k", prompt_tokens=4000, reps=10, replica_ttft_p50_ms=ms(pct(replica, 50)),
        replica_ttft_min_ms=ms(min(replica)), client_ttft_p50_ms=ms(pct(seen, 50)),
        client_ttft_min_ms=ms(min(seen)), tokenize_ms=ms(tokenize))


async def itl_long(client) -> None:
    started = asyncio.Event()
    counts = [0] * 63
    stamps: List[List[float]] = [[] for _ in range(63)]

    async def stream(i: int) -> None:
        async for chunk in client.astream(words(1000 + i, 128), max_new_tokens=384,
                                          **GREEDY):
            stamps[i].append(time.perf_counter())
            counts[i] += 1
            if min(counts) >= 16:
                started.set()

    async def long_one():
        await started.wait()
        t0 = time.perf_counter()
        first = None
        async for chunk in client.astream(words(5000, 4000), max_new_tokens=8, **GREEDY):
            if first is None and chunk.generated_length:
                first = time.perf_counter()
        return t0, first

    await client.agenerate(words(8, 4000), max_new_tokens=8, **GREEDY)
    results = await asyncio.gather(*(stream(i) for i in range(63)), long_one())
    t0, first = results[-1]
    gaps, window = [], []
    for times in stamps:
        for a, b in zip(times, times[1:]):
            gaps.append(b - a)
            if t0 <= b <= first + 0.05:
                window.append(b - a)
    log(case="itl_long", streams=63, long_prompt_tokens=4000,
        long_ttft_client_ms=ms(first - t0), itl_p50_ms=ms(pct(gaps, 50)),
        itl_p99_ms=ms(pct(gaps, 99)), window_gaps=len(window),
        window_p50_ms=ms(pct(window, 50)) if window else None,
        window_p99_ms=ms(pct(window, 99)) if window else None,
        window_max_ms=ms(max(window)) if window else None,
        window_p99_over_p50=round(pct(window, 99) / pct(gaps, 50), 2) if window else None)


async def prefix(client) -> None:
    shared = words(42, 2048)
    await client.agenerate(shared + " " + words(43, 64), max_new_tokens=16, **GREEDY)
    texts = [shared + " " + words(2000 + i, 64) for i in range(64)]
    rounds = []
    for round_ in range(2):  # the second round: the same requests again (a control)
        t0 = time.perf_counter()
        out = await asyncio.gather(*(client.agenerate(t, max_new_tokens=16, **GREEDY)
                                     for t in texts))
        wall = time.perf_counter() - t0
        ttfts = [r[0].time_to_first_token_s for r in out]
        digests = [hashlib.sha256(r[0].generated_text.encode()).hexdigest()[:8] for r in out]
        rounds.append(digests)
        log(case="prefix", round=round_, requests=64, prefix_tokens=2048, own_tokens=64,
            ttft_p50_ms=ms(pct(ttfts, 50)), ttft_p90_ms=ms(pct(ttfts, 90)),
            wall_s=round(wall, 3), digests=digests,
            same_as_round0=sum(a == b for a, b in zip(rounds[0], digests)))


CASES = {"ttft4k": ttft4k, "itl_long": itl_long, "prefix": prefix}


def main() -> None:
    import mii
    from mii_core.deploy.ports import free_port

    extra = json.loads(os.environ.get("SERVE_EXTRA") or "{}")
    started = time.time()
    client = mii.serve(MODEL, deployment_name=f"lat-{LABEL}", port_number=free_port(),
                       startup_timeout=600.0, **extra)
    log(event="ready", ready_s=round(time.time() - started, 1), serve_kwargs=extra)
    try:
        log(event="deferred_warm_up", **wait_for_deferred_warm_up(client))
        for name in os.environ.get("CASES", "ttft4k itl_long prefix").split():
            asyncio.run(CASES[name](client))
        info = client.info()
        log(event="info", stats=[r.get("stats") for r in info.get("replicas", [])])
    finally:
        client.terminate_server()


if __name__ == "__main__":
    try:
        main()
    except Exception as error:
        traceback.print_exc()
        log(event="error", error=repr(error)[:1500])
        sys.exit(1)
