"""CPU benchmark of the serving path on the tiny model (not a test).

Measures, in one run on this machine:
- seconds from ``mii.serve()`` to the first reply (fresh deployment each time);
- per-request latency of the same greedy request through ``mii`` (client -> load
  balancer -> replica -> engine), straight to the replica's port (the load
  balancer's hop is the difference), and the engine loop called in-process.

    python bench/serving_overhead.py [--runs 3] [--requests 50] [--out bench/results/serving_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import mii
from mii.testing.tiny_model import ensure_tiny_model
from mii_core.deploy.ports import free_port

PROMPT = "DeepSpeed is"
PARAMS = dict(do_sample=False, max_new_tokens=8, ignore_eos=True)


def startup_seconds(model: str, runs: int) -> list[float]:
    """serve() -> first reply, then terminate; ``runs`` fresh deployments."""
    times = []
    for index in range(runs):
        started = time.perf_counter()
        client = mii.serve(model, deployment_name=f"bench-startup-{index}",
                           port_number=free_port())
        client(PROMPT, **PARAMS)
        times.append(time.perf_counter() - started)
        client.terminate_server()
    return times


def _timed(call, requests: int) -> list[float]:
    for _ in range(5):
        call()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


def served_latencies(model: str, requests: int) -> tuple[list[float], list[float], str]:
    """Sequential requests through the load balancer, then straight to the replica."""
    from mii_core.deploy import registry

    client = mii.serve(model, deployment_name="bench-overhead", port_number=free_port())
    try:
        engine = client.info()["engine"]
        replica_port = registry.load("bench-overhead").replicas[0].port
        direct = mii.MIIClient(client.mii_config, port=replica_port)
        through_lb = _timed(lambda: client(PROMPT, **PARAMS), requests)
        to_replica = _timed(lambda: direct(PROMPT, **PARAMS), requests)
        return through_lb, to_replica, engine
    finally:
        client.terminate_server()


def in_process_latencies(model: str, requests: int) -> list[float]:
    """The same requests submitted to the engine loop in this process."""
    import torch

    from mii_core.config.models import GenerateParamsConfig, ModelConfig
    from mii_core.control.launcher import threads_per_rank
    from mii_core.plugins.interfaces import RankInfo
    from mii_engines.runtime import service
    from mii_engines.transformers.engine import TransformersEngine

    torch.set_num_threads(threads_per_rank(1))  # the same policy a served replica gets
    rank = RankInfo(replica=0, rank=0, world_size=1, local_rank=0, device="cpu", dist_port=0)
    config = ModelConfig(model_name_or_path=model)
    loaded = TransformersEngine().load(config, rank)
    generator = service.build_service(loaded, config, rank, max_queue_size=64)  # a replica's loop
    loop = threading.Thread(target=generator.run, daemon=True)
    loop.start()
    params = GenerateParamsConfig(**PARAMS)

    def one() -> float:
        done = threading.Event()
        started = time.perf_counter()
        generator.submit([PROMPT], params, lambda e: e.finish_reason and done.set())
        done.wait()
        return time.perf_counter() - started

    try:
        for _ in range(5):
            one()
        return [one() for _ in range(requests)]
    finally:
        generator.stop()
        loop.join()


def _p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))]


def main() -> int:
    """Run, print a table and write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--out", default="bench/results/serving_cpu.json")
    args = parser.parse_args()
    os.environ.setdefault("MII_QUIET", "1")
    model = str(ensure_tiny_model())
    startup = startup_seconds(model, args.runs)
    served, direct, engine = served_latencies(model, args.requests)
    local = in_process_latencies(model, args.requests)
    served_ms, local_ms = statistics.median(served) * 1e3, statistics.median(local) * 1e3
    direct_ms = statistics.median(direct) * 1e3
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "model": "tiny llama (mii.testing.tiny_model)", "engine_served": engine,
        "request": {"prompt": PROMPT, **PARAMS},
        "startup_s": [round(t, 2) for t in startup],
        "startup_s_median": round(statistics.median(startup), 2),
        "served_ms_p50": round(served_ms, 2),
        "served_ms_p99": round(_p99(served) * 1e3, 2),
        "direct_to_replica_ms_p50": round(direct_ms, 2),
        "direct_to_replica_ms_p99": round(_p99(direct) * 1e3, 2),
        "load_balancer_hop_ms_p50": round(served_ms - direct_ms, 3),
        "load_balancer_hop_ms_p99": round((_p99(served) - _p99(direct)) * 1e3, 3),
        "in_process_ms_p50": round(local_ms, 2),
        "overhead_ms_p50": round(served_ms - local_ms, 2),
        "served_over_in_process": round(served_ms / local_ms, 3),
        "requests": args.requests, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"| serve() -> first reply (median of {args.runs}) | {result['startup_s_median']} s |")
    print(f"| request p50 through mii ({engine}) | {served_ms:.2f} ms |")
    print(f"| request p50 straight to the replica | {direct_ms:.2f} ms |")
    print(f"| load-balancer hop p50 | {served_ms - direct_ms:.3f} ms |")
    print(f"| request p50 in-process engine loop | {local_ms:.2f} ms |")
    print(f"| ratio served / in-process | {result['served_over_in_process']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
