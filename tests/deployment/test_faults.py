"""Faults and overload: documented behaviour for each process of a deployment dying."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from conftest import wait_until

import mii
from mii.errors import DeploymentNotFoundError, ServerOverloaded
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port, is_port_free


def test_full_queue_answers_resource_exhausted(tiny_model):
    client = mii.serve(tiny_model, deployment_name="small-queue", port_number=free_port(),
                       engine="transformers", max_batch_size=1, max_queue_size=2)
    try:
        async def flood():
            calls = [client.agenerate("DeepSpeed is", max_new_tokens=200, ignore_eos=True)
                     for _ in range(8)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(flood())
        rejected = [r for r in results if isinstance(r, ServerOverloaded)]
        served = [r for r in results if isinstance(r, list)]
        assert rejected and served and len(rejected) + len(served) == 8
        assert "queue is full" in str(rejected[0])
        assert client("ok", max_new_tokens=2)[0].generated_length == 2
    finally:
        client.terminate_server()


def test_killed_load_balancer_is_restarted_on_the_same_port(tiny_model):
    port = free_port()
    client = mii.serve(tiny_model, deployment_name="lb-kill", port_number=port,
                       engine="transformers")
    try:
        old = registry.load("lb-kill").pids["load-balancer"]
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: registry.load("lb-kill").pids["load-balancer"] != old)
        assert wait_until(client.is_serving)
        assert client("DeepSpeed is", max_new_tokens=3)[0].generated_length == 3
    finally:
        client.terminate_server()
    assert is_port_free(port)


def test_killed_supervisor_takes_every_child_down(tiny_model):
    """No orphans: children watch the supervisor and exit; the registry stops listing it."""
    client = mii.serve(tiny_model, deployment_name="sup-kill", port_number=free_port(),
                       engine="transformers", replica_num=2)
    record = registry.load("sup-kill")
    children = list(record.pids.values())
    os.kill(record.supervisor_pid, signal.SIGKILL)
    assert wait_until(lambda: not any(registry.pid_alive(p) for p in children), 15)
    with pytest.raises(DeploymentNotFoundError):
        mii.client("sup-kill")
    assert registry.load("sup-kill") is None  # the stale record was cleaned
    assert not client.is_serving()


def test_replica_that_keeps_crashing_stops_the_deployment(tiny_model):
    client = mii.serve(tiny_model, deployment_name="crashy", port_number=free_port(),
                       engine="transformers", max_restarts=1)
    record = registry.load("crashy")
    os.kill(record.pids["replica-0"], signal.SIGKILL)
    assert wait_until(lambda: registry.load("crashy") is not None and
                      registry.load("crashy").pids["replica-0"] != record.pids["replica-0"]
                      and client.is_serving())
    os.kill(registry.load("crashy").pids["replica-0"], signal.SIGKILL)
    assert wait_until(lambda: not registry.supervisor_alive(record), 30)
    assert "no restarts left (max_restarts=1)" in open(record.log_path).read()
    assert not any(registry.pid_alive(p) for p in record.pids.values())
