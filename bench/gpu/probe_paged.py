"""The paged KV cache in-process on the GPU: where a step's time goes.

    python3 bench/gpu/probe_paged.py [VARIANT ...]   # JSON lines to $OUT/probe_paged.jsonl

Each variant loads the model (transformers engine, bf16), builds rank 0's loop exactly
as a replica does (``runtime.service.build_service``) with its settings, and runs
prompts of 128 tokens + 64 new (greedy, ignore_eos) at 1 and 16 rows: in-process tok/s
(no gRPC), then a torch.profiler table of the GPU kernels over one 16-row run
(``$OUT/profile_<variant>.txt``; ``PROFILE_ROWS`` rows instead of 16) and the kernel
time by kind with the GPU's busy share of the run (``kernel_summary``). Variants:
compiled (the defaults), eager (no torch.compile), nographs (no CUDA graphs, no
compile), and the defaults with earlier kernel tiles (``KERNEL_VARIANTS``: before_e).
With ``LONG=1`` the timed and profiled runs are instead 32 distinct prompts of 3,850
tokens + 128 new: issue 17's long-prompt case, where prefill dominates.
``DECODING_BUDGET``: the scheduler's tokens per step while rows decode (``prefill_chunk_tokens``).
"""
from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mii_core.config.models import GenerateParamsConfig, ModelConfig  # noqa: E402
from mii_core.plugins.interfaces import RankInfo  # noqa: E402
from mii_engines.runtime import service  # noqa: E402
from mii_engines.transformers.engine import TransformersEngine  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
MODEL = os.environ.get("MODEL_DIR", "/tmp/llama1b")
VARIANTS = {"compiled": {}, "eager": {"torch_compile": False},
            "nographs": {"torch_compile": False, "cuda_graphs": False}}
# The defaults with kernel tiles of before (``Tiles`` fields off), for A/B in one process:
# before_e: every key tile masked, a mixed step's decode rows in the varlen launch.
KERNEL_VARIANTS = {"before_e": {"whole_unmasked": False, "mixed_rows_apart": False}}
DEVICE = os.environ.get("DEVICE", "cuda:0")  # DEVICE=cpu: a dry run on the tiny model
RANK = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device=DEVICE, dist_port=0)


def log(**fields):
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(OUT, "probe_paged.jsonl"), "a") as out:
        out.write(line + "\n")


LONG = os.environ.get("LONG") == "1"
if os.environ.get("DECODING_BUDGET"):  # the scheduler's prompt tokens per step while rows decode
    from mii_engines.runtime.kv import choose

    _budgets_for = choose.budgets_for
    choose.budgets_for = lambda config: _budgets_for(config.model_copy(
        update={"prefill_chunk_tokens": int(os.environ["DECODING_BUDGET"])}))
PROFILE_ROWS = int(os.environ.get("PROFILE_ROWS", "16"))


def generate(loop, count: int, new: int, length: int = 0, salt: int = 0) -> float:
    """Seconds to serve ``count`` prompts; ``length`` > 0: distinct prompts of that many
    words, other ones for each ``salt`` (no prefix hits), else one 128-word prompt
    repeated."""
    if length:
        rng = random.Random(salt)
        texts = [" ".join(f"w{rng.randrange(10, 120000)}" for _ in range(length))
                 for _ in range(count)]
    else:
        texts = [" ".join(f"w{100 + i}" for i in range(128 if DEVICE != "cpu" else 8))] * count
    done, pending = threading.Event(), [count]

    def sink(event):
        if event.finish_reason:
            pending[0] -= 1
            if pending[0] == 0:
                done.set()

    started = time.perf_counter()
    params = GenerateParamsConfig(max_new_tokens=new, do_sample=False, ignore_eos=True)
    # one request each from threads of their own, as a server's threads submit concurrent
    # clients' requests (tokenizing in one thread would serialize 32 long prompts)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda text: loop.submit([text], params, sink), texts))
    if not done.wait(300):
        raise RuntimeError("generation did not finish")
    return time.perf_counter() - started


CATEGORIES = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
              ("prefill_attention", ("_varlen_kernel",)),
              ("decode_attention", ("_decode_kernel", "_combine_kernel")),
              ("sampling", ("argmax", "sampl")))


def kernel_summary(prof) -> dict:
    """GPU kernel time by kind (ms) over a profiled run, and how much of the run's span
    the GPU was busy (the union of kernel intervals): what is left for the host."""
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0]
    if not kernels:
        return {}
    ms = {name: 0.0 for name, _ in CATEGORIES}
    ms["other"] = 0.0
    intervals = []
    for event in kernels:
        lower = event.name.lower()
        kind = next((name for name, keys in CATEGORIES if any(k in lower for k in keys)),
                    "other")
        ms[kind] += (event.time_range.end - event.time_range.start) / 1e3
        intervals.append((event.time_range.start, event.time_range.end))
    intervals.sort()
    first = intervals[0][0]
    busy, end, gaps = 0.0, first, []
    for start, stop in intervals:
        if start > end:
            gaps.append((start - end, end - first))
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = intervals[-1][1] - first
    gaps.sort(reverse=True)
    # where the GPU waited: idle in gaps over 100 us, and the largest (ms, at ms from start)
    return dict(kernel_ms={k: round(v, 1) for k, v in ms.items()},
                gpu_busy_ms=round(busy / 1e3, 1), span_ms=round(span / 1e3, 1),
                idle_in_gaps_over_100us_ms=round(sum(g for g, _ in gaps if g > 100) / 1e3, 1),
                gaps_over_100us=sum(g > 100 for g, _ in gaps),
                largest_gaps_ms=[[round(g / 1e3, 2), round(at / 1e3, 1)] for g, at in gaps[:8]],
                kernels=len(kernels))


def probe(name: str, settings: dict) -> None:
    name += os.environ.get("VARIANT_SUFFIX", "")
    # a third of the GPU: the next variant loads while this one's memory is returned
    extra = {"kv_cache": "paged", "kv_blocks": 512} if DEVICE == "cpu" else {
        "gpu_memory_utilization": 0.3}
    config = ModelConfig(model_name_or_path=MODEL, dtype="bfloat16" if DEVICE != "cpu" else
                         "float32", **extra, **settings)
    loaded = TransformersEngine().load(config, RANK)
    started = time.perf_counter()
    loop = service.build_service(loaded, config, RANK, max_queue_size=1024)
    built = time.perf_counter() - started
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        generate(loop, 4, 8)
        if LONG:
            length = 3850 if DEVICE != "cpu" else 40
            generate(loop, 32, 8, length, salt=1)  # every prefill shape once
            seconds = generate(loop, 32, 128, length, salt=2)
            log(variant=name, case="long", rows=32, prompt=length, new=128,
                tok_s=round(32 * 128 / seconds, 1), wall_s=round(seconds, 3),
                prompt_tok_s=round(32 * length / seconds, 1), build_s=round(built, 1))
        else:
            for rows in (1, 16, 64):
                seconds = generate(loop, rows, 64)
                log(variant=name, rows=rows, tok_s=round(rows * 64 / seconds, 1),
                    ms_per_step=round(seconds / 64 * 1e3, 2), build_s=round(built, 1))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            generate(loop, 32, 128, length, salt=3) if LONG else generate(loop, PROFILE_ROWS, 16)
        log(variant=name, case="profile_long" if LONG else f"profile_{PROFILE_ROWS}",
            **kernel_summary(prof))
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(OUT, f"profile_{name}.txt"), "w") as out:
            out.write(table)
        print(table[:4000], flush=True)
    finally:
        loop.stop()
        thread.join(timeout=30)
        del loop, loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    for variant in sys.argv[1:] or list(VARIANTS):
        try:
            if variant in KERNEL_VARIANTS:
                from kernel_check import kernel_tiles  # this folder: run as a script

                with kernel_tiles(**KERNEL_VARIANTS[variant]):
                    probe(variant, {})
            else:
                probe(variant, VARIANTS[variant])
        except Exception as error:  # the next variant still runs
            import traceback

            traceback.print_exc()
            log(variant=variant, error=repr(error)[:800])
