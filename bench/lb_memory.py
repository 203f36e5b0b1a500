"""RSS of the gRPC load balancer per call, by kind of call (not a test).

The load balancer (``LoadBalancerServicer`` served by ``run_server``, as a deployment
runs it) is a child process of its own, so that its RSS is its alone; the fake replicas
and the clients run in this process. For each pattern: ``--warmup`` calls, then
``--rounds`` rounds of ``--calls`` calls (``--concurrency`` at a time; long streams make
``SHARE`` of that), the load balancer's RSS read after each round, after
``gc.collect()`` and ``malloc_trim(0)`` (memory that the allocator holds free is given
back first, so what grows is what is still allocated, not fragmentation). Reported:
bytes per call, as the slope over the rounds (``python_bytes_per_call``: the same of
what tracemalloc traces, with ``LB_MEMORY_TRACEMALLOC=1``); the load balancer's CPU
time per call over the rounds (divide by ``messages_per_call`` for a message's); and its
thread count at the end (threads must not pile up). ``LB_MEMORY_PIECE_INTERVAL_S``
spaces an abandoned stream's pieces (0.001 s).

Patterns:
- ``unary``: a unary call served at once;
- ``stream``: a stream of ``STREAM_PIECES`` pieces read to its end;
- ``long_stream``: a stream of ``ABANDONED_PIECES`` pieces sent at once, read to its end
  (what the load balancer costs per message);
- ``abandon``: a stream of pieces sent every millisecond, abandoned by its client after
  the first (the soak's "cancel" client; replies are in flight when it leaves);
- ``cancel_unary``: a unary call the replica holds, cancelled by its client once the
  replica has it;
- ``deadline``: a unary call the replica holds past the client's deadline.

    python bench/lb_memory.py [--patterns abandon unary ...] [--calls 4000] [--rounds 4]
                              [--out bench/results/lb_memory.json]
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii_core.deploy.ports import free_port
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

STREAM_PIECES = 8
ABANDONED_PIECES = 200  # more than any client reads: the stream is always cut short
PIECE_INTERVAL_S = float(os.environ.get("LB_MEMORY_PIECE_INTERVAL_S", "0.001"))
HOLD_S = 30.0  # how long a held call waits at the replica (the client leaves first)
PATTERNS = ("unary", "stream", "long_stream", "abandon", "cancel_unary", "deadline")
# Replies a call of each pattern gets (to give the CPU per message) and the share of
# ``--calls`` it makes (a long stream costs as much as ~25 short ones).
MESSAGES = {"stream": STREAM_PIECES + 1, "long_stream": ABANDONED_PIECES + 1}
SHARE = {"long_stream": 1 / 25}


class FakeReplica(mii_pb2_grpc.MIIServiceServicer, health_pb2_grpc.HealthServicer):
    """A replica whose behaviour the prompt picks: "hold" waits ``HOLD_S`` (unary),
    "long" streams ``ABANDONED_PIECES`` pieces a millisecond apart, anything else
    answers at once (``STREAM_PIECES`` pieces for a stream). ``entered`` counts held
    calls that arrived, ``cancelled`` the calls whose client (the load balancer) left."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.entered = 0
        self.cancelled = 0
        self.server = grpc.aio.server()
        mii_pb2_grpc.add_MIIServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def _reply(self, finish_reason: str = "") -> mii_pb2.GenerateReply:
        return mii_pb2.GenerateReply(replica=self.index, completions=[
            mii_pb2.Completion(text="text " * 4, finish_reason=finish_reason)])

    async def Generate(self, request, context):
        if request.prompts[0] == "hold":
            self.entered += 1
            try:
                await asyncio.sleep(HOLD_S)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return self._reply("length")

    async def GenerateStream(self, request, context):
        long = request.prompts[0] == "long"
        finished = False
        try:
            for piece in range(ABANDONED_PIECES if long or request.prompts[0] == "many"
                               else STREAM_PIECES):
                yield self._reply()
                if long:
                    await asyncio.sleep(PIECE_INTERVAL_S)
            yield self._reply("length")
            finished = True
        finally:  # cancelled at an await, or closed at a yield (GeneratorExit)
            self.cancelled += not finished

    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


# --- the load balancer's process ---------------------------------------------------------

def _measure() -> Dict[str, int]:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    return {"rss": rss, "threads": threading.active_count(), "cpu_s": time.process_time(),
            "traced": traced}


def _answer_measurements() -> None:
    """Each line on stdin asks for a measurement: one JSON line on stdout answers."""
    for _ in sys.stdin:
        print(json.dumps(_measure()), flush=True)


def serve_load_balancer(port: int, replicas: List[str]) -> None:
    """The load balancer on ``port`` in front of ``replicas`` (every one healthy: no
    probes, whose calls would be counted with the measured ones)."""
    from mii_core.routing.schedulers.round_robin import RoundRobinScheduler
    from mii_transport.grpc.load_balancer import LoadBalancerServicer
    from mii_transport.grpc.server import run_server

    if os.environ.get("LB_MEMORY_TRACEMALLOC"):
        tracemalloc.start()

    async def main() -> None:
        stop = asyncio.Event()
        servicer = LoadBalancerServicer(replicas, RoundRobinScheduler(len(replicas)), {},
                                        on_terminate=stop.set)
        for index in range(len(replicas)):
            servicer.router.set_health(index, True)
        threading.Thread(target=_answer_measurements, daemon=True).start()
        try:
            await run_server(servicer, f"127.0.0.1:{port}", stop,
                             on_started=lambda: print("ready", flush=True))
        finally:
            await servicer.close()

    asyncio.run(main())


# --- this process: replicas and clients ----------------------------------------------------

class LoadBalancerProcess:
    """The load balancer's child process, and its measurements."""

    def __init__(self, replicas: List[str]) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.lb_memory", "--serve-load-balancer", str(self.port),
             *replicas], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        assert self.process.stdout.readline().strip() == "ready"

    def measure(self) -> Dict[str, int]:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the replica never saw the call")
        await asyncio.sleep(0.001)


def _request(prompt: str) -> mii_pb2.GenerateRequest:
    return mii_pb2.GenerateRequest(prompts=[prompt])


async def one_call(stub: mii_pb2_grpc.MIIServiceStub, pattern: str,
                   replicas: List[FakeReplica]) -> None:
    """One call of ``pattern`` through the load balancer."""
    if pattern == "unary":
        await stub.Generate(_request("x"))
    elif pattern == "stream":
        async for _ in stub.GenerateStream(_request("x")):
            pass
    elif pattern == "long_stream":
        async for _ in stub.GenerateStream(_request("many")):
            pass
    elif pattern == "abandon":
        call = stub.GenerateStream(_request("long"))
        await call.read()
        call.cancel()
    elif pattern == "cancel_unary":
        entered = sum(r.entered for r in replicas)
        call = stub.Generate(_request("hold"))
        await _until(lambda: sum(r.entered for r in replicas) > entered)
        call.cancel()
    elif pattern == "deadline":
        try:
            await stub.Generate(_request("hold"), timeout=0.02)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    else:
        raise ValueError(f"unknown pattern {pattern!r}")


async def calls(stub, pattern: str, replicas: List[FakeReplica], count: int,
                concurrency: int) -> None:
    """``count`` calls of ``pattern``, ``concurrency`` at a time (for cancel_unary one at
    a time: each waits until some replica saw one more held call)."""
    if pattern == "cancel_unary":
        concurrency = 1
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one_call(stub, pattern, replicas)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _slope(xs: List[float], ys: List[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
            / sum((x - mean_x) ** 2 for x in xs))


async def run(patterns: List[str], warmup: int, calls_per_round: int, rounds: int,
              concurrency: int) -> Dict[str, Dict]:
    """Each pattern against a fresh load balancer process; its report per pattern."""
    report = {}
    for pattern in patterns:
        count = max(1, round(calls_per_round * SHARE.get(pattern, 1.0)))
        replicas = [FakeReplica(0), FakeReplica(1)]
        for replica in replicas:
            await replica.server.start()
        lb = LoadBalancerProcess([r.address for r in replicas])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{lb.port}") as channel:
                stub = mii_pb2_grpc.MIIServiceStub(channel)
                started = time.monotonic()
                await calls(stub, pattern, replicas,
                            max(1, round(warmup * SHARE.get(pattern, 1.0))), concurrency)
                await asyncio.sleep(0.5)  # cancelled calls finish at the replicas
                samples = [lb.measure()]
                for _ in range(rounds):
                    await calls(stub, pattern, replicas, count, concurrency)
                    await asyncio.sleep(0.5)
                    samples.append(lb.measure())
            done = [count * i for i in range(rounds + 1)]
            rss = [s["rss"] for s in samples]
            report[pattern] = {
                "calls_measured": count * rounds,
                "bytes_per_call": round(_slope(done, rss), 1),
                "rss_mb": [round(r / 2**20, 2) for r in rss],
                "python_bytes_per_call": round(_slope(done, [s["traced"] for s in samples]), 1),
                "threads_end": samples[-1]["threads"],
                "cpu_us_per_call": round(1e6 * (samples[-1]["cpu_s"] - samples[0]["cpu_s"])
                                         / (count * rounds), 1),
                "messages_per_call": MESSAGES.get(pattern, 1),
                "replica_saw_cancel": sum(r.cancelled for r in replicas),
                "seconds": round(time.monotonic() - started, 1)}
            print(pattern, json.dumps(report[pattern]), flush=True)
        finally:
            lb.stop()
            for replica in replicas:
                await replica.server.stop(None)
    return report


def main() -> int:
    """CLI entry (``--serve-load-balancer PORT ADDRESS...`` is the child's)."""
    if sys.argv[1:2] == ["--serve-load-balancer"]:
        serve_load_balancer(int(sys.argv[2]), sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=4000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    args = parser.parse_args()
    report = asyncio.run(run(args.patterns, args.warmup, args.calls, args.rounds,
                             args.concurrency))
    result = {"grpcio": grpc.__version__, "warmup": args.warmup, "calls_per_round": args.calls,
              "rounds": args.rounds, "concurrency": args.concurrency,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "patterns": report}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
