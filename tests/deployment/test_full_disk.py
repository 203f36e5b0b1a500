"""A full disk under ``$MII_HOME`` costs no process: ``serve()`` fails naming the file, the
errno and the space left, and a deployment whose disk fills up keeps serving, restarts a
crashed replica and writes its record again once there is room.

Each test runs on two disks: a real one (a small tmpfs mounted for the test, filled up;
skipped where mounting is not allowed) and, everywhere, a supervisor whose record writer
fails with ENOSPC while a marker file exists (its log stays writable, so the log is
checked there too)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GREEDY, kill_deployment, port_was_taken, wait_until

from mii.errors import DeploymentStartupError, MIIError
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port

# A supervisor whose record writer is a full disk while the file argv[1] exists. Children
# recognise their supervisor by its module's name in its command line: the import names it.
FULL_DISK_SUPERVISOR = """
import errno, os, sys
import mii_core.control.supervisor as supervisor
from mii_core.deploy import registry

def save(record, path):
    if os.path.exists(sys.argv[1]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return registry.save(record, path)

sys.exit(supervisor.main(sys.argv[2:], save=save))
"""


class InjectedDisk:
    """The session's ``$MII_HOME``; only the supervisor's record writes fail, while full."""

    kind = "injected"

    def __init__(self, tmp_path: Path) -> None:
        self.marker = tmp_path / "disk-is-full"
        self.supervisor = (sys.executable, "-c", FULL_DISK_SUPERVISOR, str(self.marker))

    def fill(self) -> None:
        self.marker.touch()

    def free(self) -> None:
        self.marker.unlink()

    def close(self) -> None:
        pass


class TmpfsDisk:
    """``$MII_HOME`` on a 4 MiB tmpfs (inside the session's home, so the leak check sees
    its processes); ``fill`` writes a file until the kernel answers ENOSPC."""

    kind = "tmpfs"
    from mii_core.api.serve import SUPERVISOR_COMMAND as supervisor

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    @classmethod
    def mounted(cls, mount: Path) -> "TmpfsDisk":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mount.mkdir(mode=0o700)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                                   str(mount)], capture_output=True, text=True)
            why = done.stderr.strip() if done.returncode else ""
        except OSError as error:  # no mount(8)
            why = str(error)
        if why:
            mount.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {why}")
        return cls(mount)

    def fill(self) -> None:
        with open(self.filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error

    def free(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        # A process of the deployment may still be closing its log (exiting) at this point.
        assert wait_until(self._unmount, 10), f"{self.mount} is still busy: {self.users()}"
        self.mount.rmdir()

    def _unmount(self) -> bool:
        return subprocess.run(["umount", str(self.mount)], capture_output=True).returncode == 0

    def users(self) -> list:
        """(pid, command line) of processes with a file open on the tmpfs."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(self.mount))
                       for fd in os.listdir(f"/proc/{pid}/fd")):
                    found.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]))
            except OSError:
                continue
        return found


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, mii_home, tmp_path, monkeypatch):
    if request.param == "injected":
        made = InjectedDisk(tmp_path)
    else:
        made = TmpfsDisk.mounted(mii_home / f"tmpfs-{tmp_path.name}")
        monkeypatch.setenv("MII_HOME", str(made.mount))
    yield made
    monkeypatch.undo()
    made.close()


def start(disk, tiny_model: str, name: str):
    """``serve()``'s steps with ``disk``'s supervisor (ports picked, again if taken)."""
    from mii_core.api import serve as serve_module
    from mii_core.config.kwargs import parse_serve_kwargs

    for attempt in range(4):
        config = serve_module.prepare(parse_serve_kwargs(
            tiny_model, deployment_name=name, engine="transformers", port_number=free_port()))
        try:
            return serve_module.launch(config, serve_module.plan(config), disk.supervisor)
        except MIIError as error:
            if attempt == 3 or not port_was_taken(error):
                raise


def replica_of(supervisor_pid: int):
    """Pid of the replica process the supervisor runs now (the record may be behind)."""
    import psutil

    for kid in psutil.Process(supervisor_pid).children():
        try:
            if "mii_core.control.replica_main" in " ".join(kid.cmdline()):
                return kid.pid
        except psutil.Error:  # the crashed one, a zombie until the supervisor reaps it
            continue
    return None


def answers(client) -> bool:
    try:
        return client("Full disk", max_new_tokens=2, **GREEDY)[0].generated_length == 2
    except MIIError:  # the load balancer has no healthy replica yet
        return False


def test_serve_on_a_full_disk_fails_naming_the_file_errno_and_space(disk, tiny_model):
    name = f"full-at-start-{disk.kind}"
    disk.fill()
    path = registry.record_path(name)
    with pytest.raises(DeploymentStartupError) as caught:
        start(disk, tiny_model, name)
    assert f"cannot write its registry record: no space left on device: {path} (ENOSPC, " \
           f"errno 28; " in str(caught.value)
    if disk.kind == "tmpfs":  # the caller's own write failed: nothing was started
        assert "; 0 B of 4.0 MiB free on its filesystem)" in str(caught.value)
    else:  # the supervisor's failed, after it started the children: they are stopped
        assert "failed to start" in str(caught.value)
    assert registry.load(name) is None
    disk.free()


def test_a_disk_filling_up_costs_no_process(disk, tiny_model):
    name = f"filling-up-{disk.kind}"
    client = start(disk, tiny_model, name)
    try:
        record = registry.load(name)
        supervisor, crashed = record.supervisor_pid, record.pids["replica-0"]
        disk.fill()
        os.kill(crashed, signal.SIGKILL)
        # Restarted although the supervisor cannot write it down, and served by again.
        assert wait_until(lambda: replica_of(supervisor) not in (None, crashed), 30)
        restarted = replica_of(supervisor)
        assert wait_until(lambda: answers(client), 120)
        assert registry.supervisor_alive(registry.load(name))
        assert registry.load(name).pids["replica-0"] == crashed  # the write was refused
        disk.free()
        assert wait_until(lambda: registry.load(name).pids["replica-0"] == restarted, 10)
        log = Path(record.log_path).read_text()
        if disk.kind == "injected":  # a full disk loses this line with the rest of the log
            assert f"cannot write the registry record: no space left on device: " \
                   f"{registry.record_path(name)} (ENOSPC, errno 28" in log
        assert f"registry record {registry.record_path(name)} written again" in log
        assert answers(client) and registry.load(name).state == "ready"
        client.terminate_server()
    except BaseException:
        kill_deployment(name)
        raise
    assert registry.load(name) is None
