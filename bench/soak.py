"""Soak: N concurrent clients for T minutes against a deployment of the tiny model.

Each client loops over a mix of unary, streaming and deliberately cancelled
(abandoned) streaming requests. Reported: requests, errors, lost (a request with
neither a reply nor an error: must be 0), p50/p99 latency, and the RSS growth of
every process of the deployment between warm-up and the end (flagged over 10%).

    python bench/soak.py [--clients 32] [--minutes 10] [--replicas 2] [--out bench/results/soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict

import psutil

import mii
from mii.testing.tiny_model import ensure_tiny_model
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port

PROMPTS = ["DeepSpeed is", "Seattle is", "The weather today", "Computers can", "The sea"]


def deployment_rss(name: str) -> Dict[str, int]:
    """role -> resident memory (bytes) of every process of deployment ``name``."""
    record = registry.load(name)
    rss = {"supervisor": psutil.Process(record.supervisor_pid).memory_info().rss}
    for role, pid in record.pids.items():
        process = psutil.Process(pid)
        rss[role] = process.memory_info().rss + sum(c.memory_info().rss
                                                    for c in process.children(recursive=True))
    return rss


def _client_loop(client, seed: int, stop_at: float, tally: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.time() < stop_at:
        kind = rng.choice(("unary", "unary", "stream", "cancel"))
        prompt = rng.choice(PROMPTS)
        params = dict(max_new_tokens=rng.randint(1, 24), do_sample=rng.random() < 0.5)
        started = time.perf_counter()
        outcome = "lost"
        try:
            if kind == "unary":
                replies = client(prompt, **params)
                outcome = "ok" if replies and replies[0].finish_reason in ("length", "stop") else outcome
            elif kind == "stream":
                chunks = list(client.stream(prompt, **params))
                outcome = "ok" if chunks and chunks[-1].finish_reason in ("length", "stop") else outcome
            else:
                stream = client.stream(prompt, max_new_tokens=200, ignore_eos=True)
                next(stream)
                stream.close()  # abandon: the server must cancel and free the slot
                outcome = "cancelled"
        except Exception as error:  # counted, never hidden
            outcome = "error"
            with lock:
                tally["error_samples"].append(f"{type(error).__name__}: {error}"[:200])
        latency = time.perf_counter() - started
        with lock:
            tally["sent"] += 1
            tally[outcome] += 1
            if outcome == "ok":
                tally["latencies"].append(latency)


def soak(model: str, clients: int, seconds: float, replicas: int = 2) -> dict:
    """Run the soak and return its report (the deployment is always terminated)."""
    name = f"soak-{os.getpid()}"
    client = mii.serve(model, deployment_name=name, port_number=free_port(),
                       engine="transformers", replica_num=replicas)
    try:
        for prompt in PROMPTS:
            client(prompt, max_new_tokens=8)
        rss_before = deployment_rss(name)
        tally = {"sent": 0, "ok": 0, "error": 0, "cancelled": 0, "lost": 0, "latencies": [],
                 "error_samples": []}
        lock = threading.Lock()
        stop_at = time.time() + seconds
        threads = [threading.Thread(target=_client_loop, args=(client, seed, stop_at, tally, lock))
                   for seed in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=seconds + 120)
        hung = sum(thread.is_alive() for thread in threads)
        time.sleep(1.0)  # let cancelled generations drain before measuring memory
        rss_after = deployment_rss(name)
        stats = client.info()
    finally:
        client.terminate_server()
    latencies = sorted(tally.pop("latencies"))
    growth = {role: round(100.0 * (rss_after[role] - rss_before[role]) / rss_before[role], 1)
              for role in rss_before if role in rss_after}
    return {
        "clients": clients, "seconds": seconds, "replicas": replicas,
        "requests": tally["sent"], "ok": tally["ok"], "errors": tally["error"],
        "cancelled": tally["cancelled"], "lost": tally["lost"] + hung,
        "error_samples": tally["error_samples"][:5],
        "p50_ms": round(statistics.median(latencies) * 1e3, 1) if latencies else None,
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 1) if latencies else None,
        "rss_mb_before": {k: round(v / 2**20, 1) for k, v in rss_before.items()},
        "rss_growth_percent": growth,
        "rss_growth_flagged": sorted(role for role, pct in growth.items() if pct > 10.0),
        "server_cancelled": sum(r["stats"]["cancelled"] for r in stats["replicas"]),
    }


def main() -> int:
    """CLI entry: run, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    os.environ.setdefault("MII_QUIET", "1")
    report = soak(str(ensure_tiny_model()), args.clients, args.minutes * 60, args.replicas)
    report["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if report["lost"] == 0 and report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
