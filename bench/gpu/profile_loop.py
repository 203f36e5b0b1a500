"""Where does a decode step of our engine loop spend its time? (in-process, one GPU)

    python bench/gpu/profile_loop.py [MODEL_DIR]
Prints step times for BatchState alone and for the Generator, then cProfile's top entries.
"""
import cProfile
import io
import os
import pstats
import sys
import threading
import time

import torch

from mii_core.config.models import GenerateParamsConfig, ModelConfig
from mii_core.plugins.interfaces import RankInfo
from mii_engines.runtime.kv.dynamic import BatchState, StepPlan
from mii_engines.runtime.loop import Generator
from mii_engines.transformers.engine import TransformersEngine

model_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MODEL_DIR", "/tmp/llama1b")
rank = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device="cuda:0", dist_port=0)
loaded = TransformersEngine().load(ModelConfig(model_name_or_path=model_dir), rank)
prompt = " ".join(f"w{i}" for i in range(100, 228))
ids = loaded.tokenizer(prompt)["input_ids"]

with torch.inference_mode():
    for bs in (1, 64):
        state = BatchState(loaded.model, loaded.device)
        logits = state.apply(StepPlan(prefill=[ids] * bs))[1]
        tokens = logits.argmax(-1).tolist()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(64):
            logits, _ = state.apply(StepPlan(decode=tokens))
            tokens = logits.argmax(-1).tolist()
        print(f"BatchState decode bs={bs}: {(time.perf_counter() - started) / 64 * 1e3:.2f} ms/step",
              flush=True)

gen = Generator(loaded, 0, 64, 256)
profiler = cProfile.Profile()


def run():
    profiler.enable()
    gen.run()
    profiler.disable()


thread = threading.Thread(target=run)
thread.start()
for bs in (1, 64):
    done = threading.Semaphore(0)
    params = GenerateParamsConfig(do_sample=False, max_new_tokens=64, ignore_eos=True)
    started = time.perf_counter()
    for _ in range(bs):
        gen.submit([prompt], params, lambda e: e.finish_reason and done.release())
    for _ in range(bs):
        done.acquire()
    elapsed = time.perf_counter() - started
    print(f"Generator bs={bs}: {elapsed / 64 * 1e3:.2f} ms/step, {bs * 64 / elapsed:.1f} tok/s",
          flush=True)
gen.stop()
thread.join()
out = io.StringIO()
pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
print(out.getvalue()[:6000])
