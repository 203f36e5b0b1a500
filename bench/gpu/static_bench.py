"""Static KV cache + CUDA-graph decode vs the dynamic cache, through mii.serve, one GPU.

    python bench/gpu/static_bench.py        (run.sh's environment; results -> gpu_bench.jsonl)
"""
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import mii  # noqa: E402
from mii_core.ports import free_port  # noqa: E402

KW = dict(do_sample=False, max_new_tokens=common.G, ignore_eos=True)


async def concurrent(client, n, tokens=common.G):
    texts = common.prompts(n, seed=100 + n)
    kw = dict(KW, max_new_tokens=tokens)
    started = time.perf_counter()
    replies = await asyncio.gather(*(client.agenerate(t, timeout=300, **kw) for t in texts))
    wall = time.perf_counter() - started
    return sum(r[0].generated_length for r in replies) / wall


def run(kv_cache: str) -> list:
    started = time.perf_counter()
    client = mii.serve(common.MODEL_DIR, deployment_name=f"static-{kv_cache}",
                       port_number=free_port(), engine="transformers", kv_cache=kv_cache,
                       max_length=512, max_batch_size=64)
    ready = time.perf_counter() - started
    try:
        greedy = [r.generated_text for r in client(common.greedy_prompts(), do_sample=False,
                                                   max_new_tokens=common.GREEDY_TOKENS,
                                                   ignore_eos=True)]
        asyncio.run(concurrent(client, 4))  # warm-up (captures small graphs)
        for n in (1, 16, 64):
            asyncio.run(concurrent(client, n, tokens=4))  # capture this bucket's graph first
            common.log(phase="D_static", engine=f"ours_transformers_{kv_cache}", mode="concurrent",
                       bs=n, tok_s=round(asyncio.run(concurrent(client, n)), 1),
                       ready_s=round(ready, 1))
        return greedy
    finally:
        client.terminate_server()


if __name__ == "__main__":
    dynamic = run("dynamic")
    static = run("static")
    common.log(phase="D_static", kind="greedy_compare", what="static vs dynamic",
               **common.compare_texts(static, dynamic))
