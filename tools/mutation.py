#!/usr/bin/env python3
"""Mutation testing of selected modules with cosmic-ray, in a copy of the work tree.

Not run by CI (it takes tens of minutes). Usage, from the repository root::

    .venv/bin/python tools/mutation.py                  # every module below
    .venv/bin/python tools/mutation.py models sampling  # some of them
    .venv/bin/python tools/mutation.py --before         # without tests/unit/test_mutants_*.py
    .venv/bin/python tools/mutation.py --rerun-survivors models   # re-test only the survivors
    .venv/bin/python tools/mutation.py --sample 7 supervisor      # every 7th mutant only
    .venv/bin/python tools/mutation.py --unit-only supervisor     # no deployment tests

What it does (see docs/testing.md, "Mutation testing"):

1. copies the work tree (without .git, .venv, caches) to ``--work`` (default
   /tmp/mutwork): cosmic-ray rewrites source files in place, so it never touches
   the checkout;
2. installs cosmic-ray (pinned) into its own venv (default /tmp/mutvenv-cr); the tests
   run with the project's interpreter and ``PYTHONPATH=<copy>``, which comes before
   the editable install, so the copy's (mutated) modules are the ones imported, in
   the test process and in every process a deployment test starts (checked);
3. per module: ``cosmic-ray init`` / ``baseline`` / ``exec`` with a test command
   (``tools/mutation.py _test MODULE``) that runs that module's test stages in
   order (unit tests first, deployment tests last, stopping at the first failure);
4. prints the score table (killed / (killed + survived)) and writes every survivor's
   diff to ``<work>/.mutation/survivors-MODULE.txt``.

One worker only (cosmic-ray's ``local`` distributor). To keep a run short on two
cores, pytest runs are forked from a server that imported torch, transformers and
pytest once but none of the project's modules (``--no-prefork``: a fresh
interpreter per run instead), and deployment tests share one prebuilt tiny model.

The supervisor's mutants run in a PID namespace of their own (``SANDBOXED``; needs
``unshare`` as root): a mutant of its process-tree code can otherwise SIGKILL every
process of the machine (one did). Scores and survivors: docs/testing.md.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COSMIC_RAY = "cosmic-ray==8.7.0"
ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("mii", "mii_core", "mii_engines", "mii_transport")
PYTEST = ["-q", "-x", "-p", "no:cacheprovider", "-p", "mutation_plugin"]
UNIT_TIMEOUT = 120
DEPLOYMENT_TIMEOUT = 180  # a deployment test takes up to ~40 s here; a hang counts as a kill

# module -> (path, stages); a stage is (timeout_s, pytest args). Files that do not exist
# (the test_mutants_* files with --before) are left out; a stage left empty is skipped.
MUTANTS = "tests/unit/test_mutants_{}.py"
MODULES = {
    "models": ("mii_core/config/models.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("models"), "tests/unit/test_config.py",
                        "tests/unit/test_docs.py::test_configuration_reference_is_current",
                        "tests/unit/test_docs.py::test_configuration_reference_covers_every_field"]),
    ]),
    "kwargs": ("mii_core/config/kwargs.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("kwargs"), "tests/unit/test_config.py"]),
    ]),
    "round_robin": ("mii_core/routing/schedulers/round_robin.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("schedulers")]),
    ]),
    "least_outstanding": ("mii_core/routing/schedulers/least_outstanding.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("schedulers")]),
    ]),
    "detokenize": ("mii_engines/runtime/detokenize.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("detokenize"), "tests/unit/test_detokenize.py"]),
    ]),
    "sampling": ("mii_engines/runtime/sampling.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("sampling")]),
        (UNIT_TIMEOUT, ["tests/unit/test_fast_path.py", "-k", "sampler or chunked_argmax"]),
    ]),
    "auth": ("mii_transport/grpc/auth.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("auth")]),
        (DEPLOYMENT_TIMEOUT, ["tests/deployment/test_security.py", "-k",
                              "token_holder or wrong_or_missing or every_rpc"]),
    ]),
    "supervisor": ("mii_core/control/supervisor.py", [
        (UNIT_TIMEOUT, [MUTANTS.format("supervisor")]),
        (DEPLOYMENT_TIMEOUT, [
            "tests/deployment/test_faults.py::test_replica_that_keeps_crashing_stops_the_deployment[1]",
            "tests/deployment/test_faults.py::"
            "test_killed_load_balancer_is_restarted_on_the_same_port_and_sigint_stops_all",
            "tests/deployment/test_rest_gateway.py::test_gateway_dies_with_terminate_server",
        ]),
    ]),
}
DEPLOYMENT_MODULES = {"auth", "supervisor"}
# Modules whose mutants can signal arbitrary pids (the supervisor kills what it finds in
# /proc: a mutant of _group_members can "find" every process of the machine). Their test
# command runs in a PID namespace of its own (``unshare``, as root), with its own /proc,
# so that a mutant can only reach the processes of its own test run; no prefork server
# (its forks would run outside the namespace).
SANDBOXED = {"supervisor"}
SANDBOX = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
# Imported once by the prefork server; none of them imports a project module.
PRELOAD = ["pytest", "_pytest.python", "pytest_timeout", "torch", "numpy", "pydantic", "grpc",
           "google.protobuf", "safetensors", "tokenizers", "transformers",
           "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.tokenization_auto", "psutil", "httpx", "fastapi"]

PLUGIN = '''"""pytest plugin of tools/mutation.py: deployment tests reuse one prebuilt tiny model."""
import os


def pytest_configure(config):
    cached = os.environ.get("MUT_TINY_MODEL")
    if cached:
        import mii.testing.tiny_model as tiny

        tiny.build_tiny_model = lambda *args, **kwargs: __import__("pathlib").Path(cached)
'''


def log(message: str) -> None:
    print(f"[mutation] {message}", flush=True)


# -- the copy and the tools ------------------------------------------------------------
def make_copy(work: Path, before: bool) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    excludes = [".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info", ".mutation"]
    tar = ["tar", "-C", str(ROOT)] + [f"--exclude={e}" for e in excludes] + ["-cf", "-", "."]
    with subprocess.Popen(tar, stdout=subprocess.PIPE) as source:
        subprocess.run(["tar", "-C", str(work), "-xf", "-"], stdin=source.stdout, check=True)
    if source.returncode:
        raise SystemExit("copying the work tree failed")
    if before:
        for path in glob.glob(str(work / "tests/unit/test_mutants_*.py")):
            os.remove(path)
    (work / ".mutation").mkdir()
    (work / ".mutation" / "mutation_plugin.py").write_text(PLUGIN)
    for path, _ in MODULES.values():  # restored before each module's run (see run_module)
        pristine = work / ".mutation" / "pristine" / path
        pristine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / path, pristine)


def ensure_cosmic_ray(venv: Path) -> Path:
    exe = venv / "bin" / "cosmic-ray"
    if not exe.exists():
        log(f"installing {COSMIC_RAY} into {venv}")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", COSMIC_RAY], check=True)
    return exe


def env_for(work: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(work), str(work / ".mutation")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def check_imports(work: Path) -> None:
    """The copy's modules must be the ones imported (the editable install points at ROOT)."""
    code = ("import mii, mii_core, mii_engines, mii_transport, importlib.metadata as m;"
            "print(mii.__file__, mii_core.__file__, mii_engines.__file__, mii_transport.__file__);"
            "e = [e for e in m.entry_points(group='mii.schedulers') if e.name == 'round_robin'];"
            "import importlib; print(importlib.import_module(e[0].module).__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env_for(work),
                         capture_output=True, text=True, check=True).stdout
    log(f"the tests import: {out.split()}")
    if not all(path.startswith(str(work) + "/") for path in out.split()):
        raise SystemExit(f"the tests would not import the copy in {work}")


# -- the prefork server ----------------------------------------------------------------
def _recv(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def serve(sock_path: str) -> None:
    """Import PRELOAD, then fork one pytest run per request (one at a time)."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(PROJECT_PACKAGES))
    if loaded:
        raise SystemExit(f"the prefork server imported project packages {loaded}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        try:
            request = json.loads(_recv_message(conn))
        except (ValueError, OSError):  # the readiness probe, or a client that went away
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:  # the child: one pytest run
            server.close()
            conn.close()
            os.setsid()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            tempfile.tempdir = None
            sys.path[0] = request["cwd"]  # as ``python -m pytest`` run from there
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 3
            try:
                import pytest

                code = int(pytest.main(request["args"]))
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.time() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.time() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                code = 124
                break
            time.sleep(0.02)
        try:
            conn.sendall(str(code).encode())
        except OSError:
            pass
        conn.close()


def _recv_message(conn: socket.socket) -> bytes:
    size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
    return conn.recv(size, socket.MSG_WAITALL)


def run_pytest(args: list, timeout: float, env: dict, log_path: str) -> int:
    sock = env.get("MUT_SOCKET")
    conn = None
    if sock:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(sock)
        except OSError:  # no server: a fresh interpreter (never a false kill)
            conn.close()
            conn = None
    if conn is None:
        with open(log_path, "w") as out:
            try:
                return subprocess.run([sys.executable, "-m", "pytest", *args], env=env,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return 124
    message = json.dumps({"args": args, "timeout": timeout, "env": env, "cwd": os.getcwd(),
                          "log": log_path}).encode()
    conn.sendall(len(message).to_bytes(8, "big") + message)
    conn.shutdown(socket.SHUT_WR)
    return int(_recv(conn).decode() or 1)


# -- the test command cosmic-ray runs --------------------------------------------------
def _processes_under(path: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if path in args:
                found.append(int(entry))
    return found


def stages_of(module: str) -> list:
    """MODULE's stages that have tests in this tree, with the deselected tests."""
    deselect_file = Path(".mutation") / f"deselect-{module}.json"
    deselected = json.loads(deselect_file.read_text()) if deselect_file.exists() else {}
    stages = []
    for number, (timeout, args) in enumerate(MODULES[module][1]):
        if os.environ.get("MUT_UNIT_ONLY") and any(a.startswith("tests/deployment/") for a in args):
            continue
        kept = [a for a in args if not a.startswith("tests/") or Path(a.split("::")[0]).exists()]
        if any(a.startswith("tests/") for a in kept):
            for nodeid in deselected.get(str(number), []):
                kept += ["--deselect", nodeid]
            stages.append((number, timeout, kept))
    return stages


def test_command(module: str, stop_at_failure: bool = True) -> int:
    """Run MODULE's stages; exit 0 if every test passed (the mutant survived). A stage
    whose tests are all deselected (pytest's exit 5) passes."""
    scratch = tempfile.mkdtemp(prefix="mut-run-", dir=os.environ.get("MUT_SCRATCH"))
    env = dict(os.environ, TMPDIR=scratch)
    if module in SANDBOXED:
        env.pop("MUT_SOCKET", None)
        if os.getpid() != 1:  # not the first process of a PID namespace: refuse
            print(f"{module}: refusing to run outside a PID namespace", file=sys.stderr)
            return 2
        # pids as large as on a machine (a fresh namespace counts from 2: ints up to 256
        # are cached, which would make ``pid is pgid`` mutants look equivalent)
        with contextlib.suppress(OSError):
            Path("/proc/sys/kernel/ns_last_pid").write_text("30000")
    status = 0
    try:
        for number, timeout, args in stages_of(module):
            log_path = os.path.join(scratch, f"stage{number}.log")
            options = PYTEST if stop_at_failure else [a for a in PYTEST if a != "-x"]
            code = run_pytest(options + [f"--timeout={timeout}", *args], timeout + 20, env,
                              log_path)
            with open(log_path, errors="replace") as handle:
                text = handle.read()
            if not stop_at_failure:  # the baseline probe: remember what fails unmutated
                failed = [line.split()[1] for line in text.splitlines()
                          if line.startswith(("FAILED ", "ERROR ")) and "::" in line]
                print(json.dumps({"stage": number, "failed": failed}))
            print(f"--- stage {number} ({' '.join(args)}): exit {code}\n{text[-3000:]}")
            if code not in (0, 5):
                status = 1
                if stop_at_failure:
                    break
    finally:
        # A killed run may leave deployment processes behind (their own sessions);
        # they are the ones whose command line names this run's scratch directory.
        for pid in _processes_under(scratch):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(scratch, ignore_errors=True)
    return status


# -- cosmic-ray sessions and the report ------------------------------------------------
def write_config(work: Path, module: str) -> Path:
    path, stages = MODULES[module]
    timeout = sum(t + 30 for t, _ in stages)
    command = f"{sys.executable} {work / 'tools' / 'mutation.py'} _test {module}"
    if module in SANDBOXED:
        command = " ".join(SANDBOX) + " " + command
    config = work / ".mutation" / f"{module}.toml"
    config.write_text(f'[cosmic-ray]\nmodule-path = "{path}"\ntimeout = {timeout}.0\n'
                      f'excluded-modules = []\ntest-command = "{command}"\n\n'
                      f'[cosmic-ray.distributor]\nname = "local"\n')
    return config


def keep_every(db: Path, step: int) -> int:
    """Mark all but every ``step``-th mutant (in source order) as skipped."""
    with sqlite3.connect(db) as con:
        jobs = [row[0] for row in con.execute(
            "SELECT job_id FROM mutation_specs ORDER BY start_pos_row, start_pos_col, "
            "operator_name, occurrence")]
        skipped = [j for i, j in enumerate(jobs) if i % step]
        con.executemany("INSERT INTO work_results (job_id, worker_outcome) VALUES (?, 'SKIPPED')",
                        [(j,) for j in skipped])
    return len(jobs) - len(skipped)


def forget_survivors(db: Path) -> int:
    """Make the survivors pending again (and any kill without test output: a test command
    that could not run)."""
    with sqlite3.connect(db) as con:
        return con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED' OR "
                           "(test_outcome = 'KILLED' AND COALESCE(output, '') = '')").rowcount


def summarize(work: Path, module: str, db: Path) -> dict:
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0, "other": 0}
    survivors = []
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT s.operator_name, s.start_pos_row, s.occurrence, r.worker_outcome, "
            "r.test_outcome, r.diff FROM mutation_specs s LEFT JOIN work_results r "
            "ON s.job_id = r.job_id ORDER BY s.start_pos_row, s.operator_name, s.occurrence")
        for operator, line, occurrence, worker, outcome, diff in rows:
            if worker == "SKIPPED":
                counts["skipped"] += 1
            elif outcome in ("KILLED", "SURVIVED", "INCOMPETENT"):
                counts[outcome.lower()] += 1
                if outcome == "SURVIVED":
                    survivors.append(f"== {module}:{line} {operator.split('/')[-1]} "
                                     f"#{occurrence}\n{diff}\n")
            else:
                counts["other"] += 1
    (work / ".mutation" / f"survivors-{module}.txt").write_text("".join(survivors))
    tested = counts["killed"] + counts["survived"]
    counts["score"] = 100.0 * counts["killed"] / tested if tested else 0.0
    return counts


def check_baseline(cosmic: Path, config: Path, work: Path, env: dict, module: str) -> None:
    """The test command must pass on the unmutated code (else every mutant looks killed)."""
    baseline = subprocess.run([str(cosmic), "baseline", str(config)], cwd=work, env=env,
                              capture_output=True, text=True)
    if baseline.returncode:
        raise SystemExit(f"{module}: the tests fail without mutations:\n"
                         f"{baseline.stdout[-4000:]}{baseline.stderr[-4000:]}")


def run_module(work: Path, cosmic: Path, module: str, env: dict, sample: int,
               rerun: bool) -> dict:
    path = MODULES[module][0]  # an interrupted run may have left a mutant on disk
    shutil.copyfile(work / ".mutation" / "pristine" / path, work / path)
    config = write_config(work, module)
    db = work / ".mutation" / f"{module}.sqlite"
    if rerun and db.exists():
        check_baseline(cosmic, config, work, env, module)
        log(f"{module}: re-testing {forget_survivors(db)} survivors")
    else:
        # Tests that fail without any mutation (a work tree in the middle of a change)
        # are deselected for this session, and listed.
        (work / ".mutation" / f"deselect-{module}.json").unlink(missing_ok=True)
        sandbox = SANDBOX if module in SANDBOXED else []
        probe = subprocess.run([*sandbox, sys.executable, str(work / "tools" / "mutation.py"),
                                "_probe", module], cwd=work, env=env, capture_output=True,
                               text=True)
        failing = {}
        for line in probe.stdout.splitlines():
            if line.startswith('{"stage"'):
                entry = json.loads(line)
                if entry["failed"]:
                    failing[str(entry["stage"])] = entry["failed"]
        (work / ".mutation" / f"deselect-{module}.json").write_text(json.dumps(failing))
        for stage, nodeids in failing.items():
            log(f"{module}: deselected (they fail unmutated): {', '.join(nodeids)}")
        subprocess.run([str(cosmic), "init", str(config), str(db), "--force"], cwd=work,
                       env=env, check=True, stdout=subprocess.DEVNULL)
        if sample > 1:
            log(f"{module}: testing {keep_every(db, sample)} mutants (every {sample}th)")
        check_baseline(cosmic, config, work, env, module)
    started = time.time()
    subprocess.run([str(cosmic), "exec", str(config), str(db)], cwd=work, env=env, check=True)
    counts = summarize(work, module, db)
    counts["minutes"] = (time.time() - started) / 60
    log(f"{module}: {counts}")
    return counts


def start_server(work: Path, env: dict) -> tuple:
    sock = str(work / ".mutation" / "prefork.sock")
    if os.path.exists(sock):  # left by an earlier run
        os.unlink(sock)
    proc = subprocess.Popen([sys.executable, str(work / "tools" / "mutation.py"), "_serve", sock],
                            cwd=work, env=env)
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("the prefork server did not start")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)  # listening; the server drops a connection without a request
            return proc, sock
        except OSError:
            time.sleep(0.2)
        finally:
            probe.close()


def main(argv: list) -> int:
    if argv[:1] == ["_serve"]:
        serve(argv[1])
        return 0
    if argv[:1] == ["_test"]:
        return test_command(argv[1])
    if argv[:1] == ["_probe"]:
        return test_command(argv[1], stop_at_failure=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)}")
    parser.add_argument("--work", default="/tmp/mutwork", type=Path)
    parser.add_argument("--venv", default="/tmp/mutvenv-cr", type=Path)
    parser.add_argument("--before", action="store_true",
                        help="leave tests/unit/test_mutants_*.py out of the copy")
    parser.add_argument("--sample", type=int, default=1, help="test every Nth mutant only")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="keep the copy and the results; re-test the survivors only")
    parser.add_argument("--unit-only", action="store_true",
                        help="leave the deployment-test stages out (supervisor, auth)")
    parser.add_argument("--no-prefork", action="store_true")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = set(modules) - set(MODULES)
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}")
    work = args.work.resolve()
    if work == ROOT or ROOT in work.parents:
        parser.error("--work must be outside the checkout")
    if args.rerun_survivors:  # the copy stays; only the tests are refreshed
        for path in glob.glob(str(ROOT / "tests/unit/test_mutants_*.py")) + [__file__]:
            target = work / Path(path).resolve().relative_to(ROOT)
            shutil.copyfile(path, target)
    else:
        make_copy(work, args.before)
    cosmic = ensure_cosmic_ray(args.venv)
    if SANDBOXED & set(modules):
        probe = subprocess.run([*SANDBOX, "true"], capture_output=True, text=True)
        if probe.returncode:
            raise SystemExit(f"{', '.join(sorted(SANDBOXED & set(modules)))} needs a PID "
                             f"namespace (unshare, as root): {probe.stderr.strip()}")
    check_imports(work)
    scratch = work / ".mutation" / "scratch"
    scratch.mkdir(exist_ok=True)
    env = env_for(work, MUT_SCRATCH=str(scratch))
    if args.unit_only:
        env["MUT_UNIT_ONLY"] = "1"
    elif DEPLOYMENT_MODULES & set(modules):
        tiny = work / ".mutation" / "tiny-llama"
        subprocess.run([sys.executable, "-m", "mii.testing.tiny_model", str(tiny)], cwd=work,
                       env=env, check=True, stdout=subprocess.DEVNULL)
        env["MUT_TINY_MODEL"] = str(tiny)
    server = None
    if not args.no_prefork:
        server, env["MUT_SOCKET"] = start_server(work, env)
    results = {}
    try:
        for module in modules:
            results[module] = run_module(work, cosmic, module, env, args.sample,
                                         args.rerun_survivors)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    print("\n| module | mutants | killed | survived | incompetent | skipped | score | minutes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for module, c in results.items():
        total = c["killed"] + c["survived"] + c["incompetent"] + c["skipped"] + c["other"]
        print(f"| {module} | {total} | {c['killed']} | {c['survived']} | {c['incompetent']} | "
              f"{c['skipped']} | {c['score']:.1f} % | {c['minutes']:.1f} |")
    print(f"\nsurvivors' diffs: {work / '.mutation'}/survivors-MODULE.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
