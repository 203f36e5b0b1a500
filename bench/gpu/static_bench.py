"""The fast engine through the whole serving path (mii.serve + client), one GPU.

    python bench/gpu/static_bench.py [CONFIG ...]   (run.sh's environment; -> gpu_bench.jsonl)

Configs: dynamic (default cache, eager), static (slot cache, fused projections, CUDA
graphs), compiled (static + torch.compile). For each: serve()→ready seconds (model
load + graph capture/compilation), tok/s for 1/16/64 concurrent requests (128-token
prompts, 128 new tokens, greedy, ignore_eos), TTFT and inter-token latency p50/p99
measured by streaming clients at 1 and 64 concurrent, peak GPU memory (nvidia-smi,
minus the baseline), and greedy text equality against the dynamic cache.
"""
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import mii  # noqa: E402
from mii_core.deploy.ports import free_port  # noqa: E402

KW = dict(do_sample=False, max_new_tokens=common.G, ignore_eos=True)
CONFIGS = {"dynamic": dict(kv_cache="dynamic"), "static": dict(kv_cache="static"),
           "compiled": dict(kv_cache="static", torch_compile=True),
           # greedy-only checks: float32 shows whether bf16 differences are rounding
           "dynamic_fp32": dict(kv_cache="dynamic", dtype="float32"),
           "static_fp32": dict(kv_cache="static", dtype="float32")}
# Appended to the engine names: an A/B of the environment (e.g. LABEL=_gil5ms with
# MII_GIL_SWITCH_INTERVAL_S=0.005) keeps its rows apart from the main run's.
LABEL = os.environ.get("BENCH_LABEL", "")
COMPARE = [("static", "dynamic"), ("compiled", "dynamic"), ("static_fp32", "dynamic_fp32")]


async def concurrent(client, n, tokens=common.G):
    texts = common.prompts(n, seed=100 + n)
    kw = dict(KW, max_new_tokens=tokens)
    started = time.perf_counter()
    replies = await asyncio.gather(*(client.agenerate(t, timeout=300, **kw) for t in texts))
    wall = time.perf_counter() - started
    return sum(r[0].generated_length for r in replies) / wall


async def streamed(client, n):
    """TTFT and gaps between streamed chunks, seen by n concurrent streaming clients."""
    async def one(text):
        started = time.perf_counter()
        stamps = []
        async for _ in client.astream(text, timeout=300, **KW):
            stamps.append(time.perf_counter())
        return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])]

    results = await asyncio.gather(*(one(t) for t in common.prompts(n, seed=7 + n)))
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    return {f"ttft_ms_p50_bs{n}": _ms(_pct(ttft, 50)), f"ttft_ms_p99_bs{n}": _ms(_pct(ttft, 99)),
            f"itl_ms_p50_bs{n}": _ms(_pct(gaps, 50)), f"itl_ms_p99_bs{n}": _ms(_pct(gaps, 99))}


def batching(client) -> dict:
    """The replicas' prefill counters (steps that admitted rows, rows admitted, rows
    computed only to fill a graph bucket), summed."""
    totals = dict(prefills=0, prefill_rows=0, padded_prefill_rows=0)
    for replica in client.info().get("replicas", []):
        stats = replica.get("stats", {})
        for key in totals:
            totals[key] += stats.get(key, 0)
    return totals


def _pct(values, q):
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _ms(seconds):
    return round(seconds * 1e3, 2)


def run(name: str) -> list:
    with common.GpuSampler(interval=0.5) as sampler:
        started = time.perf_counter()
        client = mii.serve(common.MODEL_DIR, deployment_name=f"fast-{name}",
                           port_number=free_port(), engine="transformers", max_length=512,
                           max_batch_size=64, **CONFIGS[name])
        ready = time.perf_counter() - started
        try:
            greedy = [r.generated_text for r in client(common.greedy_prompts(), do_sample=False,
                                                       max_new_tokens=common.GREEDY_TOKENS,
                                                       ignore_eos=True)]
            common.log(phase="D_static", engine=f"ours_{name}{LABEL}", kind="greedy_texts",
                       texts=greedy, ready_s=round(ready, 1))
            if name.endswith("_fp32"):
                return greedy
            asyncio.run(concurrent(client, 4, tokens=8))  # warm the path
            for n in common.BATCHES:
                before = batching(client)
                tok_s = statistics.median(asyncio.run(concurrent(client, n)) for _ in range(3))
                after = batching(client)
                common.log(phase="D_static", engine=f"ours_{name}{LABEL}", mode="concurrent", bs=n,
                           tok_s=round(tok_s, 1), ready_s=round(ready, 1),
                           **{key: after[key] - before[key] for key in after})
            latency = {}
            for n in (1, common.BATCHES[-1]):
                latency.update(asyncio.run(streamed(client, n)))
        finally:
            client.terminate_server()
    common.log(phase="D_static", engine=f"ours_{name}{LABEL}", kind="latency_memory",
               ready_s=round(ready, 1), **latency, **sampler.summary())
    return greedy


def compare_all() -> None:
    """Greedy text of each pair in COMPARE measured so far (this or an earlier phase)."""
    texts = {row["engine"][len("ours_"):]: row["texts"] for row in common.read_jsonl()
             if row.get("phase") == "D_static" and row.get("kind") == "greedy_texts"}
    done = {row.get("what") for row in common.read_jsonl() if row.get("kind") == "greedy_compare"}
    for mine, reference in COMPARE:
        what = f"{mine} vs {reference}"
        if mine in texts and reference in texts and what not in done:
            common.log(phase="D_static", kind="greedy_compare", what=what,
                       **common.compare_texts(texts[mine], texts[reference]))


if __name__ == "__main__":
    common.exit_on_sigterm()
    for name in sys.argv[1:] or ["dynamic", "static", "compiled"]:
        try:
            run(name)
        except Exception as error:  # report, go on with the next config
            common.log(phase="D_static", engine=f"ours_{name}{LABEL}",
                       error=f"{type(error).__name__}: {error}"[:1500])
    compare_all()
