"""Shared fixtures: an isolated MII_HOME, the tiny model, deployments that always clean up,
a hook plugin that a deployment can carry (to watch its hooks and to hold its engine
loop), and a check after every test that it left no process of ours running."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = tempfile.mkdtemp(prefix="mii-test-home-")
# Set before anything imports mii so every child process inherits the same registry.
os.environ["MII_HOME"] = _HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RANK", None)
os.environ.pop("LOCAL_RANK", None)
os.environ.pop("MII_AUTH_TOKEN", None)

MII_SCRIPT = Path(sys.executable).parent / "mii"  # the installed console script
GREEDY = dict(do_sample=False, ignore_eos=True)  # a fixed text and length on every run


def our_processes() -> Dict[int, str]:
    """pid -> deployment record path, for processes started by this session's deployments."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        records = [a for a in args if a.startswith(_HOME)]
        if records and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry)] = records[0]
    return found


def kill_deployment(name: str) -> None:
    """Cleanup after a failed test: SIGKILL the processes of deployment ``name`` only."""
    from mii_core.deploy import registry

    record = str(registry.record_path(name))
    for pid, path in our_processes().items():
        if path == record:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_ours() -> None:
    """Last-resort cleanup of this session's processes (only ours, by pid)."""
    for pid in our_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False).

    The timeout is a deadline against hanging, not a bound the test asserts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- ports ---------------------------------------------------------------------------------
_PORT_TAKEN = re.compile(r"already in use|the port is in use|address in use", re.IGNORECASE)


def port_was_taken(error: BaseException) -> bool:
    """True if ``error`` (PortInUseError, or a start-up failure whose log tail says a
    server could not bind) means a port picked for the deployment was taken meanwhile."""
    from mii.errors import DeploymentStartupError, PortInUseError

    return isinstance(error, PortInUseError) or (
        isinstance(error, DeploymentStartupError) and bool(_PORT_TAKEN.search(str(error))))


@contextmanager
def environment(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block (a deployment's processes inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def serve(model: str, hooks: Optional["Hooks"] = None, attempts: int = 4, **kwargs: Any) -> Any:
    """``mii.serve`` on ports that are picked for each attempt, and a new attempt when one
    of them was taken before the deployment's servers bound it (ports are free when
    picked, but another process may bind them in the seconds before a server does).
    Ports the caller gives are used as given, without retrying."""
    import mii
    from mii_core.deploy.ports import free_port

    for attempt in range(attempts):
        chosen = dict(kwargs)
        picked = "port_number" not in chosen
        chosen.setdefault("port_number", free_port())
        if chosen.get("enable_restful_api"):
            picked = picked or "restful_api_port" not in chosen
            chosen.setdefault("restful_api_port", free_port())
        try:
            with environment(hooks.env() if hooks else {}):
                return mii.serve(model, **chosen)
        except Exception as error:
            if not picked or attempt + 1 == attempts or not port_was_taken(error):
                raise


@contextmanager
def deployed(model: str, name: str, hooks: Optional["Hooks"] = None,
             **kwargs: Any) -> Iterator[Any]:
    """``serve`` (ports picked, retried if taken); the deployment is terminated on the way
    out, and its processes killed by pid if terminating fails (the failure is still raised)."""
    client = serve(model, deployment_name=name, hooks=hooks, **kwargs)
    try:
        yield client
    finally:
        if hooks is not None:
            hooks.release()
            hooks.release_loading()
        try:
            client.terminate_server()
        except Exception:
            kill_deployment(name)
            raise


@contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections for the whole block: bound here and never listened
    on, so no other process can listen there meanwhile (unlike a port freed earlier)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def listening(pid: int) -> Set[Tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    import psutil

    return {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def ours_listening(port: int) -> List[int]:
    """Pids of this session's deployment processes that listen on ``port``."""
    found = []
    for pid in our_processes():
        try:
            if any(p == port for _, p in listening(pid)):
                found.append(pid)
        except Exception:  # noqa: BLE001 - the process ended meanwhile
            continue
    return found


# -- logs ----------------------------------------------------------------------------------
class LogWatch:
    """What a deployment's log says from the moment this object is made."""

    def __init__(self, name: str) -> None:
        from mii_core.deploy import registry

        self.path = registry.log_path(name)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def text(self) -> str:
        with open(self.path, errors="replace") as handle:
            handle.seek(self.offset)
            return handle.read()

    def health_missed(self) -> bool:
        """Did the load balancer see a replica turn unhealthy (a missed health check)?"""
        return " is unhealthy" in self.text()


# -- the `mii` console script and fresh interpreters ---------------------------------------
def run_mii(*args: str, timeout: float = 180,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run the installed ``mii`` console script (the exit status is the script's), with
    ``env`` added to this environment."""
    return subprocess.run([str(MII_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env={**os.environ, **(env or {})})


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same environment) and return the result."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


# -- the test hook plugin --------------------------------------------------------------------
HOLD_STOP = "<<mii-test: hold the engine loop>>"
REJECT_STOP = "<<mii-test: reject in mii_request_started>>"
HOOKS_PLUGIN = textwrap.dedent('''
    """mii's test hook plugin: records every hook call; holds a replica on request.

    Active only in processes whose environment names MII_TEST_HOOKS_DIR (deployments
    that tests start with ``conftest.Hooks``). A request whose stop strings include
    HOLD_STOP stops the replica's engine loop, right after that request finished, for
    as long as the file ``hold`` exists; one with REJECT_STOP makes mii_request_started
    raise; a replica loading while ``hold-loading`` exists
    waits before it serves. With MII_TEST_STUBBORN_CHILD set, every replica starts a
    child that ignores SIGTERM (in the replica's process group).
    """
    import json
    import os
    import subprocess
    import sys
    import time

    from mii.plugins import hookimpl

    HOLD_STOP = {hold_stop!r}
    REJECT_STOP = {reject_stop!r}
    STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[2], 'w').close(); time.sleep(600)")


    def _dir():
        return os.environ.get("MII_TEST_HOOKS_DIR")


    def _record(hook, **fields):
        if _dir():
            line = json.dumps(dict(hook=hook, pid=os.getpid(), time=time.time(), **fields))
            with open(os.path.join(_dir(), "events.jsonl"), "a") as handle:
                handle.write(line + "\\n")


    def _wait_while(name):
        deadline = time.time() + 120  # never hold a replica for ever
        while os.path.exists(os.path.join(_dir(), name)) and time.time() < deadline:
            time.sleep(0.005)


    @hookimpl
    def mii_deployment_started(record):
        _record("deployment_started", name=record.name, state=record.state)


    @hookimpl
    def mii_deployment_stopped(record, reason):
        _record("deployment_stopped", name=record.name, reason=reason)


    @hookimpl
    def mii_engine_loaded(model_config, loaded, rank):
        if not _dir():
            return
        _record("engine_loaded", replica=rank.replica, rank=rank.rank,
                tokenizer=model_config.tokenizer, description=loaded.description)
        if os.environ.get("MII_TEST_STUBBORN_CHILD"):
            marker = os.path.join(_dir(), f"stubborn-{{os.getpid()}}")
            child = subprocess.Popen([sys.executable, "-c", STUBBORN, os.environ["MII_RECORD"],
                                      marker])
            while not os.path.exists(marker) and child.poll() is None:
                time.sleep(0.01)
            _record("stubborn_child", child=child.pid)
        if os.path.exists(os.path.join(_dir(), "hold-loading")):
            _record("loading_held", replica=rank.replica)
            _wait_while("hold-loading")


    @hookimpl
    def mii_request_started(request):
        _record("request_started", id=request.request_id, replica=request.replica,
                prompts=request.prompt_count, prompt_tokens=list(request.prompt_tokens))
        if REJECT_STOP in request.params.stop:
            raise ValueError("rejected by the test's mii_request_started hook")


    @hookimpl
    def mii_add_cli_commands(subparsers):
        if _dir():
            command = subparsers.add_parser("test-hooks", help="a command the test plugin adds")
            command.add_argument("word")
            command.set_defaults(func=lambda args: print(f"test hooks say {{args.word}}") or 3)


    @hookimpl
    def mii_request_finished(request, outcome):
        _record("request_finished", id=request.request_id, replica=request.replica,
                outcome=outcome)
        if _dir() and HOLD_STOP in request.params.stop:
            _record("held", replica=request.replica)
            _wait_while("hold")
            _record("released", replica=request.replica)
''').format(hold_stop=HOLD_STOP, reject_stop=REJECT_STOP)


def _install_hooks_plugin() -> Path:
    """The plugin module and its distribution metadata (an entry point in ``mii.plugins``),
    in a directory that deployments with hooks get on their PYTHONPATH."""
    root = Path(_HOME) / "test-plugin"
    if not (root / "mii_test_hooks.py").exists():
        info = root / "mii_test_hooks-0.1.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mii-test-hooks\n"
                                       "Version: 0.1\n")
        (info / "entry_points.txt").write_text("[mii.plugins]\ntest_hooks = mii_test_hooks\n")
        (root / "mii_test_hooks.py").write_text(HOOKS_PLUGIN)
    return root


class Hooks:
    """The test hook plugin in the processes of one deployment (pass to ``serve`` /
    ``deployed``): ``events()`` is what its hooks saw, in order; ``hold()`` stops the
    replica's engine loop until ``release()``, so requests queue and none finishes while
    the replica still answers its health check and Info; ``hold_loading()`` makes a
    replica that starts (or restarts) wait before it serves."""

    def __init__(self, directory: Path, stubborn_child: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stubborn_child = stubborn_child

    def env(self) -> Dict[str, str]:
        paths = [str(_install_hooks_plugin())] + (
            [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = {"PYTHONPATH": os.pathsep.join(paths), "MII_TEST_HOOKS_DIR": str(self.dir)}
        if self.stubborn_child:
            env["MII_TEST_STUBBORN_CHILD"] = "1"
        return env

    def events(self, hook: Optional[str] = None, **match: Any) -> List[Dict[str, Any]]:
        path = self.dir / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if (hook is None or e["hook"] == hook)
                and all(e.get(k) == v for k, v in match.items())]

    def hold(self, client: Any) -> int:
        """Hold the engine loop of the replica that serves the next request; its index."""
        held = len(self.events("held"))
        (self.dir / "hold").touch()
        reply = client("hold", max_new_tokens=1, stop=[HOLD_STOP], **GREEDY)[0]
        assert wait_until(lambda: len(self.events("held")) > held), "the loop was not held"
        return reply.replica

    def release(self) -> None:
        (self.dir / "hold").unlink(missing_ok=True)

    @contextmanager
    def held(self, client: Any) -> Iterator[int]:
        replica = self.hold(client)
        try:
            yield replica
        finally:
            self.release()

    def hold_loading(self) -> None:
        (self.dir / "hold-loading").touch()

    def release_loading(self) -> None:
        (self.dir / "hold-loading").unlink(missing_ok=True)


def queue_depth(client: Any, replica: int = 0) -> int:
    """Prompts waiting in ``replica``'s queue, from Info."""
    return client.info()["replicas"][replica]["stats"]["queue_depth"]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves processes of a deployment it started running.

    Deployments that were already running before the test (module fixtures) may
    restart their processes; anything belonging to a new deployment must be gone.
    """
    existing = set(our_processes().values())
    yield

    def leaked() -> List[int]:
        return sorted(p for p, record in our_processes().items() if record not in existing)

    wait_until(lambda: not leaked(), 10)
    left = leaked()
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"test leaked processes {left}")


def pytest_sessionfinish(session, exitstatus) -> None:
    kill_ours()


@pytest.fixture(scope="session")
def mii_home() -> Path:
    """The registry/log root of this session."""
    return Path(_HOME)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the offline tiny Llama (built once per session)."""
    from mii.testing.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def hooks(tmp_path) -> Hooks:
    """A fresh ``Hooks`` for a deployment this test starts."""
    return Hooks(tmp_path / "hooks")


@pytest.fixture
def no_process_started(monkeypatch) -> Iterator[None]:
    """Make ``serve()`` fail the test the moment it would start a process: for checks that
    must refuse a configuration before anything runs. Records it wrote are removed."""
    from mii_core.api import serve as serve_module
    from mii_core.deploy import registry

    def popen(args, *rest, **kwargs):
        raise AssertionError(f"serve() started a process before refusing: {args}")

    monkeypatch.setattr(serve_module, "subprocess",
                        types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL,
                                              TimeoutExpired=subprocess.TimeoutExpired))
    before = {r.name for r in registry.list_records()}
    yield
    for record in registry.list_records():
        if record.name not in before and not registry.supervisor_alive(record):
            registry.remove(record.name)


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """A module-wide deployment of the tiny model (transformers engine), terminated at the end."""
    with deployed(tiny_model, f"tiny-{tmp_path_factory.mktemp('d').name}",
                  engine="transformers") as client:
        yield client
