"""A deployment carrying the test hook plugin (``conftest.Hooks``): every hook fires in the
process its spec names; with the replica's engine loop held, a full queue, deadlines and
client timeouts are exact rather than races; SIGHUP stops every process, escalating to
SIGKILL for one that ignores SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from conftest import (
    GREEDY,
    REJECT_STOP,
    Hooks,
    LogWatch,
    kill_deployment,
    queue_depth,
    run_mii,
    serve,
    wait_until,
)

import mii
from mii.errors import ConfigError, DeadlineExceeded, ServerError, ServerOverloaded
from mii_core.deploy import registry

NAME = "held"
QUEUE = 4  # max_queue_size


@pytest.fixture(scope="module")
def held(tiny_model, tmp_path_factory):
    """(client, hooks) of a one-replica deployment with the hook plugin and a replica that
    starts a child ignoring SIGTERM; the last test stops it with SIGHUP."""
    hooks = Hooks(tmp_path_factory.mktemp("held-hooks"), stubborn_child=True)
    client = serve(tiny_model, hooks=hooks, deployment_name=NAME, engine="transformers",
                   max_batch_size=1, max_queue_size=QUEUE)
    try:
        yield client, hooks
    finally:
        hooks.release()
        if registry.find_live(NAME) is not None:
            try:
                client.terminate_server()
            except Exception:
                kill_deployment(NAME)
                raise


def idle(client) -> None:
    """Wait until the replica's queue is empty (what an earlier test queued has run)."""
    assert wait_until(lambda: queue_depth(client) == 0)


def in_thread(call, *args, **kwargs):
    """Run ``call`` in a thread; returns (thread, box) where box gets the result or error."""
    box = {}

    def run():
        try:
            box["result"] = call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - inspected by the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_hooks_fire_in_the_processes_their_specs_name(held):
    client, hooks = held
    record = registry.load(NAME)
    assert wait_until(lambda: hooks.events("deployment_started"))
    assert [(e["pid"], e["name"], e["state"]) for e in hooks.events("deployment_started")] == \
        [(record.supervisor_pid, NAME, "ready")]
    loaded = hooks.events("engine_loaded")
    assert [(e["pid"], e["replica"], e["rank"]) for e in loaded] == \
        [(record.pids["replica-0"], 0, 0)]
    assert loaded[0]["description"].startswith("transformers LlamaForCausalLM")

    seen = len(hooks.events())
    replies = client(["DeepSpeed is", "Seattle is a city"], max_new_tokens=3, **GREEDY)
    assert wait_until(lambda: hooks.events("request_finished")[-1:] and
                      len(hooks.events()) >= seen + 2)
    new = hooks.events()[seen:]
    assert [e["hook"] for e in new] == ["request_started", "request_finished"]
    started, finished = new
    assert started["prompts"] == 2 and started["replica"] == 0
    assert started["prompt_tokens"] == [r.prompt_length for r in replies]
    assert (finished["id"], finished["outcome"]) == (started["id"], "ok")
    assert started["pid"] == finished["pid"] == record.pids["replica-0"]

    seen = len(hooks.events())
    stream = client.stream("An abandoned stream", max_new_tokens=400, max_length=500, **GREEDY)
    next(stream)
    stream.close()
    assert wait_until(lambda: len(hooks.events()) >= seen + 2)
    started, finished = hooks.events()[seen:seen + 2]
    assert (finished["hook"], finished["id"], finished["outcome"]) == \
        ("request_finished", started["id"], "cancelled")


def test_a_raising_request_started_hook_rejects_the_request(held):
    client, hooks = held
    idle(client)
    with pytest.raises(ServerError, match="rejected by the test's mii_request_started hook"):
        client("rejected", max_new_tokens=2, stop=[REJECT_STOP], **GREEDY)
    assert queue_depth(client) == 0
    assert not hooks.events("request_finished", id=hooks.events("request_started")[-1]["id"])
    assert client("accepted", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_validate_config_hook_refuses_before_any_process(tiny_model, no_process_started):
    from mii_core.plugins.discovery import hookimpl, plugin_manager

    class Refuse:
        @hookimpl
        def mii_validate_config(self, mii_config):
            if mii_config.deployment_name == "refused":
                raise ValueError("refused by the test's hook")

    plugin_manager().register(Refuse(), name="test-refuse")
    try:
        with pytest.raises(ConfigError, match="refused by the test's hook"):
            mii.serve(tiny_model, deployment_name="refused")
    finally:
        plugin_manager().unregister(name="test-refuse")
    assert registry.load("refused") is None


def test_cli_commands_hook_adds_a_subcommand(held):
    client, hooks = held
    result = run_mii("test-hooks", "hello", env=hooks.env())
    assert (result.returncode, result.stdout) == (3, "test hooks say hello\n"), result.stderr
    assert "test-hooks" in run_mii("--help", env=hooks.env()).stdout
    assert "test-hooks" not in run_mii("--help").stdout  # the plugin is not installed there


def test_full_queue_answers_resource_exhausted(held):
    client, hooks = held
    idle(client)
    with hooks.held(client):
        waiting = [in_thread(client, ["queued a", "queued b"], max_new_tokens=3, **GREEDY)
                   for _ in range(QUEUE // 2)]
        assert wait_until(lambda: queue_depth(client) == QUEUE)
        with pytest.raises(ServerOverloaded, match=rf"queue is full \({QUEUE} prompts waiting, "
                                                   rf"max_queue_size={QUEUE}\)"):
            client("one too many", max_new_tokens=3, **GREEDY)
        assert all(thread.is_alive() for thread, _ in waiting)  # held: none could finish
    for thread, box in waiting:
        thread.join(60)
        assert [r.generated_length for r in box["result"]] == [3, 3], box
    assert client("after the flood", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_deadline_is_honoured_and_the_expired_request_is_dropped(held):
    client, hooks = held
    idle(client)
    tokens = client.info()["replicas"][0]["stats"]["tokens_generated"]
    with hooks.held(client):
        seen = len(hooks.events())
        thread, box = in_thread(client, "DeepSpeed is", max_new_tokens=400, timeout=3, **GREEDY)
        assert wait_until(lambda: queue_depth(client) == 1)  # it reached the replica
        thread.join(60)
        assert isinstance(box.get("error"), DeadlineExceeded), box
        started = hooks.events("request_started")[-1]
        assert hooks.events().index(started) >= seen
    assert wait_until(lambda: hooks.events("request_finished", id=started["id"]))
    assert hooks.events("request_finished", id=started["id"])[0]["outcome"] == "cancelled"
    # Dropped, not generated to its end (the replica may learn of the deadline a moment
    # after the loop was released, so a first token is possible: not 400 of them).
    generated = client.info()["replicas"][0]["stats"]["tokens_generated"] - tokens - 1
    assert 0 <= generated < 400
    assert client("ok", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_client_timeout_applies_to_calls_without_their_own(held):
    client, hooks = held
    idle(client)
    quick = mii.MIIClient(client.mii_config, host=client.host, port=client.port, timeout=0.5)
    with hooks.held(client):
        patient, box = in_thread(quick, "DeepSpeed is", max_new_tokens=4, timeout=600, **GREEDY)
        assert wait_until(lambda: queue_depth(client) == 1)
        with pytest.raises(DeadlineExceeded):
            quick("DeepSpeed is", max_new_tokens=4, **GREEDY)
        with pytest.raises(DeadlineExceeded):
            list(quick.stream("DeepSpeed is", max_new_tokens=4, **GREEDY))
        with pytest.raises(DeadlineExceeded):
            asyncio.run(quick.agenerate("DeepSpeed is", max_new_tokens=4, **GREEDY))
        assert patient.is_alive()  # its own timeout, not the client's 0.5 s
    patient.join(60)
    assert box["result"][0].generated_length == 4, box
    expected = client("DeepSpeed is", max_new_tokens=4, **GREEDY)[0].generated_text
    assert box["result"][0].generated_text == expected


def test_sighup_stops_every_process_escalating_to_sigkill(held):
    """Last in this module: the deployment is gone afterwards."""
    client, hooks = held
    record = registry.load(NAME)
    stubborn = [e["child"] for e in hooks.events("stubborn_child")]
    assert len(stubborn) == 1 and registry.pid_alive(stubborn[0])
    log = LogWatch(NAME)
    os.kill(record.supervisor_pid, signal.SIGHUP)
    assert wait_until(lambda: not registry.pid_alive(record.supervisor_pid), 120)
    assert not [p for p in [*record.pids.values(), *stubborn] if registry.pid_alive(p)]
    text = log.text()
    assert f"pid {stubborn[0]} ignored SIGTERM; killing it" in text
    assert f"deployment {NAME} stopped (hangup)" in text
    assert [e["reason"] for e in hooks.events("deployment_stopped")] == ["hangup"]
    assert registry.load(NAME) is None
    assert not client.is_serving()
