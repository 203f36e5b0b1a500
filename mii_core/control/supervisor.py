"""The supervisor: the long-lived parent of every process of one deployment.

``python -m mii_core.control.supervisor RECORD`` is started by ``serve()`` in a new
session, so it outlives the caller and ignores the caller's Ctrl-C. It starts
the replicas and the load balancer, each in its own process group, records
their pids, restarts a child that crashes after start-up (with backoff, at most
``max_restarts`` times each; the load balancer is stateless and comes back on the
same port, replicas are routed around meanwhile), and on SIGTERM / Terminate stops every process group,
verifies every pid is gone and removes the registry record.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional

from mii_core.control.launcher import (
    ChildSpec,
    gateway_spec,
    load_balancer_spec,
    replica_spec,
    wait_until_listening,
)
from mii_core.deploy import logs, registry
from mii_core.deploy.addresses import gateway_bind_host
from mii_core.deploy.registry import DeploymentRecord
from mii_core.plugins.discovery import hooks, load_driver

log = logging.getLogger(__name__)
POLL_S = 0.1
STARTUP_POLL_S = 0.05  # until ready: serve() waits on this probe (see "Start-up time")
STOP_GRACE_S = 8.0
GATEWAY_WAIT_S = 20.0


@dataclass
class Child:
    """A running child process group and its restart bookkeeping."""

    spec: ChildSpec
    proc: subprocess.Popen
    restarts: int = 0
    restart_at: Optional[float] = None
    pids_seen: set = field(default_factory=set)


class Supervisor:
    """Starts, watches and stops the children of one deployment."""

    def __init__(self, record_file: str) -> None:
        self.record_file = record_file
        record = registry.load_file(Path(record_file))
        if record is None:
            raise SystemExit(f"cannot read deployment record {record_file}")
        self.record: DeploymentRecord = record
        self.config = record.mii_config
        self.children: Dict[str, Child] = {}
        self.stop_reason: Optional[str] = None

    @cached_property
    def transport(self):
        """The transport driver, loaded at first use (the readiness probe), so that the
        replicas, whose imports are most of the start-up, are spawned before grpc is imported."""
        return load_driver("transport", self.config.transport)()

    # -- record ------------------------------------------------------------------------
    def _save(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.record.pids = {role: c.proc.pid for role, c in self.children.items()}
        registry.save(self.record)

    # -- children ----------------------------------------------------------------------
    def _spawn(self, spec: ChildSpec) -> subprocess.Popen:
        log.info("starting %s: %s", spec.role, " ".join(spec.argv))
        return subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL,
                                stdout=sys.stdout, stderr=sys.stderr, start_new_session=True)

    def start(self) -> None:
        """Start every replica, the REST gateway (if enabled) and the load balancer."""
        for replica in self.record.replicas:
            spec = replica_spec(self.record, self.record_file, replica)
            self.children[spec.role] = Child(spec, self._spawn(spec))
        if self.config.enable_restful_api:  # bound before the deployment answers, so that
            spec = gateway_spec(self.record_file)  # serve() returning means REST is up too
            child = self.children[spec.role] = Child(spec, self._spawn(spec))
            wait_until_listening(gateway_bind_host(self.config.restful_api_host),
                                 self.config.restful_api_port, child.proc, GATEWAY_WAIT_S,
                                 lambda: self.stop_reason is not None)
        spec = load_balancer_spec(self.record_file)
        self.children[spec.role] = Child(spec, self._spawn(spec))
        self._save(supervisor_pid=os.getpid())

    def request_stop(self, reason: str) -> None:
        """Signal handler: leave the watch loop and tear down."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def watch(self) -> int:
        """Run until asked to stop or start-up fails; return the exit status."""
        deadline = time.time() + self.config.startup_timeout
        address = f"{self.config.host}:{self.config.port_number}"
        while self.stop_reason is None:
            for role, child in self.children.items():
                code = child.proc.poll()
                if code is None or child.restart_at is not None:
                    continue
                if self.record.state != "ready":
                    self._fail(f"{role} exited with status {_describe_status(code)} during start-up")
                    return 1
                if child.restarts >= self.config.max_restarts:
                    self._fail(f"{role} exited with status {_describe_status(code)}; "
                               f"no restarts left (max_restarts={self.config.max_restarts})")
                    return 1
                child.restart_at = time.time() + min(8.0, 0.5 * 2 ** child.restarts)
                log.warning("%s exited with status %s; restart %d of %d in %.1fs", role,
                            _describe_status(code), child.restarts + 1, self.config.max_restarts,
                            child.restart_at - time.time())
            self._restart_due()
            if self.record.state == "starting":
                if self.transport.is_serving(address, timeout=0.2,
                                             tls_root_cert=self.config.tls_cert_file):
                    self._save(state="ready", ready_at=time.time())
                    log.info("deployment %s ready on %s after %.1fs",
                             self.record.name, address, time.time() - self.record.created_at)
                    hooks().mii_deployment_started(record=self.record)
                elif time.time() > deadline:
                    self._fail(f"not serving after startup_timeout={self.config.startup_timeout}s")
                    return 1
            time.sleep(STARTUP_POLL_S if self.record.state == "starting" else POLL_S)
        return 0

    def _restart_due(self) -> None:
        for role, child in self.children.items():
            if child.restart_at is not None and time.time() >= child.restart_at:
                self._kill_group(child, signal.SIGKILL)  # leftovers of the crashed group
                child.restarts += 1
                child.restart_at = None
                child.proc = self._spawn(child.spec)
                self._save()

    def _fail(self, why: str) -> None:
        log.error("deployment %s failed: %s", self.record.name, why)
        self._save(state="failed", error=why)
        self.stop_reason = "failed"

    # -- teardown ----------------------------------------------------------------------
    def _track_pids(self, child: Child) -> None:
        child.pids_seen |= set(_group_members(child.proc.pid)) | set(_descendants(child.proc.pid))

    def _kill_group(self, child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """Stop every child group: SIGTERM, a grace period, then SIGKILL; verify all are gone."""
        self._save(state="failed" if self.stop_reason == "failed" else "stopping")
        for child in self.children.values():
            self._track_pids(child)
            self._kill_group(child, signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and self._survivors():
            time.sleep(0.05)
        for pid in self._survivors():
            log.warning("pid %d ignored SIGTERM; killing it", pid)
            for child in self.children.values():
                self._kill_group(child, signal.SIGKILL)
            _kill(pid)
        for child in self.children.values():
            child.proc.wait(timeout=5)
        left = self._survivors()
        if left:
            log.error("processes still alive after teardown: %s", left)
        log.info("[progress] deployment %s stopped (%s)", self.record.name, self.stop_reason)
        hooks().mii_deployment_stopped(record=self.record, reason=self.stop_reason or "terminated")

    def _survivors(self) -> List[int]:
        alive = []
        for child in self.children.values():
            child.proc.poll()  # reap the direct child
            self._track_pids(child)
            alive += [pid for pid in child.pids_seen if registry.pid_alive(pid)]
        return sorted(set(alive))


def _group_members(pgid: int) -> List[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (launchers may put ranks in sessions of their own)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    kids = [int(k) for k in handle.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_status(code: int) -> str:
    if code < 0:
        return f"{code} (killed by {signal.Signals(-code).name})"
    return str(code)


def main(argv: Optional[List[str]] = None) -> int:
    """Supervise the deployment whose record is ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    logs.configure("supervisor")
    supervisor = Supervisor(args[0])
    for sig, reason in ((signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted"),
                        (signal.SIGHUP, "hangup")):
        signal.signal(sig, lambda *_, r=reason: supervisor.request_stop(r))
    status = 1
    try:
        supervisor.start()
        status = supervisor.watch()
    except Exception:
        log.exception("supervisor failed")
        supervisor.stop_reason = supervisor.stop_reason or "failed"
        supervisor.record.error = supervisor.record.error or "supervisor failed (see log)"
    finally:
        supervisor.stop()
        if supervisor.stop_reason != "failed":
            registry.remove(supervisor.record.name)
    return status


if __name__ == "__main__":
    sys.exit(main())
