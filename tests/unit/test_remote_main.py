"""remote_main: the head's guard around the DeepSpeed launcher, and a remote rank's exit
with its ssh session. Small real processes stand in for the launcher, ssh and sshd (the
multi-host tests run the real ones, tests/multihost)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

from mii_core.deploy.registry import SUPERVISOR_MODULE, pid_alive

# A stand-in for the DeepSpeed launcher: it starts a child in a session of its own, as
# pdsh starts ssh, writes that child's pid to argv[1], then waits (or exits with argv[2]).
# A SIGTERM it would answer (the real one with pdsh pkill) leaves argv[1].term.
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[1] + ".term", "w").close())
    ssh = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                           start_new_session=True)
    open(sys.argv[1], "w").write(str(ssh.pid))
    if len(sys.argv) > 2:
        ssh.kill(); ssh.wait(); sys.exit(int(sys.argv[2]))
    time.sleep(120)
""")


def guard(tmp_path: Path, *launcher_args: str, supervisor: int = 0):
    env = {**os.environ, "MII_SUPERVISOR_PID": str(supervisor)}
    pidfile = tmp_path / "ssh.pid"
    proc = subprocess.Popen([sys.executable, "-m", "mii_core.control.remote_main", "launch",
                             sys.executable, "-c", LAUNCHER, str(pidfile), *launcher_args],
                            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60), proc.stderr
    return proc, int(pidfile.read_text())


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigterm_sigkills_the_launcher_and_its_ssh_clients(tmp_path):
    """The supervisor's SIGTERM: the launcher is killed without a SIGTERM of its own (the
    DeepSpeed launcher would answer it with ``pkill -f`` on every host)."""
    proc, ssh = guard(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 137
        assert wait_until(lambda: not pid_alive(ssh), 10)
        assert not (tmp_path / "ssh.pid.term").exists()
    finally:
        stop(proc)
        if pid_alive(ssh):
            os.kill(ssh, signal.SIGKILL)


def test_the_supervisors_end_ends_the_launcher_tree(tmp_path):
    """What a SIGKILLed supervisor leaves: the guard sees it gone and kills the launcher and
    the ssh clients, whose sessions close, and the remote ranks exit with them."""
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                   SUPERVISOR_MODULE])
    proc, ssh = guard(tmp_path, supervisor=supervisor.pid)
    try:
        assert proc.poll() is None
        supervisor.kill()
        supervisor.wait()
        assert proc.wait(timeout=30) == 137  # its launcher was killed
        assert wait_until(lambda: not pid_alive(ssh), 10)
    finally:
        stop(proc, supervisor)
        if pid_alive(ssh):
            os.kill(ssh, signal.SIGKILL)


def test_the_launchers_exit_status_is_the_guards(tmp_path):
    proc, _ = guard(tmp_path, "5")
    try:
        assert proc.wait(timeout=30) == 5
    finally:
        stop(proc)


WATCHED = textwrap.dedent("""
    import time
    from mii_core.control.remote_main import exit_with_session
    print(exit_with_session(), flush=True)
    time.sleep(60)
""")


def test_a_rank_exits_when_its_session_closes_its_pipes():
    """sshd closes the pipes of a session whose client went away; the rank exits at once."""
    proc = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "True"
        assert proc.poll() is None
        proc.stdout.close()
        proc.stderr.close()
        assert proc.wait(timeout=10) == 3
    finally:
        stop(proc)


def test_a_rank_whose_output_goes_to_files_is_not_watched(tmp_path):
    out = tmp_path / "out"
    with open(out, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-c", WATCHED.replace("60", "0")],
                                stdout=handle, stderr=handle)
        assert proc.wait(timeout=60) == 0
    assert out.read_text().split()[0] == "False"


@pytest.mark.parametrize("argv", [[], ["rank", "r.json"], ["nonsense"]])
def test_usage(argv):
    from mii_core.control.remote_main import main

    assert main(argv) == 2
