"""Serving workloads on the GPU: ``mii.serve(model)`` with the defaults vs DeepSpeed-MII FastGen.

Same model, same prompts (seeded as in ``shared/anchors/workload.py``: prompt lengths
uniform in [pmin, pmax] words, one token per word with the anchors' WordLevel tokenizer),
greedy, ignore_eos, all requests of a case submitted at once: N concurrent ``agenerate``
calls for ours, one ``mii.pipeline`` call for FastGen. tok/s = generated tokens / wall.

    SYSTEM=ours python3 bench/gpu/workload_bench.py        # SERVE_EXTRA='{"kv_cache": ...}'
    SYSTEM=fastgen PYTHONPATH=/tmp/site_mii python3 bench/gpu/workload_bench.py
    CASES="c128 mixed512" (see CASES below)  MODEL_DIR=/tmp/llama1b  VOCAB=128000

Before timing, ``WAIT_FOR`` (a path) is waited for, at most 300 s: a peer's compilation
running in the background must not share the CPU with a timed run. Each case's line goes
to $OUT/workload.jsonl; ours also records the replica's KV figures (``client.info()``).
``REPEAT=k`` times each case k times, each on prompts of its own, and reports the run of
median tok/s (and every run's): one run of 0.3 s at 64 streams varied by 10 %.
Run this file as a script: FastGen's ``mii`` must not be shadowed by the checkout's.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import traceback
from typing import Dict, List, Tuple

OUT = os.environ.get("OUT", "/tmp")
MODEL = os.environ.get("MODEL_DIR", "/tmp/llama1b")
SYSTEM = os.environ.get("SYSTEM", "ours")
VOCAB = int(os.environ.get("VOCAB", 128000))
LABEL = os.environ.get("LABEL", SYSTEM)
REPEAT = int(os.environ.get("REPEAT", "1"))
# name -> [(requests, prompt min, prompt max, new tokens)]; cases named s* sample (MII's
# default request: do_sample=True, top_p 0.9), the others are greedy
CASES: Dict[str, List[Tuple[int, int, int, int]]] = {
    "c128": [(1, 128, 128, 128), (16, 128, 128, 128), (64, 128, 128, 128)],
    "s128": [(1, 128, 128, 128), (16, 128, 128, 128), (64, 128, 128, 128)],
    "mixed128": [(128, 64, 1024, 256)],
    "mixed512": [(512, 64, 1024, 256)],
    "mixed256": [(256, 64, 1024, 256)],
    "long": [(1, 3800, 3900, 128), (8, 3800, 3900, 128), (32, 3800, 3900, 128)],
    "dry": [(1, 2, 2, 8), (4, 1, 3, 8)],  # the CPU dry run on the tiny model
}


def prompts(n: int, pmin: int, pmax: int, salt: int = 0) -> List[str]:
    """The anchors' prompts: seeded by the request count, words w10..w{VOCAB}. ``salt``
    gives other prompts of the same shape: the warm-up's and the sampled cases' (our
    prefix cache would otherwise serve them from the timed run's or the greedy case's
    blocks; FastGen has none)."""
    rng = random.Random(1234 + n + 100003 * salt)
    return [" ".join(f"w{rng.randrange(10, VOCAB)}" for _ in range(rng.randint(pmin, pmax)))
            for _ in range(n)]


def case_prompts(name: str, n: int, pmin: int, pmax: int,
                 run: int = 0) -> Tuple[List[str], bool]:
    """A case's prompts for its ``run``-th timing and whether it samples (cases named s*,
    on prompts of their own)."""
    sample = name.startswith("s")
    return prompts(n, pmin, pmax, salt=(2 if sample else 0) + 10 * run), sample


def median_run(runs: List[Dict]) -> Dict:
    """The run of median tok/s, with every run's tok/s."""
    chosen = sorted(runs, key=lambda run: run["tok_s"])[len(runs) // 2]
    return dict(chosen, tok_s_runs=[run["tok_s"] for run in runs]) if len(runs) > 1 else chosen


def append_result(name: str, fields: Dict) -> None:
    """Print ``fields`` as a RESULT line and append them to $OUT/``name`` (JSON lines);
    the other GPU scripts that write JSON lines use it too."""
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(OUT, name), "a") as out:
        out.write(line + "\n")


def log(**fields) -> None:
    append_result("workload.jsonl", dict(fields, system=LABEL, model=MODEL))


def wait_for_peer() -> None:
    path = os.environ.get("WAIT_FOR")
    if not path:
        return
    started = time.time()
    while not os.path.exists(path) and time.time() - started < 300:
        time.sleep(1)
    log(event="waited_for_peer", seconds=round(time.time() - started, 1),
        found=os.path.exists(path))


def cases() -> List[Tuple[str, Tuple[int, int, int, int]]]:
    names = os.environ.get("CASES", "c128").split()
    return [(name, case) for name in names for case in CASES[name]]


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def wait_for_deferred_warm_up(client, limit_s: float = 60.0) -> Dict[str, float]:
    """Until no replica has graph captures left for idle time (``kv.deferred_graphs``):
    a timed run must not share the replica with them. Returns the wait and what is left."""
    started = time.time()
    while time.time() - started < limit_s:
        left = sum(r.get("stats", {}).get("kv", {}).get("deferred_graphs", 0)
                   for r in client.info().get("replicas", []))
        if not left:
            break
        time.sleep(0.1)
    return dict(seconds_after_ready=round(time.time() - started, 2), left=left)


def ours() -> None:
    import mii
    from mii_core.deploy.ports import free_port

    extra = json.loads(os.environ.get("SERVE_EXTRA") or "{}")
    started = time.time()
    client = mii.serve(MODEL, deployment_name=f"wl-{LABEL}", port_number=free_port(),
                       startup_timeout=600.0, **extra)
    ready = time.time() - started
    try:
        log(event="ready", ready_s=round(ready, 1), serve_kwargs=extra)
        async def one(text: str, new: int, limit: int, sample: bool):
            t0 = time.perf_counter()
            result = await client.agenerate(text, max_new_tokens=new, do_sample=sample,
                                            ignore_eos=True, max_length=limit, timeout=900)
            return time.perf_counter() - t0, result[0].generated_length

        async def run(texts: List[str], new: int, limit: int, sample: bool = False):
            return await asyncio.gather(*(one(t, new, limit, sample) for t in texts))

        asyncio.run(run(["w11 w12 w13"] * 4, 4, 64))
        log(event="deferred_warm_up", **wait_for_deferred_warm_up(client))
        wait_for_peer()
        for name, (n, pmin, pmax, new) in cases():
            sample = case_prompts(name, n, pmin, pmax)[1]
            warm = prompts(n, pmin, pmax, salt=1)[:min(n, 8)]
            asyncio.run(run(warm, 8, pmax + new + 16, sample))  # this shape, once
            runs = []
            for repeat in range(REPEAT):
                texts = case_prompts(name, n, pmin, pmax, repeat)[0]
                t0 = time.perf_counter()
                results = asyncio.run(run(texts, new, pmax + new + 16, sample))
                wall = time.perf_counter() - t0
                tokens = sum(r[1] for r in results)
                latencies = [r[0] for r in results]
                runs.append(dict(wall_s=round(wall, 2), gen_tokens=tokens,
                                 tok_s=round(tokens / wall, 1),
                                 lat_p50_s=round(pct(latencies, 50), 2),
                                 lat_p99_s=round(pct(latencies, 99), 2)))
            log(case=name, n=n, pmin=pmin, pmax=pmax, new=new, sample=sample, **median_run(runs))
        log(event="info", info=client.info())
    finally:
        client.terminate_server()


def fastgen() -> None:
    import mii

    started = time.time()
    pipe = mii.pipeline(MODEL)
    log(event="ready", ready_s=round(time.time() - started, 1))
    pipe(["w11 w12 w13"] * 4, max_new_tokens=4)
    wait_for_peer()
    for name, (n, pmin, pmax, new) in cases():
        sample = case_prompts(name, n, pmin, pmax)[1]
        pipe(prompts(n, pmin, pmax, salt=1)[:min(n, 8)], max_new_tokens=8, ignore_eos=True,
             do_sample=sample)
        runs = []
        try:
            for repeat in range(REPEAT):
                texts = case_prompts(name, n, pmin, pmax, repeat)[0]
                t0 = time.perf_counter()
                out = pipe(texts, max_new_tokens=new, ignore_eos=True, do_sample=sample)
                wall = time.perf_counter() - t0
                tokens = sum(r.generated_length for r in out)
                runs.append(dict(wall_s=round(wall, 2), gen_tokens=tokens,
                                 tok_s=round(tokens / wall, 1)))
        except Exception as error:  # e.g. out of GPU memory at 512 requests
            log(case=name, n=n, pmin=pmin, pmax=pmax, new=new, error=repr(error)[:400])
            continue
        log(case=name, n=n, pmin=pmin, pmax=pmax, new=new, sample=sample, **median_run(runs))
    pipe.destroy()


if __name__ == "__main__":
    try:
        {"ours": ours, "fastgen": fastgen}[SYSTEM]()
    except Exception as error:
        traceback.print_exc()
        log(event="error", error=repr(error)[:1500])
        sys.exit(1)
