"""Multi-host deployments, run for real: hosts ``a`` and ``b`` are network namespaces with
their own address, hostname and sshd (tests/helpers/multihost.py), this machine is the
head (supervisor and load balancer), and the remote ranks are started by the DeepSpeed
launcher over pdsh and ssh from a hostfile, on CPU (gloo between hosts). ``c`` is a
third namespace with no sshd, for a client that is on no host of the deployment.

The tests of one deployment (``two_hosts``: one replica per host, a token, TLS on the
load balancer) share it, in file order; the last one terminates it from ``c``. They
skip, saying what is missing, without root, network namespaces, sshd or pdsh. The
tensor-parallel test starts one more deployment and runs only with MII_MULTIHOST_FULL=1
(see docs/multi-host.md).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import GREEDY, Hooks, LogWatch, environment, kill_deployment, our_processes, \
    queue_depth, serve, wait_until
from helpers.multihost import Cluster, cluster, python_on  # noqa: F401  (a fixture)

import mii
from mii.errors import AuthenticationError
from mii_core.deploy import registry

NAME = "multihost"
FULL = os.environ.get("MII_MULTIHOST_FULL", "0") not in ("0", "")
SHORT = dict(max_new_tokens=4, **GREEDY)
TOKEN = "multihost-test-token"


def rank_processes(host, record_file: str) -> Dict[int, Dict[str, str]]:
    """pid -> (replica, RANK) of the deployment's ranks on ``host``."""
    found = {}
    for pid, cmdline in host.processes().items():
        if "-m mii_core.control.remote_main rank" in cmdline and record_file in cmdline:
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
            found[pid] = {"replica": cmdline.split(record_file, 1)[1].split()[0],
                          "rank": env.get("RANK", "?")}
    return found


def leftovers(cluster: Cluster) -> Dict[str, Dict[int, str]]:
    """What runs on the hosts besides their sshd listeners (ssh sessions, ranks)."""
    return {short: procs for short, host in cluster.hosts.items()
            if (procs := host.processes())}


def served_by(client, count: int) -> List[int]:
    """The replica of each of ``count`` requests sent one after another."""
    return [client("DeepSpeed is", **SHORT)[0].replica for _ in range(count)]


@pytest.fixture(scope="module")
def two_hosts(cluster, tmp_path_factory, request):
    """replica_num=2, device_map one replica on ``a``, one on ``b``, from a hostfile; the
    load balancer on the head's bridge address, with TLS (a certificate for the head's
    name and address) and a token. Carries the test hook plugin (remote ranks get its
    variable through the DeepSpeed launcher's env file). The model is asked for once the
    hosts are up: a session fixture in the signature is made first, even for a skip."""
    tiny_model = request.getfixturevalue("tiny_model")
    work = tmp_path_factory.mktemp("multihost")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={cluster.head_name}", "-addext",
                    f"subjectAltName=DNS:{cluster.head_name},IP:{cluster.head_address}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    hooks = Hooks(work / "hooks")
    remote = {"MII_TEST_HOOKS_DIR": hooks.env()["MII_TEST_HOOKS_DIR"]}
    with environment(cluster.env(remote)):
        client = serve(tiny_model, hooks=hooks, deployment_name=NAME, engine="transformers",
                       replica_num=2, hostfile=cluster.hostfile({"a": 1, "b": 1}),
                       device_map={cluster["a"].name: [[0]], cluster["b"].name: [[0]]},
                       host=cluster.head_address, auth_token=TOKEN, tls_cert_file=str(cert),
                       tls_key_file=str(key), max_restarts=3)
    try:
        yield client, hooks, str(cert)
    finally:
        hooks.release()
        if registry.load(NAME) is not None:
            try:
                client.terminate_server()
            except Exception:
                kill_deployment(NAME)
                raise
        assert wait_until(lambda: not leftovers(cluster), 30), leftovers(cluster)


def test_one_replica_per_host_and_round_robin_reaches_both(cluster, two_hosts):
    client, _, _ = two_hosts
    record = registry.load(NAME)
    a, b = cluster["a"].name, cluster["b"].name
    assert [(r.hostname, r.hosts) for r in record.replicas] == [(a, {a: [0]}), (b, {b: [0]})]
    replicas = client.info()["replicas"]
    assert [r["address"] for r in replicas] == [
        f"{cluster['a'].name}:{record.replicas[0].port}",
        f"{cluster['b'].name}:{record.replicas[1].port}"]
    assert all(r["healthy"] for r in replicas)
    # Each replica's rank runs on its own host, none on the head.
    record_file = str(registry.record_path(NAME))
    on_a, on_b = (rank_processes(cluster[h], record_file) for h in "ab")
    assert [p["replica"] for p in on_a.values()] == ["0"]
    assert [p["replica"] for p in on_b.values()] == ["1"]
    ranks = {pid for pid, path in our_processes().items() if path == record_file and
             b"-m\0mii_core.control.remote_main\0rank" in Path(f"/proc/{pid}/cmdline").read_bytes()}
    assert ranks == on_a.keys() | on_b.keys()
    routed = [r["routed"] for r in replicas]
    assert sorted(served_by(client, 6)) == [0, 0, 0, 1, 1, 1]
    assert [r["routed"] - before for r, before in zip(client.info()["replicas"], routed)] == [3, 3]
    # A remote replica listens on every interface of its host, in plaintext (TLS is the
    # load balancer's only), and asks for the token as the load balancer does.
    direct = replicas[1]["address"]
    with pytest.raises(AuthenticationError):
        mii.client(direct)("DeepSpeed is", **SHORT)
    assert mii.client(direct, token=TOKEN)("DeepSpeed is", **SHORT)[0].replica == 1


def test_a_cut_link_is_routed_around_and_the_host_rejoins(cluster, two_hosts):
    """Under load, the link to the host of a replica with requests in flight goes down:
    the load balancer marks it unhealthy within a bounded time, every request in flight
    there fails with UNAVAILABLE (none hangs), the other replica serves everything, and
    the replica rejoins once the link is back (its ranks lived on through the cut)."""
    client, hooks, _ = two_hosts
    record_file = str(registry.record_path(NAME))
    log = LogWatch(NAME)
    outcomes: Dict[int, object] = {}

    def send(i: int) -> None:
        try:
            outcomes[i] = client("DeepSpeed is", **SHORT)[0].replica
        except Exception as error:  # noqa: BLE001 - what each request ended with is the point
            outcomes[i] = error

    with hooks.held(client) as held:  # its engine loop stops: requests there stay in flight
        host = cluster["ab"[held]]
        ranks = set(rank_processes(host, record_file))
        senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for sender in senders:
            sender.start()
        assert wait_until(lambda: queue_depth(client, held) == 2, 30), "requests not in flight"
        cut_at = time.time()
        with cluster.cut("ab"[held]):
            assert wait_until(lambda: not client.info()["replicas"][held]["healthy"], 20)
            marked = time.time() - cut_at
            for sender in senders:
                sender.join(timeout=30)
            failed_at = time.time() - cut_at
            assert not any(s.is_alive() for s in senders), "a request hung on the cut link"
            # The two calls stuck on the cut host had sent nothing back: the load
            # balancer retries them on the other host (a stream that had sent output
            # would fail instead: tests/deployment/test_frozen_replica.py).
            assert sorted(outcomes.values(), key=str) == [1 - held] * 4, outcomes
            assert served_by(client, 4) == [1 - held] * 4  # routed around
            hooks.release()
        assert wait_until(lambda: client.info()["replicas"][held]["healthy"], 60)
        rejoined = time.time() - cut_at
    assert set(rank_processes(host, record_file)) == ranks  # the same processes: no restart
    assert sorted(served_by(client, 4)) == [0, 0, 1, 1]
    assert f"replica {held} at {host.name}" in log.text() and log.health_missed()
    print(f"cut: unhealthy after {marked:.1f}s, in-flight failed by {failed_at:.1f}s, "
          f"rejoined {rejoined:.1f}s after the cut")


def test_a_killed_remote_rank_restarts_on_its_host(cluster, two_hosts):
    client, _, _ = two_hosts
    record_file = str(registry.record_path(NAME))
    log = LogWatch(NAME)
    (old,) = rank_processes(cluster["b"], record_file)
    other = rank_processes(cluster["a"], record_file)
    killed_at = time.time()
    os.kill(old, signal.SIGKILL)  # the rank of replica 1, on host b
    assert wait_until(lambda: not client.info()["replicas"][1]["healthy"], 20)
    assert served_by(client, 2) == [0, 0]  # routed around meanwhile
    assert wait_until(lambda: client.info()["replicas"][1]["healthy"], 180)
    new = rank_processes(cluster["b"], record_file)
    assert list(new.values()) == [{"replica": "1", "rank": "0"}] and old not in new
    back = time.time() - killed_at
    assert rank_processes(cluster["a"], record_file) == other  # replica 0 untouched
    assert "replica-1 exited with status" in log.text() and "restart 1 of 3" in log.text()
    assert sorted(served_by(client, 4)) == [0, 0, 1, 1]
    print(f"killed remote rank: replica 1 serving again after {back:.1f}s")


@pytest.mark.skipif(not FULL, reason="one more deployment, about a minute on 2 cores: "
                    "set MII_MULTIHOST_FULL=1")
def test_tensor_parallel_2_with_one_rank_per_host_and_a_killed_supervisor(cluster, two_hosts,
                                                                          request):
    """A replica whose tensor_parallel (2) exceeds every host's slots (1) spans hosts a and
    b: rank 0 on a, rank 1 on b, gloo over the bridge; greedy tokens equal tp=1's. Then
    the supervisor is SIGKILLed: the ranks on both hosts end with it."""
    client, _, _ = two_hosts
    tiny_model = request.getfixturevalue("tiny_model")
    prompts = ["DeepSpeed is", "Seattle is a city", "The weather today", "Computers are"]
    params = dict(max_new_tokens=16, **GREEDY)
    name = "multihost-tp2"
    record_file = str(registry.record_path(name))
    with environment(cluster.env()):
        tp2 = serve(tiny_model, deployment_name=name, engine="deepspeed", tensor_parallel=2,
                    hostfile=cluster.hostfile({"a": 1, "b": 1}), host=cluster.head_address)
    try:
        (replica,) = registry.load(name).replicas
        assert (replica.hostname, replica.hosts) == (
            cluster["a"].name, {cluster["a"].name: [0], cluster["b"].name: [0]})
        assert list(rank_processes(cluster["a"], record_file).values()) == [
            {"replica": "0", "rank": "0"}]
        assert list(rank_processes(cluster["b"], record_file).values()) == [
            {"replica": "0", "rank": "1"}]
        assert [r.generated_text for r in tp2(prompts, **params)] == [
            r.generated_text for r in client(prompts, **params)]
        os.kill(registry.load(name).supervisor_pid, signal.SIGKILL)
        assert wait_until(lambda: not rank_processes(cluster["a"], record_file)
                          and not rank_processes(cluster["b"], record_file), 30)
        assert wait_until(lambda: record_file not in our_processes().values(), 30)
    finally:
        kill_deployment(name)


def test_a_client_in_a_third_namespace_generates_and_terminates(cluster, two_hosts):
    """``mii.client("host:port")`` from ``c`` (on no host of the deployment, reaching the
    head by name); its terminate_server() stops every process on every host."""
    client, _, cert = two_hosts
    record = registry.load(NAME)
    expected = client("DeepSpeed is", **SHORT)[0].generated_text
    address = f"{cluster.head_name}:{record.port}"
    code = (f"import mii\nc = mii.client({address!r}, token={TOKEN!r}, tls_root_cert={cert!r})\n"
            f"print(repr(c('DeepSpeed is', **{SHORT!r})[0].generated_text))\n"
            "c.terminate_server()\n")
    result = python_on(cluster["c"], code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(expected)
    assert wait_until(lambda: registry.load(NAME) is None, 60)
    assert wait_until(lambda: not leftovers(cluster), 30), leftovers(cluster)
    record_file = str(registry.record_path(NAME))
    assert wait_until(lambda: record_file not in our_processes().values(), 30)


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from helpers.multihost import Cluster
cluster = Cluster.start(ssh_hosts=("a",), clients=())
print(cluster.tag, flush=True)
sys.stdin.read()
"""


def test_what_a_killed_run_left_is_removed_by_the_next_start(cluster):
    """A run SIGKILLed with its hosts up leaves namespaces, a bridge, /etc/hosts lines, an
    sshd and its keys; the next ``Cluster.start`` (here: ``remove_stale``) removes them."""
    from helpers.multihost import leftovers, remove_stale

    tests = str(Path(__file__).resolve().parents[1])
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(tests=tests)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tag = run.stdout.readline().strip()
        assert tag == str(run.pid) and leftovers(tag)
    finally:
        run.kill()
        run.wait()
    remove_stale()
    assert leftovers(tag) == []
    assert cluster.ssh("a", "true").returncode == 0  # this run's hosts are untouched
