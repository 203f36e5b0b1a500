"""Soak: N concurrent clients for T minutes against a deployment of the tiny model.

Each client loops over a mix of unary, streaming and deliberately cancelled
(abandoned) streaming requests. With ``--kill-every S`` a replica (each in turn) is
SIGKILLed every S seconds and restarted by the supervisor. Reported: requests, errors
by type (and how many came within ``KILL_WINDOW_S`` of a kill: a stream that had sent
output when its replica died cannot be retried), lost (a request with neither a reply
nor an error: must be 0), p50/p99 latency, and the RSS of every process of the
deployment, sampled every few seconds: each process's growth from its first sample
after ``--warmup`` seconds of its life to its last sample (a restarted replica is a
new process, measured on its own), flagged over ``--rss-tolerance`` percent.

    python bench/soak.py [--clients 32] [--minutes 10] [--replicas 2] [--kill-every 120]
                         [--warmup 60] [--rss-tolerance 5] [--out bench/results/soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import psutil

import mii
from mii.errors import DeploymentUnavailable
from mii.testing.tiny_model import ensure_tiny_model
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port

PROMPTS = ["DeepSpeed is", "Seattle is", "The weather today", "Computers can", "The sea"]
SAMPLE_EVERY_S = 5.0
FINISHED = ("length", "stop")
KILL_WINDOW_S = 10.0  # an error this soon after a kill is counted as caused by it


def deployment_rss(name: str) -> Dict[Tuple[str, int], int]:
    """(role, pid) -> resident memory (bytes) of every process of deployment ``name``
    (a child's with its own children, the supervisor's alone); processes that are gone,
    or killed and not yet reaped, are left out."""
    record = registry.load(name)
    if record is None:
        return {}
    rss = {}
    for role, pid in [("supervisor", record.supervisor_pid), *record.pids.items()]:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            children = process.children(recursive=True) if role != "supervisor" else []
            rss[(role, pid)] = process.memory_info().rss + sum(
                c.memory_info().rss for c in children)
        except psutil.Error:
            continue
    return rss


class RssSampler(threading.Thread):
    """Samples ``deployment_rss`` every SAMPLE_EVERY_S until ``stop`` is set."""

    def __init__(self, name: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.name_ = name
        self.stop = stop
        self.samples: Dict[Tuple[str, int], List[Tuple[float, int]]] = {}

    def run(self) -> None:
        while True:
            now = time.monotonic()
            for key, rss in deployment_rss(self.name_).items():
                self.samples.setdefault(key, []).append((now, rss))
            if self.stop.wait(SAMPLE_EVERY_S):
                return

    def growth(self, warmup: float) -> Dict[str, Dict[str, float]]:
        """"role (pid N)" -> MB after warm-up, MB at the end, growth in percent; for
        each process that lived past ``warmup`` seconds from its first sample and was
        sampled again after that."""
        report = {}
        for (role, pid), samples in self.samples.items():
            after = [rss for t, rss in samples if t - samples[0][0] >= warmup]
            if len(after) < 2:
                continue
            report[f"{role} (pid {pid})"] = {
                "mb_after_warmup": round(after[0] / 2**20, 1),
                "mb_end": round(after[-1] / 2**20, 1),
                "growth_percent": round(100.0 * (after[-1] - after[0]) / after[0], 1)}
        return report


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
                outcome = "ok" if replies and replies[0].finish_reason in FINISHED else outcome
            elif kind == "stream":
                chunks = list(client.stream(prompt, **params))
                outcome = "ok" if chunks and chunks[-1].finish_reason in FINISHED else outcome
            else:
                stream = client.stream(prompt, max_new_tokens=200, ignore_eos=True)
                next(stream)
                stream.close()  # abandon: the server must cancel and free the slot
                outcome = "cancelled"
        except Exception as error:  # counted, never hidden
            outcome = "error"
            with lock:
                tally["error_samples"].append(f"{type(error).__name__}: {error}"[:200])
                tally["error_events"].append((time.monotonic(), type(error).__name__))
        latency = time.perf_counter() - started
        with lock:
            tally["sent"] += 1
            tally[outcome] += 1
            if outcome == "ok":
                tally["latencies"].append(latency)


def _kill_replicas(name: str, replicas: int, every: float, stop_at: float,
                   kills: List[Tuple[float, str, int]]) -> None:
    """SIGKILL replica 0, 1, ... in turn every ``every`` seconds until ``stop_at``."""
    turn = 0
    while time.time() + every < stop_at:
        time.sleep(every)
        record = registry.load(name)
        role = f"replica-{turn % replicas}"
        pid = record.pids.get(role) if record is not None else None
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append((time.monotonic(), role, pid))
        turn += 1


def soak(model: str, clients: int, seconds: float, replicas: int = 2, kill_every: float = 0.0,
         warmup: float = 60.0, rss_tolerance: float = 5.0) -> dict:
    """Run the soak and return its report (the deployment is always terminated).
    ``kill_every`` > 0 kills a replica that often; RSS growth is measured per process
    from ``warmup`` seconds into its life (the first samples are left out)."""
    name = f"soak-{os.getpid()}"
    planned_kills = int(seconds // kill_every) if kill_every > 0 else 0
    client = mii.serve(model, deployment_name=name, port_number=free_port(),
                       engine="transformers", replica_num=replicas,
                       max_restarts=max(3, planned_kills // replicas + 2))
    stop = threading.Event()
    sampler = RssSampler(name, stop)
    kills: List[Tuple[float, str, int]] = []
    try:
        for prompt in PROMPTS:
            client(prompt, max_new_tokens=8)
        tally = {"sent": 0, "ok": 0, "error": 0, "cancelled": 0, "lost": 0, "latencies": [],
                 "error_samples": [], "error_events": []}
        lock = threading.Lock()
        stop_at = time.time() + seconds
        threads = [threading.Thread(target=_client_loop, args=(client, seed, stop_at, tally, lock))
                   for seed in range(clients)]
        if kill_every > 0:
            threads.append(threading.Thread(target=_kill_replicas, daemon=True,
                                            args=(name, replicas, kill_every, stop_at, kills)))
        started = time.monotonic()
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads[:clients]:
            thread.join(timeout=seconds + 120)
        hung = sum(thread.is_alive() for thread in threads[:clients])
        time.sleep(1.0)  # let cancelled generations drain before the last memory sample
        stop.set()
        sampler.join()
        stats = client.info()
    finally:
        stop.set()
        client.terminate_server()
    latencies = sorted(tally.pop("latencies"))
    errors = tally.pop("error_events")
    after_kill = [kind for t, kind in errors
                  if any(0 <= t - killed <= KILL_WINDOW_S for killed, _, _ in kills)]
    growth = sampler.growth(warmup)
    return {
        "clients": clients, "seconds": seconds, "replicas": replicas,
        "requests": tally["sent"], "ok": tally["ok"], "errors": tally["error"],
        "cancelled": tally["cancelled"], "lost": tally["lost"] + hung,
        "errors_by_type": dict(Counter(kind for _, kind in errors)),
        "errors_within_kill_window": len(after_kill),
        "errors_unexplained": len(errors) - sum(
            1 for kind in after_kill if kind == DeploymentUnavailable.__name__),
        "kills": [f"{role} (pid {pid}) at {round(t - started)} s" for t, role, pid in kills],
        "error_samples": tally["error_samples"][:5],
        "p50_ms": round(statistics.median(latencies) * 1e3, 1) if latencies else None,
        "p99_ms": (round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 1)
                   if latencies else None),
        "rss_warmup_s": warmup,
        "rss": growth,
        "rss_growth_flagged": sorted(p for p, g in growth.items()
                                     if abs(g["growth_percent"]) > rss_tolerance),
        "server_cancelled": sum(r.get("stats", {}).get("cancelled", 0)
                                for r in stats["replicas"]),
    }


def main() -> int:
    """CLI entry: run, print and write JSON; exit 1 if anything was lost, an error is not
    explained by a kill, or a process's RSS grew past the tolerance."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=0.0,
                        help="seconds between replica kills (0: none)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of each process's life left out of its RSS growth")
    parser.add_argument("--rss-tolerance", type=float, default=5.0,
                        help="percent of RSS growth after warm-up that is flagged")
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    os.environ.setdefault("MII_QUIET", "1")
    report = soak(str(ensure_tiny_model()), args.clients, args.minutes * 60, args.replicas,
                  args.kill_every, args.warmup, args.rss_tolerance)
    report["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    healthy = (report["lost"] == 0 and report["errors_unexplained"] == 0
               and not report["rss_growth_flagged"])
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
