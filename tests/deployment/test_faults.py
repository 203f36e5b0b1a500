"""Faults: documented behaviour for each process of a deployment dying, and for signals.

(A full queue is in test_lifecycle.py, where the hook plugin holds the engine loop so that
the queue fills for certain.)"""
from __future__ import annotations

import os
import signal

import pytest
from conftest import GREEDY, LogWatch, kill_deployment, ours_listening, serve, wait_until

import mii
from mii.errors import DeploymentNotFoundError
from mii_core.deploy import registry


def pids_of(name: str) -> dict:
    """The recorded pids of deployment ``name`` ({} while there is no readable record)."""
    record = registry.load(name)
    return record.pids if record is not None else {}


def test_killed_load_balancer_is_restarted_on_the_same_port_and_sigint_stops_all(tiny_model):
    client = serve(tiny_model, deployment_name="lb-kill", engine="transformers")
    try:
        record = registry.load("lb-kill")
        log = LogWatch("lb-kill")
        old = record.pids["load-balancer"]
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: pids_of("lb-kill").get("load-balancer") not in (None, old))
        assert wait_until(client.is_serving)
        new = registry.load("lb-kill").pids["load-balancer"]
        assert ours_listening(record.port) == [new]
        assert client("DeepSpeed is", max_new_tokens=3, **GREEDY)[0].generated_length == 3
        assert "load-balancer exited with status -9 (killed by SIGKILL); restart 1 of 3" in \
            log.text()
        # SIGINT to the supervisor (not to a caller: see test_deployment) stops everything.
        pids = [*registry.load("lb-kill").pids.values(), record.supervisor_pid]
        os.kill(record.supervisor_pid, signal.SIGINT)
        assert wait_until(lambda: not any(registry.pid_alive(p) for p in pids), 60)
        assert "deployment lb-kill stopped (interrupted)" in log.text()
        assert registry.load("lb-kill") is None
        assert not ours_listening(record.port)
        assert not client.is_serving()
    finally:
        kill_deployment("lb-kill")


def test_killed_supervisor_takes_every_child_down(tiny_model):
    """No orphans: children watch the supervisor and exit; the registry stops listing it."""
    client = serve(tiny_model, deployment_name="sup-kill", engine="transformers", replica_num=2)
    record = registry.load("sup-kill")
    children = list(record.pids.values())
    os.kill(record.supervisor_pid, signal.SIGKILL)
    assert wait_until(lambda: not any(registry.pid_alive(p) for p in children), 15)
    with pytest.raises(DeploymentNotFoundError):
        mii.client("sup-kill")
    assert registry.load("sup-kill") is None  # the stale record was cleaned
    assert not client.is_serving()


@pytest.mark.parametrize("max_restarts", [0, 1])
def test_replica_that_keeps_crashing_stops_the_deployment(tiny_model, max_restarts):
    name = f"crashy-{max_restarts}"
    client = serve(tiny_model, deployment_name=name, engine="transformers",
                   max_restarts=max_restarts)
    try:
        record = registry.load(name)
        log = LogWatch(name)
        for _ in range(max_restarts):
            pid = registry.load(name).pids["replica-0"]
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: pids_of(name).get("replica-0") not in (None, pid)
                              and client.is_serving(), 60)
        last = registry.load(name).pids
        os.kill(last["replica-0"], signal.SIGKILL)
        assert wait_until(lambda: not registry.supervisor_alive(record), 60)
        text = log.text()
        assert f"replica-0 exited with status -9 (killed by SIGKILL); no restarts left " \
               f"(max_restarts={max_restarts})" in text
        assert text.count("; restart ") == max_restarts
        assert f"deployment {name} stopped (failed)" in text
        assert not any(registry.pid_alive(p) for p in [*record.pids.values(), *last.values()])
        failed = registry.load(name)  # kept, saying why, until something looks it up
        assert failed.state == "failed" and "no restarts left" in failed.error
        with pytest.raises(DeploymentNotFoundError):
            mii.client(name)
        assert registry.load(name) is None
    finally:
        kill_deployment(name)
