"""The sampling kernel on the GPU: checked against the sorted reference, then timed
against the torch sampler (the one the CPU uses; the GPU's before 2026-12-02).

    python3 bench/gpu/sampling_check.py     # JSON lines to $OUT/sampling.jsonl

Correctness: a 32-token vocabulary, 20,000 draws per configuration (one launch each),
chi-square against the top-p nucleus of the sorted cumulative sum; greedy rows of a
128,256-token vocabulary against argmax. Timing: ``sample`` on [rows, 128256] bf16
logits, MII's default request (do_sample, top_p 0.9) and greedy, a CUDA graph of 50
calls, median of 5; the bytes of logits read per call over the time.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mii_core.config.models import GenerateParamsConfig  # noqa: E402
from mii_engines.runtime.kernels.triton_sampling import run_sample  # noqa: E402
from mii_engines.runtime.sampling import row_params, sample  # noqa: E402
from kernel_check import replay_seconds  # noqa: E402  (this folder: run as a script)

OUT = os.environ.get("OUT", "/tmp")
CUDA = torch.device("cuda")


def chi2_999(df: int) -> float:
    """The chi-square quantile at 0.999 (Wilson-Hilferty; within 1 % from df 3 up)."""
    h = 2 / (9 * df)
    return df * (1 - h + 3.090 * h ** 0.5) ** 3


def log(**fields):
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(OUT, "sampling.jsonl"), "a") as out:
        out.write(line + "\n")


def nucleus(row, temperature, top_p):
    probs = torch.softmax(row.double() / temperature, -1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p
    expected = torch.zeros_like(probs)
    expected[order[keep]] = ordered[keep] / ordered[keep].sum()
    return expected


def check_distribution() -> bool:
    ok = True
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(32, generator=gen)
    count = 20000
    for temperature, top_p in ((1.0, 0.9), (0.6, 0.5), (1.3, 2.0), (1.0, 0.2)):
        seeds = torch.randint(2 ** 62, (count,), generator=gen)
        seeds = seeds.to(CUDA)
        got = run_sample(row.to(CUDA, torch.bfloat16).expand(count, -1).contiguous(),
                         torch.full((count,), temperature, device=CUDA),
                         torch.full((count,), top_p, device=CUDA), 0, seeds).cpu()
        # the reference from the same bf16 values the kernel reads
        expected = nucleus(row.to(torch.bfloat16).float(), temperature, min(top_p, 1.0))
        observed = torch.bincount(got, minlength=32).double()
        kept = expected > 0
        outside = int(observed[~kept].sum())
        want = expected[kept] * count
        statistic = float(((observed[kept] - want) ** 2 / want).sum())
        df = int(kept.sum()) - 1
        critical = round(chi2_999(df), 2) if df > 0 else None
        passed = outside == 0 and (critical is None or statistic < critical)
        ok &= passed
        log(kind="check", check="distribution", temperature=temperature, top_p=top_p,
            draws=count, kept=int(kept.sum()), outside=outside, chi2=round(statistic, 2),
            df=df, critical=critical, ok=passed)
    return ok


def check_greedy() -> bool:
    gen = torch.Generator(device=CUDA).manual_seed(1)
    logits = torch.randn(64, 128256, generator=gen, device=CUDA).to(torch.bfloat16)
    got = run_sample(logits, torch.zeros(64, device=CUDA), torch.full((64,), 2.0, device=CUDA),
                     0)
    passed = torch.equal(got, logits.argmax(-1))
    log(kind="check", check="greedy_argmax", rows=64, ok=passed)
    return passed


def time_sample(rows: int, params: GenerateParamsConfig, use_kernel: bool) -> float:
    """Microseconds of GPU time per ``sample`` call: 50 calls captured in a CUDA graph
    (timing the calls as launched would time the host, which the pipelined loop hides)."""
    logits = torch.randn(rows, 128256, device=CUDA).to(torch.bfloat16)
    batch = row_params([params] * rows, logits.shape[-1], CUDA, use_kernel=use_kernel)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            sample(logits, batch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(50):
            sample(logits, batch)
    return replay_seconds(graph, 50) * 1e6


if __name__ == "__main__":
    good = check_distribution() & check_greedy()
    default = GenerateParamsConfig()  # MII's default: do_sample, top_p 0.9
    greedy = GenerateParamsConfig(do_sample=False)
    for rows in (1, 16, 64, 256):
        kernel = time_sample(rows, default, True)
        torch_us = time_sample(rows, default, False)
        argmax = time_sample(rows, greedy, True)
        log(kind="time", rows=rows, vocab=128256, kernel_us=round(kernel, 1),
            torch_us=round(torch_us, 1), greedy_us=round(argmax, 1),
            kernel_gbs=round(rows * 128256 * 2 / kernel / 1e3, 1))
    log(kind="summary", ok=good)
