"""Replicas behind the load balancer: routing, healing, composition with tensor parallelism."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import pytest
from conftest import deployed, wait_until

import mii
from mii.errors import DeploymentUnavailable
from mii_core.deploy import registry

GREEDY = dict(do_sample=False, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tiny_model):
    with deployed(tiny_model, "pair", engine="transformers", replica_num=2,
                  max_restarts=3) as client:
        yield client


def replica_pids(client) -> dict:
    return {r["index"]: r["pid"] for r in client.info()["replicas"]}




def both_healthy(client) -> bool:
    try:
        return all(r["healthy"] for r in client.info()["replicas"])
    except DeploymentUnavailable:
        return False


def test_exact_round_robin_for_4_and_100_requests(pair):
    first = [pair("DeepSpeed is", **GREEDY)[0].replica for _ in range(4)]
    assert first in ([0, 1, 0, 1], [1, 0, 1, 0])
    hundred = [pair("Seattle is", **GREEDY)[0].replica for _ in range(100)]
    assert all(a != b for a, b in zip(hundred, hundred[1:]))
    assert Counter(hundred) == {0: 50, 1: 50}


def test_balanced_under_concurrent_clients(pair):
    async def burst():
        return await asyncio.gather(*(pair.agenerate("DeepSpeed is", **GREEDY)
                                      for _ in range(40)))

    replies = asyncio.run(burst())
    assert Counter(r[0].replica for r in replies) == {0: 20, 1: 20}
    assert len({r[0].generated_text for r in replies}) == 1  # same greedy text everywhere


def test_round_robin_exact_with_concurrent_threads(pair):
    seen = []
    lock = threading.Lock()

    def worker():
        for _ in range(10):
            replica = pair("Computers", **GREEDY)[0].replica
            with lock:
                seen.append(replica)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(seen) == {0: 20, 1: 20}


def test_streaming_through_the_load_balancer(pair):
    unary = pair("DeepSpeed is", **GREEDY)[0]
    chunks = list(pair.stream("DeepSpeed is", **GREEDY))
    assert "".join(c.generated_text for c in chunks) == unary.generated_text
    assert len({c.replica for c in chunks}) == 1


def test_stats_show_routing(pair):
    before = {r["index"]: r["routed"] for r in pair.info()["replicas"]}
    for _ in range(6):
        pair("x", **GREEDY)
    after = {r["index"]: r["routed"] for r in pair.info()["replicas"]}
    assert after[0] - before[0] == 3 and after[1] - before[1] == 3
    assert all("stats" in r and r["stats"]["requests"] > 0 for r in pair.info()["replicas"])


def test_killed_replica_is_healed_and_the_other_loses_nothing(pair):
    assert wait_until(lambda: both_healthy(pair))
    pids = replica_pids(pair)
    long_params = dict(do_sample=False, max_new_tokens=480, max_length=512, ignore_eos=True)
    survivor_results = []

    def survivor_request():  # lands on one replica; the stream below on the other
        survivor_results.append(pair("Seattle is", **long_params)[0])

    thread = threading.Thread(target=survivor_request)
    thread.start()
    time.sleep(0.1)
    stream = pair.stream("DeepSpeed is", **long_params)
    victim = next(stream).replica
    os.kill(pids[victim], signal.SIGKILL)
    with pytest.raises(DeploymentUnavailable):
        for _ in stream:
            pass
    thread.join(timeout=60)
    assert survivor_results and survivor_results[0].generated_length == 480
    assert survivor_results[0].replica != victim
    # While the victim restarts, the load balancer routes around it.
    assert wait_until(lambda: not all(r["healthy"] for r in pair.info()["replicas"]), 5)
    routed = {pair("ok", **GREEDY)[0].replica for _ in range(4)}
    assert victim not in routed or both_healthy(pair)
    assert wait_until(lambda: both_healthy(pair) and replica_pids(pair)[victim] != pids[victim])
    assert sorted(pair("ok", **GREEDY)[0].replica for _ in range(2)) == [0, 1]
    log = open(registry.load("pair").log_path).read()
    assert f"replica-{victim} exited with status -9 (killed by SIGKILL); restart 1 of 3" in log


def test_least_outstanding_routes_to_the_idle_replica(tiny_model):
    with deployed(tiny_model, "least", engine="transformers", replica_num=2,
                  scheduler="least_outstanding") as client:
        stream = client.stream("DeepSpeed is", max_new_tokens=300, max_length=400,
                               ignore_eos=True)
        busy = next(stream).replica
        assert {client("x", **GREEDY)[0].replica for _ in range(5)} == {1 - busy}
        stream.close()
        assert client.info()["scheduler"] == "least_outstanding"


def test_two_replicas_of_tensor_parallel_two(tiny_model):
    """2 x 2 = four gloo ranks on CPU; both replicas give the same greedy text."""
    with deployed(tiny_model, "two-by-two", engine="deepspeed", replica_num=2,
                  tensor_parallel=2) as client:
        record = registry.load("two-by-two")
        replies = [client("DeepSpeed is", **GREEDY)[0] for _ in range(4)]
        assert [r.replica for r in replies] in ([0, 1, 0, 1], [1, 0, 1, 0])
        assert len({r.generated_text for r in replies}) == 1
        assert len({r.dist_port for r in record.replicas}) == 2  # separate rendezvous
    assert not [p for p in record.pids.values() if registry.pid_alive(p)]
