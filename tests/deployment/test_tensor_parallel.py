"""tensor_parallel=2 with DeepSpeed AutoTP on CPU (gloo): two ranks launched by torchrun."""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import deployed

import mii
from mii.errors import ConfigError, DeploymentUnavailable, PortInUseError
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port

PROMPTS = ["DeepSpeed is", "Seattle is a city", "The weather today", "Computers are"]
GREEDY = dict(do_sample=False, max_new_tokens=24, ignore_eos=True)


def rank_pids(record_path: str) -> dict:
    """rank -> pid of the replica processes of a deployment (read from /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "mii_core.control.replica_main" in cmdline and record_path in cmdline:
            env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
            ranks[int(env.get("RANK", "0"))] = int(entry)
    return ranks


@pytest.fixture(scope="module")
def tp2(tiny_model):
    with deployed(tiny_model, "tp2", engine="deepspeed", tensor_parallel=2,
                  max_restarts=2) as client:
        yield client


def test_tp2_greedy_tokens_equal_tp1(tp2, deployment):
    sharded = [r.generated_text for r in tp2(PROMPTS, **GREEDY)]
    single = [r.generated_text for r in deployment(PROMPTS, **GREEDY)]
    assert sharded == single
    info = tp2.info()["replicas"][0]
    assert info["engine"] == "deepspeed" and info["healthy"]


@pytest.mark.parametrize("cache", [
    dict(kv_cache="static", max_length=96),
    # the paged cache per rank; 7 blocks of 16 tokens hold fewer than the 4 prompts
    # need together, so rank 0 preempts and both ranks recompute the same rows
    dict(kv_cache="paged", kv_blocks=7, max_length=96),
], ids=["static", "paged-preempting"])
def test_tp2_with_a_preallocated_cache_gives_the_tp1_tokens(tiny_model, deployment, cache):
    """Rank 0 plans (admission, blocks, preemption), both ranks apply the same plans."""
    with deployed(tiny_model, f"tp2-{cache['kv_cache']}", engine="deepspeed",
                  tensor_parallel=2, **cache) as client:
        sharded = [r.generated_text for r in client(PROMPTS, **GREEDY)]
        joined = client("Seattle is a city", **GREEDY)[0].generated_text  # a later row
        kv = client.info()["replicas"][0]["stats"]["kv"]
    single = [r.generated_text for r in deployment(PROMPTS, **GREEDY)]
    assert sharded == single and joined == single[1]
    assert kv["kind"] == ("paged" if cache["kv_cache"] == "paged" else "slots")
    if cache["kv_cache"] == "paged":
        assert kv["preemptions"] > 0 and kv["blocks_used"] == 0  # all returned at the end


def test_tp2_streaming(tp2):
    unary = tp2("DeepSpeed is", **GREEDY)[0]
    chunks = list(tp2.stream("DeepSpeed is", **GREEDY))
    assert "".join(c.generated_text for c in chunks) == unary.generated_text
    assert chunks[-1].generated_length == 24


def test_tp2_runs_two_rank_processes_under_torchrun(tp2):
    record = registry.load("tp2")
    ranks = rank_pids(str(registry.record_path("tp2")))
    assert sorted(ranks) == [0, 1]
    launcher = record.pids["replica-0"]
    assert "torch.distributed.run" in Path(f"/proc/{launcher}/cmdline").read_bytes().decode()


def test_killing_a_rank_heals_the_replica(tp2):
    expected = tp2(PROMPTS[0], **GREEDY)[0].generated_text
    before = rank_pids(str(registry.record_path("tp2")))
    os.kill(before[1], signal.SIGKILL)
    deadline = time.time() + 60
    healed = None
    while time.time() < deadline:
        now = rank_pids(str(registry.record_path("tp2")))
        if sorted(now) == [0, 1] and now[1] != before[1] and tp2.is_serving():
            try:
                healed = tp2(PROMPTS[0], **GREEDY)[0].generated_text
                break
            except DeploymentUnavailable:
                pass
        time.sleep(0.2)
    assert healed == expected
    assert not registry.pid_alive(before[0])  # the old rank 0 went down with its peer
    assert "restart 1 of 2" in Path(registry.load("tp2").log_path).read_text()


def test_terminate_stops_every_rank(tiny_model):
    client = mii.serve(tiny_model, deployment_name="tp2-stop", port_number=free_port(),
                       engine="deepspeed", tensor_parallel=2)
    ranks = rank_pids(str(registry.record_path("tp2-stop")))
    assert len(ranks) == 2
    client.terminate_server()
    assert not [pid for pid in ranks.values() if registry.pid_alive(pid)]


def test_tp_must_divide_heads_before_anything_starts(tiny_model):
    with pytest.raises(ConfigError, match=r"tensor_parallel \(3\) does not divide the model's "
                                          r"num_attention_heads \(4\)"):
        mii.serve(tiny_model, tensor_parallel=3, engine="deepspeed")
    assert registry.load("tiny-llama-mii-deployment") is None


def test_transformers_engine_refuses_tensor_parallel(tiny_model):
    with pytest.raises(ConfigError, match="use engine='deepspeed'"):
        mii.serve(tiny_model, tensor_parallel=2, engine="transformers")


def test_busy_torch_dist_port_is_reported(tiny_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"torch_dist_port of replica 0 port {port}"):
            mii.serve(tiny_model, tensor_parallel=2, engine="deepspeed", torch_dist_port=port)
