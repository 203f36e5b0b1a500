"""The supervisor (``mii_core/control/supervisor.py``) in-process: its watch loop on a
virtual clock with stand-in children, and start / stop / process-tree tracking on real
(tiny, short-lived) processes. No model, no server (written from mutation testing:
tools/mutation.py; the deployment tests cover it end to end)."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mii_core.config.models import MIIConfig, ModelConfig
from mii_core.control import supervisor as sup
from mii_core.control.launcher import ChildSpec
from mii_core.deploy import registry
from mii_core.deploy.registry import DeploymentRecord, ReplicaRecord

PID_MAX = int(open("/proc/sys/kernel/pid_max").read())
SLEEPER = "import time; time.sleep(60)"


# -- stand-ins ---------------------------------------------------------------------------
class Clock:
    """``supervisor.time`` on a virtual clock: sleep() advances it (and runs callbacks)."""

    def __init__(self, real_sleep: float = 0.0) -> None:
        self.now = 1000.0
        self.sleeps = []
        self.real_sleep = real_sleep
        self.on_sleep = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        if self.now > 1100:  # a loop that should have ended long ago
            raise RuntimeError("runaway loop")
        self.sleeps.append(seconds)
        self.now += seconds
        if self.real_sleep:
            time.sleep(self.real_sleep)
        for callback in list(self.on_sleep):
            callback()


class FakeProc:
    """A child that is not a process: ``code`` is what poll() answers."""

    next_pid = PID_MAX + 100  # no process can have it

    def __init__(self, code=None) -> None:
        FakeProc.next_pid += 1
        self.pid = FakeProc.next_pid
        self.code = code

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        return self.code


class Transport:
    def __init__(self) -> None:
        self.answers = []  # is_serving answers, in order (then False)
        self.calls = []

    def is_serving(self, address, timeout, tls_root_cert=None):
        self.calls.append((address, timeout, tls_root_cert))
        return self.answers.pop(0) if self.answers else False


class Hooks:
    def __init__(self) -> None:
        self.calls = []
        self.on_started = None

    def mii_deployment_started(self, record):
        self.calls.append(("started", record.name, record.state))
        if self.on_started:
            self.on_started()

    def mii_deployment_stopped(self, record, reason):
        self.calls.append(("stopped", record.name, reason))


def make_record(name: str, replicas: int = 1, **mii) -> DeploymentRecord:
    config = MIIConfig(model_config=ModelConfig(model_name_or_path="tiny", replica_num=replicas),
                       deployment_name=name, **mii)
    return DeploymentRecord(
        name=name, config=json.loads(config.to_json()), host=config.host,
        port=config.port_number, log_path="/dev/null", created_at=time.time(),
        replicas=[ReplicaRecord(index=i, hostname="localhost", port=20000 + i, dist_port=0)
                  for i in range(replicas)])


@pytest.fixture
def env(monkeypatch, request):
    """A saved record, a Supervisor over it (transport and hooks stood in), and cleanup of
    every real process a test started."""
    transport, hooks = Transport(), Hooks()
    loaded = []

    def load_driver(kind, name):
        loaded.append((kind, name))
        return lambda: transport

    monkeypatch.setattr(sup, "load_driver", load_driver)
    monkeypatch.setattr(sup, "hooks", lambda: hooks)
    started = []
    real_spawn = sup.Supervisor._spawn

    def spawn(self, spec):
        proc = real_spawn(self, spec)
        started.append(proc)
        return proc

    monkeypatch.setattr(sup.Supervisor, "_spawn", spawn)

    class Env:
        def supervisor(self, name=None, replicas=1, save=registry.save, status=None, **mii):
            record = make_record(name or f"sup-{request.node.name[:40]}", replicas, **mii)
            path = registry.save(record)
            self.supervisor_ = sup.Supervisor(str(path), save=save, status=status)
            return self.supervisor_

    e = Env()
    e.transport, e.hooks, e.loaded, e.started = transport, hooks, loaded, started
    yield e
    for proc in started:  # not with the module's own helpers: they are what is tested
        for pid in _tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _tree(pid: int) -> list:
    """``pid``'s descendants, as psutil sees them (an oracle independent of the
    supervisor's own /proc walk)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def child(role: str, proc=None) -> sup.Child:
    return sup.Child(ChildSpec(role, ["never-run"], {}), proc or FakeProc())


def with_fake_children(s: sup.Supervisor, monkeypatch, **children):
    """Stand-in children; respawns make new FakeProcs (recorded with the clock time)."""
    s.children = dict(children)
    s.spawned = []
    s.killed = []

    def spawn(spec):
        proc = FakeProc()
        s.spawned.append((spec.role, proc, sup.time.time()))
        return proc

    monkeypatch.setattr(s, "_spawn", spawn)
    monkeypatch.setattr(s, "_kill_group", lambda c, sig: s.killed.append((c.spec.role, sig)))


# -- construction, state ----------------------------------------------------------------------
def test_a_missing_or_unreadable_record_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="cannot read deployment record .*nope.json"):
        sup.Supervisor(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match="cannot read deployment record"):
        sup.Supervisor(str(bad))


def test_the_supervisor_loads_its_record_and_transport(env):
    s = env.supervisor("sup-load", port_number=4567)
    assert s.record.name == "sup-load" and s.config.port_number == 4567
    assert s.children == {} and s.stop_reason is None
    assert env.loaded == []  # the transport is loaded at first use, once
    assert s.transport is env.transport and s.transport is env.transport
    assert env.loaded == [("transport", "grpc")]


def test_every_child_is_spawned_before_the_transport_is_loaded(env, monkeypatch):
    s = env.supervisor("sup-order", replicas=2)
    with_fake_children(s, monkeypatch)
    s.start()
    assert [role for role, _, _ in s.spawned] == ["replica-0", "replica-1", "load-balancer"]
    assert env.loaded == []


def test_a_child_starts_with_no_restarts():
    c = child("x")
    assert (c.restarts, c.restart_at, c.pids_seen) == (0, None, set())
    assert child("y").pids_seen is not c.pids_seen


def test_request_stop_keeps_the_first_reason(env):
    s = env.supervisor()
    s.request_stop("terminated")
    s.request_stop("hangup")
    assert s.stop_reason == "terminated"


def test_save_records_the_changes_and_the_children_pids(env, monkeypatch):
    s = env.supervisor("sup-save")
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0"),
                                          "load-balancer": child("load-balancer")})
    s._save(state="ready", error="none")
    saved = registry.load("sup-save")
    assert saved.state == "ready" and saved.error == "none"
    assert saved.pids == {role: c.proc.pid for role, c in s.children.items()}


@pytest.mark.parametrize("code, text", [(0, "0"), (3, "3"), (-9, "-9 (killed by SIGKILL)"),
                                        (-15, "-15 (killed by SIGTERM)"),
                                        (-1, "-1 (killed by SIGHUP)")])
def test_exit_status_descriptions(code, text):
    assert sup._describe_status(code) == text


# -- the watch loop (virtual clock, stand-in children) ----------------------------------------
def test_ready_when_the_load_balancer_answers(env, monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    s = env.supervisor("sup-ready", port_number=4321, host="127.0.0.1")
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0")})
    env.transport.answers = [False, False, True]
    env.hooks.on_started = lambda: s.request_stop("terminated")
    started = clock.now
    s.record.created_at = started - 3.0
    with caplog.at_level(logging.INFO, logger=sup.__name__):
        assert s.watch() == 0
    assert "deployment sup-ready ready on 127.0.0.1:4321 after 3.1s" in caplog.text
    assert env.transport.calls == [("127.0.0.1:4321", 0.2, None)] * 3
    saved = registry.load("sup-ready")
    assert saved.state == "ready" and saved.ready_at == pytest.approx(started + 0.1)
    assert env.hooks.calls == [("started", "sup-ready", "ready")]
    # polls every 0.05 s until ready (serve() waits on it), every 0.1 s after
    assert clock.sleeps == [0.05, 0.05, 0.1] == [sup.STARTUP_POLL_S] * 2 + [sup.POLL_S]


def test_the_probe_uses_the_tls_certificate(env, monkeypatch, tmp_path):
    monkeypatch.setattr(sup, "time", Clock())
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    s = env.supervisor(tls_cert_file=str(cert), tls_key_file=str(key))
    with_fake_children(s, monkeypatch)
    env.transport.answers = [True]
    env.hooks.on_started = lambda: s.request_stop("terminated")
    assert s.watch() == 0
    assert env.transport.calls[0][2] == str(cert)


def test_not_serving_by_the_startup_timeout_fails_the_deployment(env, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    s = env.supervisor("sup-slow", startup_timeout=2.0)
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0")})
    started = clock.now
    assert s.watch() == 1
    assert 2.0 <= clock.now - started <= 2.0 + 2 * sup.POLL_S
    saved = registry.load("sup-slow")
    assert (saved.state, saved.error) == ("failed", "not serving after startup_timeout=2.0s")
    assert s.stop_reason == "failed" and env.hooks.calls == []


def test_a_child_exiting_during_start_up_fails_the_deployment(env, monkeypatch):
    monkeypatch.setattr(sup, "time", Clock())
    s = env.supervisor("sup-early")
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0"),
                                          "replica-1": child("replica-1", FakeProc(code=-9))})
    assert s.watch() == 1
    saved = registry.load("sup-early")
    assert saved.state == "failed"
    assert saved.error == "replica-1 exited with status -9 (killed by SIGKILL) during start-up"
    assert s.spawned == [] and s.stop_reason == "failed"


def test_a_stop_request_ends_the_loop_at_once(env, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    s = env.supervisor()
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0", FakeProc(code=1))})
    s.request_stop("terminated")
    assert s.watch() == 0
    assert clock.sleeps == [] and env.transport.calls == []


def ready_supervisor(env, monkeypatch, name, **mii):
    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    s = env.supervisor(name, **mii)
    s.record.state = "ready"
    return s, clock


def test_a_crashed_child_is_restarted_after_the_backoff(env, monkeypatch, caplog):
    s, clock = ready_supervisor(env, monkeypatch, "sup-restart")
    crashed = FakeProc(code=1)
    healthy = FakeProc()
    with_fake_children(s, monkeypatch, **{"load-balancer": child("load-balancer", crashed),
                                          "replica-0": child("replica-0", healthy)})
    clock.on_sleep.append(lambda: s.spawned and s.request_stop("terminated"))
    started = clock.now
    with caplog.at_level(logging.WARNING, logger=sup.__name__):
        assert s.watch() == 0
    (role, _, at), = s.spawned
    assert role == "load-balancer" and 0.5 <= at - started <= 0.5 + 1.5 * sup.POLL_S
    assert s.killed == [("load-balancer", signal.SIGKILL)]  # leftovers of the group first
    restarted = s.children["load-balancer"]
    assert restarted.restarts == 1 and restarted.restart_at is None
    assert restarted.proc is s.spawned[0][1] and s.children["replica-0"].proc is healthy
    assert registry.load("sup-restart").pids == {"load-balancer": restarted.proc.pid,
                                                 "replica-0": healthy.pid}
    assert "load-balancer exited with status 1; restart 1 of 3 in 0.5s" in caplog.text
    assert registry.load("sup-restart").state == "ready"
    assert env.transport.calls == [] and env.hooks.calls == []  # ready: no more probes


@pytest.mark.parametrize("restarts, delay", [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)])
def test_the_backoff_doubles_up_to_eight_seconds(env, monkeypatch, caplog, restarts, delay):
    s, clock = ready_supervisor(env, monkeypatch, "sup-backoff", max_restarts=10)
    c = child("replica-0", FakeProc(code=1))
    c.restarts = restarts
    with_fake_children(s, monkeypatch, **{"replica-0": c})
    clock.on_sleep.append(lambda: s.spawned and s.request_stop("terminated"))
    started = clock.now
    with caplog.at_level(logging.WARNING, logger=sup.__name__):
        assert s.watch() == 0
    (role, _, at), = s.spawned
    assert delay <= at - started <= delay + 1.5 * sup.POLL_S
    assert c.restarts == restarts + 1
    assert (f"replica-0 exited with status 1; restart {restarts + 1} of 10 in {delay:.1f}s"
            in caplog.text)


def test_a_child_waiting_for_its_restart_is_not_rescheduled(env, monkeypatch):
    s, clock = ready_supervisor(env, monkeypatch, "sup-wait")
    c = child("replica-0", FakeProc(code=1))
    with_fake_children(s, monkeypatch, **{"replica-0": c})
    seen = []
    clock.on_sleep.append(lambda: seen.append(c.restart_at))
    clock.on_sleep.append(lambda: len(seen) == 3 and s.request_stop("terminated"))
    s.watch()
    assert seen[0] == seen[1] == seen[2] == pytest.approx(1000.5)
    assert s.spawned == []


def test_no_restarts_left_fails_the_deployment(env, monkeypatch):
    s, clock = ready_supervisor(env, monkeypatch, "sup-spent", max_restarts=2)
    c = child("replica-0", FakeProc(code=-15))
    c.restarts = 2
    with_fake_children(s, monkeypatch, **{"replica-0": c})
    assert s.watch() == 1
    saved = registry.load("sup-spent")
    assert saved.state == "failed" and saved.error == (
        "replica-0 exited with status -15 (killed by SIGTERM); no restarts left (max_restarts=2)")
    assert s.spawned == []


def test_max_restarts_zero_means_the_first_crash_stops_it(env, monkeypatch):
    s, clock = ready_supervisor(env, monkeypatch, "sup-zero", max_restarts=0)
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0", FakeProc(code=1))})
    assert s.watch() == 1 and s.spawned == []


def test_one_restart_left_is_used(env, monkeypatch):
    s, clock = ready_supervisor(env, monkeypatch, "sup-one", max_restarts=1)
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0", FakeProc(code=1))})
    clock.on_sleep.append(lambda: s.spawned and s.request_stop("terminated"))
    assert s.watch() == 0 and len(s.spawned) == 1
    s.children["replica-0"].proc.code = 1  # crashes again: none left
    s.stop_reason = None
    assert s.watch() == 1
    assert "no restarts left (max_restarts=1)" in registry.load("sup-one").error


def test_restart_due_only_restarts_children_whose_time_came(env, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    s = env.supervisor()
    due, later, running = (child("a", FakeProc(code=1)), child("b", FakeProc(code=1)),
                           child("c"))
    due.restart_at, later.restart_at = clock.now, clock.now + 0.01
    with_fake_children(s, monkeypatch, a=due, b=later, c=running)
    s._restart_due()
    assert [role for role, _, _ in s.spawned] == ["a"]
    assert (due.restarts, later.restarts, running.restarts) == (1, 0, 0)
    assert later.restart_at is not None


# -- its own writes failing (a full disk) -----------------------------------------------------
class FullDisk:
    """Writes records as ``registry.save`` does until ``full``; then does what a full disk
    does to it: OSError(ENOSPC) naming the file, the previous version left in place."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.refused = 0

    def save(self, record, path):
        if self.full:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return registry.save(record, path)


ENOSPC_TEXT = r"no space left on device: {path} \(ENOSPC, errno 28; [\d.]+ \S+ of [\d.]+ \S+ " \
              r"free on its filesystem\)"


def test_a_full_disk_after_ready_costs_no_process_and_the_write_is_retried(env, monkeypatch,
                                                                          caplog):
    disk = FullDisk()
    s, clock = ready_supervisor(env, monkeypatch, "sup-full", save=disk.save)
    crashed = FakeProc()
    with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0", crashed),
                                          "load-balancer": child("load-balancer")})
    disk.full, crashed.code = True, -9  # the disk fills up, then a replica crashes
    freed_at = []

    def free_the_disk_after_three_refusals():
        if disk.full and disk.refused == 3:
            disk.full = False
            freed_at.append(clock.now)
        if not disk.full and registry.load("sup-full").pids.get("replica-0") not in (
                None, crashed.pid):
            s.request_stop("terminated")

    clock.on_sleep.append(free_the_disk_after_three_refusals)
    with caplog.at_level(logging.WARNING, logger=sup.__name__):
        assert s.watch() == 0  # it kept watching: a stop request ended it, not the disk
    (role, restarted, _), = s.spawned
    assert role == "replica-0" and s.children["replica-0"].proc is restarted
    saved = registry.load("sup-full")
    assert saved.pids["replica-0"] == restarted.pid and saved.state == "ready"
    assert clock.now - freed_at[0] <= sup.RECORD_RETRY_S + 2 * sup.POLL_S
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per outage, not once per retry
    assert re.fullmatch("cannot write the registry record: " + ENOSPC_TEXT.format(
        path=re.escape(s.record_file)) + "; the deployment's processes keep running, the write "
        "is retried every 2s", errors[0])
    assert f"registry record {s.record_file} written again" in caplog.text


def test_a_full_disk_during_start_up_fails_it_and_tells_serve_through_the_pipe(env, monkeypatch):
    read, write = os.pipe()
    try:
        s = env.supervisor("sup-full-start", save=FullDisk(full=True).save,
                           status=sup.StatusPipe(write))
        with_fake_children(s, monkeypatch)
        s.start()  # no record with the supervisor's pid: mii.client(name) could not find it
        assert s.stop_reason == "failed" and s.watch() == 1
        s.stop()  # the failed state cannot be written either: no exception, the pipe says it
        os.set_blocking(read, False)
        told = os.read(read, 65536).decode()
        assert os.read(read, 1) == b""  # and closed it
    finally:
        os.close(read)
    assert re.fullmatch("cannot write its registry record: " + ENOSPC_TEXT.format(
        path=re.escape(s.record_file)), told)
    assert s.record.error == told and registry.load("sup-full-start").state == "starting"


def test_the_pipe_is_closed_once_ready(env, monkeypatch):
    monkeypatch.setattr(sup, "time", Clock())
    read, write = os.pipe()
    try:
        s = env.supervisor("sup-pipe", status=sup.StatusPipe(write))
        with_fake_children(s, monkeypatch)
        env.transport.answers = [True]
        env.hooks.on_started = lambda: s.request_stop("terminated")
        assert s.watch() == 0
        assert os.read(read, 1) == b""  # closed with nothing said
        s.stop()
    finally:
        os.close(read)


# -- real processes: start, stop, the process tree --------------------------------------------
def python(code: str):
    return [sys.executable, "-c", code]


def use_specs(monkeypatch, s, lb_code=SLEEPER, replica_code=SLEEPER, gateway_code=SLEEPER):
    seen = []

    def replica_spec(record, record_file, replica):
        seen.append(("replica", record is s.record, record_file, replica.index))
        return ChildSpec(f"replica-{replica.index}", python(replica_code), dict(os.environ))

    def lb_spec(record_file):
        seen.append(("lb", record_file))
        return ChildSpec("load-balancer", python(lb_code), dict(os.environ))

    def gateway_spec(record_file):
        seen.append(("gateway", record_file))
        return ChildSpec("rest-gateway", python(gateway_code), dict(os.environ))

    monkeypatch.setattr(sup, "replica_spec", replica_spec)
    monkeypatch.setattr(sup, "load_balancer_spec", lb_spec)
    monkeypatch.setattr(sup, "gateway_spec", gateway_spec)
    return seen


def test_start_spawns_every_replica_then_the_load_balancer_in_own_sessions(env, monkeypatch):
    s = env.supervisor("sup-start", replicas=2)
    seen = use_specs(monkeypatch, s)
    s.start()
    assert list(s.children) == ["replica-0", "replica-1", "load-balancer"]
    assert seen == [("replica", True, s.record_file, 0), ("replica", True, s.record_file, 1),
                    ("lb", s.record_file)]
    for c in s.children.values():
        assert c.proc.poll() is None
        assert os.getsid(c.proc.pid) == c.proc.pid  # a session (and group) of its own
    saved = registry.load("sup-start")
    assert saved.supervisor_pid == os.getpid()
    assert saved.pids == {role: c.proc.pid for role, c in s.children.items()}


GATEWAY = """
import socket, sys, time
time.sleep(0.6)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
time.sleep(60)
"""


@pytest.fixture
def free_port() -> int:
    from mii_core.deploy.ports import free_port as pick

    return pick()


def test_start_waits_for_the_rest_gateway_to_listen(env, monkeypatch, free_port):
    s = env.supervisor("sup-gw", enable_restful_api=True, restful_api_port=free_port,
                       restful_api_host="localhost")
    seen = use_specs(monkeypatch, s)
    waits = []
    real_wait = sup.wait_until_listening

    def wait(host, port, proc, timeout, should_stop):
        waits.append((host, port, timeout, should_stop()))
        return real_wait(host, port, proc, timeout, should_stop)

    monkeypatch.setattr(sup, "wait_until_listening", wait)
    monkeypatch.setattr(sup, "gateway_spec", lambda record_file: ChildSpec(
        "rest-gateway", [sys.executable, "-c", GATEWAY, str(free_port)], dict(os.environ)))
    s.start()
    assert list(s.children) == ["replica-0", "rest-gateway", "load-balancer"]
    assert waits == [("127.0.0.1", free_port, 20.0, False)]  # localhost: IPv4; 20 s (docs)
    import socket

    with socket.create_connection(("127.0.0.1", free_port), timeout=1):
        pass  # start() returned only once the gateway listened
    assert [x[0] for x in seen] == ["replica", "lb"]


def test_a_stop_request_ends_the_wait_for_the_gateway(env, monkeypatch, free_port):
    s = env.supervisor(enable_restful_api=True, restful_api_port=free_port)
    use_specs(monkeypatch, s)
    stops = []
    monkeypatch.setattr(sup, "wait_until_listening",
                        lambda host, port, proc, timeout, should_stop: stops.append(
                            [should_stop(), s.request_stop("terminated"), should_stop()]))
    s.start()
    assert stops == [[False, None, True]]


def test_stop_terminates_every_group_and_reports(env, monkeypatch, caplog):
    s = env.supervisor("sup-stop", replicas=2)
    use_specs(monkeypatch, s)
    s.start()
    s.request_stop("terminated")
    procs = [c.proc for c in s.children.values()]
    begun = time.time()
    with caplog.at_level(logging.INFO, logger=sup.__name__):
        s.stop()
    assert time.time() - begun < 5  # SIGTERM was enough: no grace period waited out
    assert all(p.returncode == -signal.SIGTERM for p in procs)
    assert registry.load("sup-stop").state == "stopping"
    assert env.hooks.calls == [("stopped", "sup-stop", "terminated")]
    assert "ignored SIGTERM" not in caplog.text
    assert "still alive after teardown" not in caplog.text
    assert "deployment sup-stop stopped (terminated)" in caplog.text


def test_stop_after_a_failure_keeps_the_failed_state(env, monkeypatch):
    s = env.supervisor("sup-failed-stop")
    use_specs(monkeypatch, s)
    s.start()
    s._fail("boom")
    s.stop()
    saved = registry.load("sup-failed-stop")
    assert (saved.state, saved.error) == ("failed", "boom")
    assert env.hooks.calls == [("stopped", "sup-failed-stop", "failed")]


def test_stop_without_a_reason_reports_terminated(env, monkeypatch):
    s = env.supervisor()
    use_specs(monkeypatch, s)
    s.start()
    s.stop()
    assert env.hooks.calls[-1][2] == "terminated"


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
# a grandchild in a session of its own (as torchrun's ranks): not in the group
subprocess.Popen([sys.executable, "-c", "import signal, time; "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
                 start_new_session=True)
print("ready", flush=True)
time.sleep(60)
"""


def test_survivors_of_the_grace_period_are_killed_descendants_included(env, monkeypatch,
                                                                       caplog, capfd):
    s = env.supervisor("sup-stubborn")
    use_specs(monkeypatch, s, lb_code=STUBBORN)
    s.start()
    lb = s.children["load-balancer"].proc
    deadline = time.time() + 20
    while "ready" not in capfd.readouterr().out and time.time() < deadline:
        time.sleep(0.05)
    tree = sup._descendants(lb.pid)
    assert len(tree) == 1
    clock = Clock(real_sleep=0.002)
    monkeypatch.setattr(sup, "time", clock)
    begun = clock.now
    warned = []
    monkeypatch.setattr(sup.log, "warning",
                        lambda message, *args: warned.append((message % args, clock.now)))
    s.stop()
    assert sorted(w[0] for w in warned) == sorted(
        f"pid {pid} ignored SIGTERM; killing it" for pid in [lb.pid] + tree)
    assert all(at - begun == pytest.approx(8.0, abs=0.06) for _, at in warned)  # 8 s grace
    assert lb.returncode == -signal.SIGKILL
    # SIGKILLed just now: gone within moments (stop() itself does not wait for them)
    deadline = time.time() + 10
    while (registry.pid_alive(tree[0]) or s._survivors()) and time.time() < deadline:
        time.sleep(0.01)
    assert not registry.pid_alive(tree[0]) and not s._survivors()


def replica_printing(env, monkeypatch, capfd, code, done):
    """A started supervisor whose replica runs ``code``; returns (supervisor, the
    replica's pid, what it printed) once ``done(printed)`` holds (or after 20 s)."""
    s = env.supervisor()
    use_specs(monkeypatch, s, replica_code=code)
    s.start()
    deadline, out = time.time() + 20, ""
    while not done(out) and time.time() < deadline:
        out += capfd.readouterr().out
        time.sleep(0.05)
    return s, s.children["replica-0"].proc.pid, out


def test_group_members_and_descendants(env, monkeypatch, capfd):
    code = """
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)]
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(60)
"""
    s, leader, out = replica_printing(env, monkeypatch, capfd, code, str.strip)
    in_group, own_session = (int(p) for p in out.split())
    assert sorted(sup._group_members(leader)) == sorted([leader, in_group])
    assert sorted(sup._descendants(leader)) == sorted([in_group, own_session])
    assert sup._descendants(PID_MAX + 5) == [] and sup._group_members(PID_MAX + 5) == []
    s._track_pids(s.children["replica-0"])
    assert s.children["replica-0"].pids_seen == {leader, in_group, own_session}
    assert sorted(s._survivors()) == sorted(
        {leader, in_group, own_session} | {c.proc.pid for c in s.children.values()})


def test_descendants_of_a_grandchild_are_found(env, monkeypatch, capfd):
    code = """
import subprocess, sys, time
inner = "import subprocess, sys, time; k = subprocess.Popen([sys.executable, '-c', " \\
        "'import time; time.sleep(60)']); print(k.pid, flush=True); time.sleep(60)"
kid = subprocess.Popen([sys.executable, "-c", inner])
print(kid.pid, flush=True)
time.sleep(60)
"""
    _, leader, out = replica_printing(env, monkeypatch, capfd, code,
                                      lambda out: len(out.split()) >= 2)
    assert sorted(sup._descendants(leader)) == sorted(int(p) for p in out.split())


def test_descendants_skip_processes_and_tasks_that_vanish(env, monkeypatch, capfd):
    code = """
import subprocess, sys, time
inner = "import subprocess, sys, time; k = subprocess.Popen([sys.executable, '-c', " \\
        "'import time; time.sleep(60)']); print('grandchild', k.pid, flush=True); time.sleep(60)"
first = subprocess.Popen([sys.executable, "-c", inner])
time.sleep(0.3)
second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("kids", first.pid, second.pid, flush=True)
time.sleep(60)
"""
    _, leader, out = replica_printing(env, monkeypatch, capfd, code,
                                      lambda out: "kids" in out and "grandchild" in out)
    words = out.split()
    grandchild = int(words[words.index("grandchild") + 1])
    first, second = (int(w) for w in words[words.index("kids") + 1:][:2])
    real = os.listdir

    def listdir(path):
        if path == f"/proc/{second}/task":
            raise FileNotFoundError(path)  # exited between being listed and being read
        if path == f"/proc/{leader}/task":
            return ["999999999"] + real(path)  # a thread that ended meanwhile
        return real(path)

    monkeypatch.setattr(sup.os, "listdir", listdir)
    assert sorted(sup._descendants(leader)) == sorted([first, second, grandchild])


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_running_the_module_runs_main(monkeypatch, tmp_path):
    import runpy

    from mii_core.deploy import logs

    monkeypatch.setattr(logs, "configure", lambda role: None)
    monkeypatch.setattr(sys, "argv", ["supervisor", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="cannot read deployment record"):
        runpy.run_module("mii_core.control.supervisor", run_name="__main__")


def test_group_members_skips_processes_that_vanish(monkeypatch):
    leader = subprocess.Popen(python(SLEEPER), start_new_session=True)
    try:
        real = os.getpgid
        first = min(int(e) for e in os.listdir("/proc") if e.isdigit())

        def getpgid(pid):
            if pid == first:
                raise ProcessLookupError(pid)  # gone between listdir and getpgid
            return real(pid)

        monkeypatch.setattr(sup.os, "getpgid", getpgid)
        assert sup._group_members(leader.pid) == [leader.pid]
    finally:
        leader.kill()
        leader.wait()


def test_kill_and_kill_group_ignore_processes_already_gone():
    proc = subprocess.Popen(python(SLEEPER), start_new_session=True)
    sup._kill(proc.pid)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    sup._kill(proc.pid)  # reaped: no such process any more
    sup.Supervisor._kill_group(None, child("x", proc), signal.SIGTERM)
    group = subprocess.Popen(python(SLEEPER), start_new_session=True)
    sup.Supervisor._kill_group(None, child("x", group), signal.SIGTERM)
    assert group.wait(timeout=10) == -signal.SIGTERM


# -- main --------------------------------------------------------------------------------------
class ScriptedSupervisor:
    """Stands in for Supervisor in main(): records the calls, does what it is told."""

    instances = []

    def __init__(self, record_file, save, status):
        self.record_file = record_file
        self.save, self.status_pipe = save, status
        self.record = make_record("sup-main")
        self.stop_reason = None
        self.unsaved = None
        self.calls = []
        self.fail_start = False
        self.status = 0
        ScriptedSupervisor.instances.append(self)

    def request_stop(self, reason):
        self.calls.append(("request_stop", reason))

    def start(self):
        self.calls.append("start")
        if ScriptedSupervisor.fail_start:
            raise RuntimeError("spawn failed")

    def watch(self):
        self.calls.append("watch")
        return ScriptedSupervisor.status

    def stop(self):
        self.calls.append(("stop", self.stop_reason, self.record.error))


@pytest.fixture
def scripted(monkeypatch):
    ScriptedSupervisor.instances = []
    ScriptedSupervisor.fail_start = False
    ScriptedSupervisor.status = 0
    handlers, removed = {}, []
    monkeypatch.setattr(sup, "Supervisor", ScriptedSupervisor)
    monkeypatch.setattr(sup.logs, "configure", lambda role: handlers.setdefault("role", role))
    monkeypatch.setattr(sup.signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.setattr(sup.registry, "remove", removed.append)
    return handlers, removed


def test_main_runs_start_watch_stop_and_removes_the_record(scripted, monkeypatch):
    handlers, removed = scripted
    ScriptedSupervisor.status = 0
    assert sup.main(["/r.json"]) == 0
    s, = ScriptedSupervisor.instances
    assert s.record_file == "/r.json" and handlers["role"] == "supervisor"
    assert s.calls == ["start", "watch", ("stop", None, "")]
    assert removed == ["sup-main"]
    for sig, reason in ((signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted"),
                        (signal.SIGHUP, "hangup")):
        handlers[sig](sig, None)
        assert s.calls[-1] == ("request_stop", reason)


def test_main_reads_the_record_path_from_argv(scripted, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["supervisor", "/from-argv.json"])
    ScriptedSupervisor.status = 1
    assert sup.main() == 1
    assert ScriptedSupervisor.instances[0].record_file == "/from-argv.json"


def test_main_keeps_the_record_of_a_failed_deployment(scripted, monkeypatch):
    handlers, removed = scripted

    def watch(self):
        self.stop_reason = "failed"
        return 1

    monkeypatch.setattr(ScriptedSupervisor, "watch", watch)
    assert sup.main(["/r.json"]) == 1
    assert removed == []


def test_main_removes_a_failed_record_whose_failure_it_could_not_write(scripted, monkeypatch):
    handlers, removed = scripted

    def watch(self):
        self.stop_reason, self.unsaved = "failed", "no space left on device: /r.json"
        return 1

    monkeypatch.setattr(ScriptedSupervisor, "watch", watch)
    assert sup.main(["/r.json"]) == 1
    assert removed == ["sup-main"]  # on disk it still said "ready": it would lie


def test_main_passes_the_status_pipe_and_the_writer(scripted):
    read, write = os.pipe()
    os.close(read)
    assert sup.main(["/r.json", "--status-fd", str(write)], save=FullDisk().save) == 0
    s, = ScriptedSupervisor.instances
    assert s.status_pipe.fd == write and s.save.__self__.__class__ is FullDisk
    s.status_pipe.close()


def test_main_turns_an_exception_into_a_failed_stop(scripted, caplog):
    handlers, removed = scripted
    ScriptedSupervisor.fail_start = True
    with caplog.at_level(logging.ERROR, logger=sup.__name__):
        assert sup.main(["/r.json"]) == 1
    s, = ScriptedSupervisor.instances
    assert s.calls == ["start", ("stop", "failed",
                                 "supervisor failed: RuntimeError: spawn failed (see log)")]
    assert removed == [] and "supervisor failed" in caplog.text


def test_main_exception_keeps_an_earlier_reason_and_error(scripted, monkeypatch):
    handlers, removed = scripted

    def start(self):
        self.stop_reason, self.record.error = "terminated", "earlier"
        raise RuntimeError("late")

    monkeypatch.setattr(ScriptedSupervisor, "start", start)
    assert sup.main(["/r.json"]) == 1
    s, = ScriptedSupervisor.instances
    assert s.calls[-1] == ("stop", "terminated", "earlier")
    assert removed == ["sup-main"]
