"""Replicas behind the load balancer: routing, healing, composition with tensor parallelism.

Routing counts are exact unless the load balancer logged a missed health check in the
meantime (a replica's 1 s health check can time out on a loaded machine, and routing
then rightly skips that replica): ``assert_routed`` checks the weaker invariant then.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import Hooks, LogWatch, deployed, queue_depth, wait_until

from mii.errors import DeploymentUnavailable
from mii_core.deploy import registry

GREEDY = dict(do_sample=False, max_new_tokens=8, ignore_eos=True)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def split_model(tiny_model, tmp_path_factory):
    """The tiny model with its tokenizer in a directory of its own: (weights, tokenizer);
    the weights directory has no tokenizer, so serving it needs ``tokenizer=``."""
    root = tmp_path_factory.mktemp("split")
    weights, tokenizer = root / "weights", root / "tokenizer"
    weights.mkdir()
    tokenizer.mkdir()
    for name in os.listdir(tiny_model):
        target = tokenizer if name in TOKENIZER_FILES else weights
        (target / name).symlink_to(Path(tiny_model) / name)
    return str(weights), str(tokenizer)


@pytest.fixture(scope="module")
def pair(split_model, tmp_path_factory):
    """(client, hooks) of two replicas of the split tiny model, with the test hook plugin."""
    weights, tokenizer = split_model
    hooks = Hooks(tmp_path_factory.mktemp("pair-hooks"))
    with deployed(weights, "pair", hooks=hooks, tokenizer=tokenizer, engine="transformers",
                  replica_num=2, max_restarts=3) as client:
        yield client, hooks


def replica_pids(client) -> dict:
    return {r["index"]: r["pid"] for r in client.info()["replicas"]}


def both_healthy(client) -> bool:
    try:
        return all(r["healthy"] for r in client.info()["replicas"])
    except DeploymentUnavailable:
        return False


def assert_routed(log: LogWatch, replicas, expected: dict) -> None:
    """``replicas`` (one per request) are ``expected`` exactly, unless a health check was
    missed meanwhile: then every request was still served by one of the replicas."""
    counted = Counter(replicas)
    if log.health_missed():
        assert sum(counted.values()) == sum(expected.values()) and set(counted) <= set(expected)
    else:
        assert counted == expected, log.text()[-2000:]


def test_the_given_tokenizer_is_loaded_by_every_replica(pair, split_model):
    from transformers import AutoTokenizer

    client, hooks = pair
    weights, tokenizer = split_model
    assert sorted(e["replica"] for e in hooks.events("engine_loaded", tokenizer=tokenizer)) == \
        [0, 1]
    ids = AutoTokenizer.from_pretrained(tokenizer)("DeepSpeed is")["input_ids"]
    assert {client("DeepSpeed is", **GREEDY)[0].prompt_length for _ in range(2)} == {len(ids)}
    assert registry.load("pair").mii_config.model_conf.tokenizer == tokenizer


def test_exact_round_robin_for_4_and_100_requests(pair):
    client, hooks = pair
    assert wait_until(lambda: both_healthy(client))
    log = LogWatch("pair")
    first = [client("DeepSpeed is", **GREEDY)[0].replica for _ in range(4)]
    hundred = [client("Seattle is", **GREEDY)[0].replica for _ in range(100)]
    if not log.health_missed():
        assert first in ([0, 1, 0, 1], [1, 0, 1, 0])
        assert all(a != b for a, b in zip(hundred, hundred[1:]))
    assert_routed(log, hundred, {0: 50, 1: 50})


def test_balanced_under_concurrent_clients(pair):
    client, hooks = pair
    assert wait_until(lambda: both_healthy(client))
    log = LogWatch("pair")

    async def burst():
        return await asyncio.gather(*(client.agenerate("DeepSpeed is", **GREEDY)
                                      for _ in range(40)))

    replies = asyncio.run(burst())
    assert_routed(log, [r[0].replica for r in replies], {0: 20, 1: 20})
    assert len({r[0].generated_text for r in replies}) == 1  # same greedy text everywhere


def test_round_robin_exact_with_concurrent_threads(pair):
    client, hooks = pair
    assert wait_until(lambda: both_healthy(client))
    log = LogWatch("pair")
    seen = []
    lock = threading.Lock()

    def worker():
        for _ in range(10):
            replica = client("Computers", **GREEDY)[0].replica
            with lock:
                seen.append(replica)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_routed(log, seen, {0: 20, 1: 20})


def test_streaming_through_the_load_balancer(pair):
    client, hooks = pair
    unary = client("DeepSpeed is", **GREEDY)[0]
    chunks = list(client.stream("DeepSpeed is", **GREEDY))
    assert "".join(c.generated_text for c in chunks) == unary.generated_text
    assert len({c.replica for c in chunks}) == 1


def test_stats_show_routing(pair):
    client, hooks = pair
    assert wait_until(lambda: both_healthy(client))
    log = LogWatch("pair")
    before = {r["index"]: r["routed"] for r in client.info()["replicas"]}
    for _ in range(6):
        client("x", **GREEDY)
    after = {r["index"]: r["routed"] for r in client.info()["replicas"]}
    routed = [index for index in after for _ in range(after[index] - before[index])]
    assert_routed(log, routed, {0: 3, 1: 3})
    assert all("stats" in r and r["stats"]["requests"] > 0 for r in client.info()["replicas"])


def test_killed_replica_is_healed_and_the_other_loses_nothing(pair):
    client, hooks = pair
    assert wait_until(lambda: both_healthy(client))
    pids = replica_pids(client)
    long_params = dict(do_sample=False, max_new_tokens=480, max_length=512, ignore_eos=True)
    survivor_results = []

    def routed() -> int:
        return sum(r["routed"] for r in client.info()["replicas"])

    def survivor_request():  # lands on one replica; the stream below on the other
        survivor_results.append(client("Seattle is", **long_params)[0])

    before = routed()
    thread = threading.Thread(target=survivor_request)
    thread.start()
    assert wait_until(lambda: routed() == before + 1)  # picked: the stream is routed next
    stream = client.stream("DeepSpeed is", **long_params)
    victim = next(stream).replica
    survivor = 1 - victim
    hooks.hold_loading()  # the restarted victim waits before serving, until released below
    held = len(hooks.events("loading_held"))
    os.kill(pids[victim], signal.SIGKILL)
    with pytest.raises(DeploymentUnavailable):
        for _ in stream:
            pass
    thread.join(timeout=120)
    assert survivor_results and survivor_results[0].generated_length == 480
    assert survivor_results[0].replica == survivor
    # While the victim restarts, the load balancer routes around it: all to the survivor.
    assert wait_until(lambda: not client.info()["replicas"][victim]["healthy"])
    assert [client("ok", **GREEDY)[0].replica for _ in range(4)] == [survivor] * 4
    assert wait_until(lambda: len(hooks.events("loading_held")) > held, 60)
    assert not client.info()["replicas"][victim]["healthy"]  # loaded, but held back
    hooks.release_loading()
    assert wait_until(lambda: both_healthy(client) and replica_pids(client)[victim] != pids[victim],
                      60)
    log = LogWatch("pair")
    assert_routed(log, [client("ok", **GREEDY)[0].replica for _ in range(2)], {0: 1, 1: 1})
    text = open(registry.load("pair").log_path).read()
    assert f"replica-{victim} exited with status -9 (killed by SIGKILL); restart 1 of 3" in text


def test_least_outstanding_routes_away_from_the_busy_replica(tiny_model, hooks):
    """The busy replica's engine loop is held, so its request stays outstanding for sure."""
    with deployed(tiny_model, "least", hooks=hooks, engine="transformers", replica_num=2,
                  scheduler="least_outstanding") as client:
        assert client.info()["scheduler"] == "least_outstanding"
        assert wait_until(lambda: both_healthy(client))
        with hooks.held(client) as busy:
            waiting = []
            for _ in range(4):  # until one lands on the held replica (ties: lowest index)
                box = []
                thread = threading.Thread(
                    target=lambda box=box: box.append(client("stuck", **GREEDY)[0]))
                thread.start()
                waiting.append((thread, box))
                if wait_until(lambda: queue_depth(client, busy) == 1 or not thread.is_alive()) \
                        and thread.is_alive():
                    break
            assert queue_depth(client, busy) == 1
            assert {client("x", **GREEDY)[0].replica for _ in range(5)} == {1 - busy}
        for thread, box in waiting:
            thread.join(60)
            assert box and box[0].generated_length == 8
        assert box[0].replica == busy


def test_two_replicas_of_tensor_parallel_two(tiny_model):
    """2 x 2 = four gloo ranks on CPU; both replicas give the same greedy text."""
    with deployed(tiny_model, "two-by-two", engine="deepspeed", replica_num=2,
                  tensor_parallel=2) as client:
        record = registry.load("two-by-two")
        assert wait_until(lambda: both_healthy(client))
        log = LogWatch("two-by-two")
        replies = [client("DeepSpeed is", **GREEDY)[0] for _ in range(4)]
        assert_routed(log, [r.replica for r in replies], {0: 2, 1: 2})
        assert len({r.generated_text for r in replies}) == 1
        assert len({r.dist_port for r in record.replicas}) == 2  # separate rendezvous
    assert not [p for p in record.pids.values() if registry.pid_alive(p)]
