"""Where does a decode step's time go? mii's static state in-process, variant by variant.

    python bench/gpu/probe_decode.py [VARIANT ...]    (run.sh's environment, one GPU)

Variants: plain (graphs), fused (q/k/v + gate/up fused, graphs), compiled (fused +
one torch.compiled decoder layer for all layers, graphs), compiled_whole (fused + the
whole decode step compiled, as before regional compilation). Variants that compile
share torch.compile's cache within the process: give each its own process (run.sh
phase) when comparing compile times. For each: warm-up seconds, GPU time of one graph replay per
bucket (CUDA events), the step time of the loop's own work (replay + batched sampler +
one host sync), and the in-process Generator's tok/s for 1/16/64 prompts of 128 tokens
with 128 new tokens — the "engine in-process" side of the served/in-process ratio.
"""
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import torch  # noqa: E402

from mii_core.config.models import GenerateParamsConfig, ModelConfig  # noqa: E402
from mii_core.plugins.interfaces import RankInfo  # noqa: E402
from mii_engines.runtime.kv import slots as static_state  # noqa: E402
from mii_engines.runtime.kv.dynamic import StepPlan  # noqa: E402
from mii_engines.runtime.kv.slots import make_state  # noqa: E402
from mii_engines.runtime.loop import Generator  # noqa: E402
from mii_engines.runtime.sampling import row_params, sample  # noqa: E402
from mii_engines.transformers.engine import TransformersEngine  # noqa: E402

DEVICE = "cpu" if common.TINY else "cuda:0"
MAX_ROWS = 8 if common.TINY else 64
MAX_LEN = 64 if common.TINY else 512


def load():
    rank = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device=DEVICE, dist_port=0)
    loaded = TransformersEngine().load(ModelConfig(model_name_or_path=common.MODEL_DIR,
                                                   max_length=MAX_LEN), rank)
    return loaded


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def replay_ms(state, bucket, n=50):
    if not state.use_graphs:
        return None
    graph, _ = state._graph(bucket, state._width(common.P + 64))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    sync()
    return round(start.elapsed_time(end) / n, 3)


def loop_ms(state, loaded, rows, steps=min(64, MAX_LEN - common.P - 1)):
    """Prefill `rows` prompts, then decode steps as the loop does them (sample + tolist)."""
    prompts = [[(7 * r + i) % 1000 + 10 for i in range(common.P)] for r in range(rows)]
    sync()
    started = time.perf_counter()
    decoded, prefilled = state.apply(StepPlan(prefill=prompts))
    sync()
    prefill_ms = (time.perf_counter() - started) * 1e3
    params = row_params([GenerateParamsConfig(do_sample=False)] * rows, prefilled.shape[-1],
                        prefilled.device)
    tokens = sample(prefilled, params).tolist()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        decoded, _ = state.apply(StepPlan(decode=tokens))
        tokens = sample(decoded, params).tolist()
    elapsed = (time.perf_counter() - started) / steps * 1e3
    state.apply(StepPlan(keep=[]))
    return round(elapsed, 3), round(prefill_ms, 2)


def generator_tok_s(loaded, state, n):
    gen = Generator(loaded, replica=0, max_batch_size=MAX_ROWS, max_queue_size=256, state=state)
    thread = threading.Thread(target=gen.run, daemon=True)
    thread.start()
    try:
        params = GenerateParamsConfig(do_sample=False, max_new_tokens=common.G, ignore_eos=True)
        done, lock, left = threading.Event(), threading.Lock(), [n]

        def sink(event):
            if event.finish_reason:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        texts = common.prompts(n, seed=100 + n)
        started = time.perf_counter()
        for text in texts:  # n separate requests, as concurrent clients send them
            gen.submit([text], params, sink)
        assert done.wait(300), "generation did not finish"
        wall = time.perf_counter() - started
        return round(n * common.G / wall, 1)
    finally:
        gen.stop()
        thread.join(timeout=30)


def profile_replays(state, variant):
    """Top kernels of 20 replays of the smallest and the largest bucket -> $OUT/profile_*.txt."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for bucket in (state.buckets()[0], state.buckets()[-1]):
        graph, _ = state._graph(bucket, state._width(common.P + 64))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                graph.replay()
            sync()
        lines.append(f"== {variant} bucket {bucket}: 20 replays")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                               max_name_column_width=90))
    with open(os.path.join(common.OUT, f"profile_{variant}.txt"), "w") as handle:
        handle.write("\n".join(lines))


def profile_loop(loaded, state, variant, result):
    """The in-process Generator at 16 and 64 prompts under the profiler: how busy the GPU
    is over the run (kernel time / wall) and the top kernels -> $OUT/loop_profile_*.txt."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for n in sorted({min(n, MAX_ROWS) for n in (16, 64)}):
        kind = ProfilerActivity.CUDA if DEVICE.startswith("cuda") else ProfilerActivity.CPU
        with profile(activities=[kind]) as prof:
            started = time.perf_counter()
            generator_tok_s(loaded, state, n)
            sync()
            wall = time.perf_counter() - started
        averages = prof.key_averages()
        busy = sum(item.self_device_time_total for item in averages) / 1e6
        result[f"loop_gpu_busy_frac_bs{n}"] = round(busy / wall, 3)
        lines.append(f"== {variant} generator, {n} prompts: wall {wall * 1e3:.1f} ms, "
                     f"kernels {busy * 1e3:.1f} ms")
        lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=30,
                                    max_name_column_width=90))
    with open(os.path.join(common.OUT, f"loop_profile_{variant}.txt"), "w") as handle:
        handle.write("\n".join(lines))
    if os.environ.get("PROBE_TRACE") == "1":  # host and GPU timeline, to find GPU idle gaps
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if DEVICE.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            generator_tok_s(loaded, state, MAX_ROWS)
            sync()
        path = os.path.join(common.OUT, f"trace_{variant}_bs{MAX_ROWS}.json")
        prof.export_chrome_trace(path)
        subprocess.run(["gzip", "-f", path], check=False)


def probe(variant):
    if DEVICE.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = load()
    if variant == "plain":
        from mii_engines.runtime.kv.slots import StaticBatchState

        state = StaticBatchState(loaded.model, loaded.device, MAX_ROWS, MAX_LEN)
    else:
        regional = static_state.repeated_blocks
        if variant == "compiled_whole":  # the earlier way: the whole step compiled
            static_state.repeated_blocks = lambda model, attention: None
        try:
            state = make_state(loaded, "static", MAX_ROWS, True, 1,
                               compile_decode=variant.startswith("compiled"))
        finally:  # later variants in this process compile regionally again
            static_state.repeated_blocks = regional
    warm = state.warm_up()
    result = dict(phase="P_probe", variant=variant, warm_up_s=round(warm, 1),
                  regional=state.regions is not None, **state.warm_up_times)
    for rows in (1, 16, 64):
        if rows > MAX_ROWS:
            continue
        with torch.inference_mode():
            result[f"replay_ms_bs{rows}"] = replay_ms(state, state._bucket(rows))
            result[f"loop_ms_bs{rows}"], result[f"prefill_ms_bs{rows}"] = loop_ms(
                state, loaded, rows)
    for n in (1, 16, 64):
        if n <= MAX_ROWS:
            generator_tok_s(loaded, state, min(n, 4))  # warm the path
            result[f"inprocess_tok_s_bs{n}"] = statistics.median(
                generator_tok_s(loaded, state, n) for _ in range(3))  # as the served bench
    if state.use_graphs and os.environ.get("PROBE_PROFILE", "1") == "1":
        profile_replays(state, variant)
        profile_loop(loaded, state, variant, result)
    if DEVICE.startswith("cuda"):
        result["max_allocated_mib"] = torch.cuda.max_memory_allocated() // 2**20
    common.log(**result)
    del state, loaded
    torch.cuda.empty_cache() if DEVICE.startswith("cuda") else None


if __name__ == "__main__":
    common.exit_on_sigterm()
    for name in sys.argv[1:] or ("plain", "fused", "compiled"):
        try:
            probe(name)
        except Exception as error:  # report and go on with the next variant
            import traceback

            traceback.print_exc()
            common.log(phase="P_probe", variant=name, error=f"{type(error).__name__}: {error}"[:800])
