"""Why is one decode step slow? Variants of the same forward on the 1.5B model, one GPU."""
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

model_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama1b"


def timed_steps(model, bs, variant, steps=32):
    ids = torch.randint(10, 1000, (bs, 128), device="cuda")
    mask = torch.ones_like(ids)
    cache = DynamicCache()
    kw = {}
    pos = torch.arange(128, device="cuda")[None].expand(bs, -1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask if variant != "nomask" else None,
                    position_ids=pos if variant != "nopos" else None, past_key_values=cache,
                    use_cache=True)
        tok = out.logits[:, -1].argmax(-1)[:, None]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for step in range(steps):
            mask = torch.cat([mask, torch.ones((bs, 1), dtype=mask.dtype, device="cuda")], 1)
            pos = pos[:, -1:] + 1
            args = dict(input_ids=tok, past_key_values=cache, use_cache=True)
            if variant != "nomask":
                args["attention_mask"] = mask
            if variant != "nopos":
                args["position_ids"] = pos
            if variant == "cachepos":
                args["cache_position"] = pos[0]
            out = model(**args)
            tok = out.logits[:, -1].argmax(-1)[:, None]
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


for impl in ("sdpa", "eager"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation=impl).cuda().eval()
    for variant in ("ours", "nomask", "nopos", "cachepos"):
        for bs in (1, 64):
            print(f"{impl:6} {variant:9} bs={bs:3}: {timed_steps(model, bs, variant):7.2f} ms/step",
                  flush=True)
    if impl == "sdpa":
        from torch.profiler import ProfilerActivity, profile
        ids = torch.randint(10, 1000, (1, 128), device="cuda")
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            cache = DynamicCache()
            m = torch.ones_like(ids)
            model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True)
            for _ in range(3):
                m = torch.cat([m, torch.ones((1, 1), dtype=m.dtype, device="cuda")], 1)
                model(input_ids=ids[:, :1], attention_mask=m, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)[:4000])
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)[:4000])
    del model
    torch.cuda.empty_cache()
