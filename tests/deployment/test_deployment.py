"""Persistent deployments: real processes, real gRPC, the tiny model on CPU."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import grpc
import pytest
from conftest import kill_deployment, run_python

import mii
from mii.errors import (
    ConfigError,
    DeadlineExceeded,
    DeploymentExistsError,
    DeploymentNotFoundError,
    DeploymentStartupError,
    DeploymentUnavailable,
    DistributedLaunchError,
    InvalidGenerateParams,
    PortInUseError,
    UnknownArgument,
)
from mii_core.deploy import registry
from mii_core.deploy.ports import is_port_free
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

GREEDY = dict(do_sample=False, max_new_tokens=16, ignore_eos=True)


def test_three_user_scripts_in_three_processes(tiny_model):
    serve_script = f"""
import mii
client = mii.serve({tiny_model!r})
print(client(["DeepSpeed is", "Seattle is"], max_new_tokens=128))
"""
    client_script = f"""
import mii
client = mii.client({tiny_model!r})
print(client(["DeepSpeed is", "Seattle is"], max_new_tokens=128))
"""
    stop_script = f"""
import mii
mii.client({tiny_model!r}).terminate_server()
"""
    try:
        first = run_python(serve_script)
        assert first.returncode == 0, first.stderr
        assert "ready" in first.stderr  # progress was shown
        record = registry.find_live("tiny-llama-mii-deployment")
        assert record is not None and record.state == "ready"
        assert registry.supervisor_alive(record)  # outlived the script that started it
        second = run_python(client_script)
        assert second.returncode == 0, second.stderr
        assert second.stdout.startswith("[") and second.stdout.count(",") >= 1
        third = run_python(stop_script)
        assert third.returncode == 0, third.stderr
        assert registry.load("tiny-llama-mii-deployment") is None
        assert is_port_free(record.port)
        assert not [p for p in record.pids.values() if registry.pid_alive(p)]
    finally:
        kill_deployment("tiny-llama-mii-deployment")


def test_streaming_equals_unary_greedy(deployment):
    unary = deployment("DeepSpeed is", **GREEDY)[0]
    chunks = list(deployment.stream("DeepSpeed is", **GREEDY))
    assert "".join(c.generated_text for c in chunks) == unary.generated_text
    assert chunks[-1].finish_reason == "length" and chunks[-1].generated_length == 16
    assert all(c.finish_reason == "none" for c in chunks[:-1]) and len(chunks) > 1
    seen = []
    final = deployment("DeepSpeed is", streaming_fn=seen.append, **GREEDY)
    assert all(isinstance(chunk, list) and len(chunk) == 1 for chunk in seen)  # as MII's
    assert "".join(c[0].generated_text for c in seen) == unary.generated_text
    assert final[0].generated_text == unary.generated_text


def test_multi_prompt_replies_in_order(deployment):
    prompts = ["DeepSpeed is", "Seattle is", "The sea"]
    batch = deployment(prompts, **GREEDY)
    assert [r.generated_text for r in batch] == [deployment(p, **GREEDY)[0].generated_text
                                                 for p in prompts]
    assert all(str(r) == r.generated_text and r.generated_length == 16 for r in batch)
    assert all(r.prompt_length > 0 and r.finish_reason == "length" for r in batch)


def test_per_call_max_length_short_vs_long(deployment):
    short = deployment("DeepSpeed is", do_sample=False, max_length=12, ignore_eos=True)[0]
    long = deployment("DeepSpeed is", do_sample=False, max_length=40, ignore_eos=True)[0]
    assert short.prompt_length + short.generated_length == 12
    assert long.prompt_length + long.generated_length == 40
    assert long.generated_text.startswith(short.generated_text)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"bogus": 1}, UnknownArgument, "bogus"),
    ({"top_p": 2}, InvalidGenerateParams, "top_p"),
    ({"max_new_tokens": -1}, InvalidGenerateParams, "max_new_tokens"),
    ({"temperature": 0}, InvalidGenerateParams, "temperature"),
])
def test_bad_generate_params_fail_in_the_client(deployment, kwargs, error, match):
    with pytest.raises(error, match=match):
        deployment("DeepSpeed is", **kwargs)


@pytest.mark.parametrize("prompts, match", [([], "empty"), ([42], r"prompts\[0\]"),
                                            (["ok", b"bytes"], r"prompts\[1\]")])
def test_bad_prompts_fail_in_the_client(deployment, prompts, match):
    with pytest.raises(InvalidGenerateParams, match=match):
        deployment(prompts)


def test_server_validates_requests_that_skip_the_client(deployment):
    """A raw gRPC caller gets INVALID_ARGUMENT naming the field; the server keeps serving."""
    with grpc.insecure_channel(f"127.0.0.1:{deployment.port}") as channel:
        stub = mii_pb2_grpc.MIIServiceStub(channel)
        for params, prompts, match in ((mii_pb2.GenerateParams(top_p=2.0), ["hi"], "top_p"),
                                       (mii_pb2.GenerateParams(), [], "empty"),
                                       (mii_pb2.GenerateParams(max_length=3),
                                        ["a long prompt over the limit"], "max_length")):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(mii_pb2.GenerateRequest(prompts=prompts, params=params))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert match in caught.value.details()
    assert deployment.is_serving()
    assert deployment("still alive", max_new_tokens=2)[0].generated_length == 2


def test_server_side_error_becomes_typed_exception(deployment):
    with pytest.raises(InvalidGenerateParams, match=r"prompts\[0\].*max_length=3"):
        deployment("a long prompt over the limit", max_length=3)


def test_deadline_is_honoured(deployment):
    with pytest.raises(DeadlineExceeded):
        deployment("DeepSpeed is", max_new_tokens=500, max_length=600, ignore_eos=True,
                   timeout=0.05)
    assert deployment("ok", max_new_tokens=2)[0].generated_length == 2


def test_abandoned_stream_is_cancelled_on_the_server(deployment):
    def cancelled():
        return sum(r["stats"]["cancelled"] for r in deployment.info()["replicas"])

    before = cancelled()
    stream = deployment.stream("DeepSpeed is", max_new_tokens=400, max_length=500, ignore_eos=True)
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1


def test_async_generate_and_stream(deployment):
    async def main():
        unary = await deployment.agenerate(["DeepSpeed is", "Seattle is"], **GREEDY)
        pieces = [c async for c in deployment.astream("DeepSpeed is", **GREEDY)]
        concurrent = await asyncio.gather(*(deployment.agenerate("DeepSpeed is", **GREEDY)
                                            for _ in range(4)))
        return unary, pieces, concurrent

    unary, pieces, concurrent = asyncio.run(main())
    assert "".join(p.generated_text for p in pieces) == unary[0].generated_text
    assert all(c[0].generated_text == unary[0].generated_text for c in concurrent)


def test_backend_client_class_path_constructs_as_in_mii(deployment):
    from mii.backend.client import MIIClient

    client = MIIClient(deployment.mii_config, host="localhost")
    assert client(["DeepSpeed is"], **GREEDY)[0].generated_text == \
        deployment("DeepSpeed is", **GREEDY)[0].generated_text


def test_client_by_host_port(deployment):
    remote = mii.client(f"127.0.0.1:{deployment.port}")
    assert remote.deployment_name == deployment.deployment_name
    assert remote("DeepSpeed is", **GREEDY)[0].generated_length == 16


def test_same_name_twice_is_refused_naming_the_port(deployment, tiny_model):
    with pytest.raises(DeploymentExistsError, match=f"port {deployment.port}"):
        mii.serve(tiny_model, deployment_name=deployment.deployment_name,
                  engine="transformers")


def test_port_in_use_is_refused_before_starting(tiny_model, free_port):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port))
        busy.listen()
        with pytest.raises(PortInUseError, match=f"port_number port {free_port}"):
            mii.serve(tiny_model, deployment_name="busy", port_number=free_port)
    assert registry.load("busy") is None


def test_missing_model_path_fails_fast(tmp_path):
    started = time.time()
    with pytest.raises(ConfigError, match="does not exist"):
        mii.serve(str(tmp_path / "nope"))
    assert time.time() - started < 5
    assert registry.load("nope-mii-deployment") is None


def test_directory_without_model_fails_fast(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        mii.serve(str(tmp_path))


def test_broken_weights_fail_startup_with_log_tail(tiny_model, tmp_path, free_port):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_model):
        if name != "model.safetensors":
            (broken / name).write_bytes((__import__("pathlib").Path(tiny_model) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DeploymentStartupError) as caught:
        mii.serve(str(broken), port_number=free_port, engine="transformers")
    message = str(caught.value)
    assert "failed to start" in message and "replica-0 exited" in message
    assert "last lines of" in message and "Traceback" in message
    assert registry.load("broken-mii-deployment") is None
    assert is_port_free(free_port)


def test_terminated_deployment_gives_clear_errors(tiny_model, free_port):
    client = mii.serve(tiny_model, deployment_name="short-lived", port_number=free_port,
                       engine="transformers")
    pids = registry.load("short-lived").pids
    client.terminate_server()
    assert not [p for p in pids.values() if registry.pid_alive(p)]
    with pytest.raises(DeploymentUnavailable, match="not running"):
        client("hello")
    with pytest.raises(DeploymentNotFoundError, match="short-lived"):
        mii.client("short-lived")
    stale = mii.MIIClient(client.mii_config, port=free_port)
    with pytest.raises(DeploymentUnavailable, match="not reachable"):
        stale("hello")


def test_stale_record_is_detected_and_removed(tiny_model):
    record = registry.DeploymentRecord(
        name="ghost", config=mii.MIIConfig(model_config={"model_name_or_path": tiny_model}
                                           ).model_dump(by_alias=True, mode="json"),
        host="127.0.0.1", port=1, log_path="/dev/null", supervisor_pid=2**22 - 1,
        created_at=time.time() - 100)
    registry.save(record)
    with pytest.raises(DeploymentNotFoundError):
        mii.client("ghost")
    assert registry.load("ghost") is None


def test_serve_refuses_inside_a_distributed_launch(tiny_model, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedLaunchError, match="distributed launcher"):
        mii.serve(tiny_model)


def test_cli_commands(deployment):
    name = deployment.deployment_name
    listed = run_python(f"from mii_core.cli import main; main(['list'])")
    assert name in listed.stdout and "ready" in listed.stdout
    status = run_python(f"from mii_core.cli import main; main(['status', {name!r}])")
    info = json.loads(status.stdout)
    assert info["serving"] and info["replicas"][0]["healthy"] and info["state"] == "ready"
    generated = run_python(f"from mii_core.cli import main; main(['generate', {name!r}, "
                           f"'DeepSpeed is', '--set', 'max_new_tokens=16', '--set', "
                           f"'do_sample=false', '--set', 'ignore_eos=true'])")
    assert generated.stdout.strip() == deployment("DeepSpeed is", **GREEDY)[0].generated_text.strip()
    logs = run_python(f"from mii_core.cli import main; main(['logs', {name!r}])")
    assert "ready" in logs.stdout


def test_ctrl_c_of_the_caller_does_not_stop_the_deployment(tiny_model, free_port):
    import signal
    import subprocess

    # Like a terminal: SIGINT to the caller's whole process group (a shell may have ignored it).
    # SIGUSR1 makes the caller print every thread's stack: what it waits on if it hangs.
    script = (f"import faulthandler, mii, signal, time\n"
              "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"mii.serve({tiny_model!r}, deployment_name='sigint', "
              f"port_number={free_port}, engine='transformers')\nprint('up', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)  # the caller itself ends (slowly under a loaded CI machine)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the stacks land in the captured stderr
            time.sleep(1)
            raise
        client = mii.client("sigint")
        assert client("DeepSpeed is", max_new_tokens=3)[0].generated_length == 3
        client.terminate_server()
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_deployment("sigint")


def test_static_kv_cache_deployment_matches_dynamic(deployment, tiny_model, free_port):
    static = mii.serve(tiny_model, deployment_name="static-kv", port_number=free_port,
                       engine="transformers", kv_cache="static", max_length=128,
                       max_batch_size=8)
    try:
        prompts = ["DeepSpeed is", "Seattle is", "The sea"]
        assert [r.generated_text for r in static(prompts, **GREEDY)] == \
            [r.generated_text for r in deployment(prompts, **GREEDY)]
        with pytest.raises(InvalidGenerateParams, match="max_length"):
            static(" ".join(["word"] * 200), max_new_tokens=2)  # beyond the slot length
    finally:
        static.terminate_server()
