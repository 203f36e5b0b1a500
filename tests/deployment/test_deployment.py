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
from conftest import GREEDY as FIXED  # greedy, no EOS: a fixed text of a fixed length
from conftest import (
    MII_SCRIPT,
    LogWatch,
    kill_deployment,
    our_processes,
    ours_listening,
    refused_port,
    run_mii,
    run_python,
    serve,
    wait_until,
)

import mii
from mii.errors import (
    ConfigError,
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
from mii_core.deploy.ports import free_port
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
        assert not ours_listening(record.port)
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
    assert deployment("still alive", max_new_tokens=2, **FIXED)[0].generated_length == 2


def test_server_side_error_becomes_typed_exception(deployment):
    with pytest.raises(InvalidGenerateParams, match=r"prompts\[0\].*max_length=3"):
        deployment("a long prompt over the limit", max_length=3)


def test_abandoned_stream_is_cancelled_on_the_server(deployment):
    def cancelled():
        return sum(r["stats"]["cancelled"] for r in deployment.info()["replicas"])

    before = cancelled()
    stream = deployment.stream("DeepSpeed is", max_new_tokens=400, max_length=500, ignore_eos=True)
    next(stream)
    stream.close()
    assert wait_until(lambda: cancelled() == before + 1, 10)


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


def check_multi_prompt_stream(chunks, batch) -> None:
    """Chunks of a multi-prompt stream: each carries its prompt's index, each prompt's
    chunks add up to its unary text, and only each prompt's last chunk has a reason."""
    assert {c.index for c in chunks} == set(range(len(batch)))
    for index, whole in enumerate(batch):
        mine = [c for c in chunks if c.index == index]
        assert "".join(c.generated_text for c in mine) == whole.generated_text
        assert [c.finish_reason for c in mine] == ["none"] * (len(mine) - 1) + ["length"]
        assert (mine[-1].prompt_length, mine[-1].generated_length) == \
            (whole.prompt_length, whole.generated_length)


def test_multi_prompt_stream_and_astream(deployment):
    prompts = ["DeepSpeed is", "Seattle is a city", "The sea"]
    batch = deployment(prompts, **GREEDY)
    check_multi_prompt_stream(list(deployment.stream(prompts, **GREEDY)), batch)

    async def collect():
        return [c async for c in deployment.astream(prompts, **GREEDY)]

    check_multi_prompt_stream(asyncio.run(collect()), batch)


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


def test_port_in_use_is_refused_before_starting(tiny_model, no_process_started):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # the port is ours for the whole test
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port_number port {port}"):
            mii.serve(tiny_model, deployment_name="busy", port_number=port)
    assert registry.load("busy") is None


def test_missing_model_path_fails_before_any_process(tmp_path, no_process_started):
    with pytest.raises(ConfigError, match="does not exist"):
        mii.serve(str(tmp_path / "nope"))
    assert registry.load("nope-mii-deployment") is None


def test_directory_without_model_fails_before_any_process(tmp_path, no_process_started):
    with pytest.raises(ConfigError, match="not a model directory"):
        mii.serve(str(tmp_path))


def test_broken_weights_fail_startup_with_log_tail(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_model):
        if name != "model.safetensors":
            (broken / name).write_bytes((__import__("pathlib").Path(tiny_model) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DeploymentStartupError) as caught:
        serve(str(broken), engine="transformers")
    message = str(caught.value)
    assert "failed to start" in message and "replica-0 exited" in message
    assert "last lines of" in message and "Traceback" in message
    assert registry.load("broken-mii-deployment") is None  # and no process: see the fixture


def test_startup_timeout_stops_everything_it_started(tiny_model):
    record_file = str(registry.record_path("too-slow"))
    with pytest.raises(DeploymentStartupError, match=r"startup_timeout=0\.5s") as caught:
        serve(tiny_model, deployment_name="too-slow", engine="transformers",
              startup_timeout=0.5)
    assert "last lines of" in str(caught.value)
    assert registry.load("too-slow") is None
    assert record_file not in our_processes().values()  # serve() waited for the teardown


def test_terminated_deployment_gives_clear_errors(tiny_model):
    client = serve(tiny_model, deployment_name="short-lived", engine="transformers")
    pids = registry.load("short-lived").pids
    client.terminate_server()
    assert not [p for p in pids.values() if registry.pid_alive(p)]
    with pytest.raises(DeploymentUnavailable, match="not running"):
        client("hello")
    with pytest.raises(DeploymentNotFoundError, match="short-lived"):
        mii.client("short-lived")
    with refused_port() as nobody:
        stale = mii.MIIClient(client.mii_config, port=nobody)
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


def mii_ok(*args: str) -> str:
    """stdout of the ``mii`` script run with ``args``, which must exit 0."""
    result = run_mii(*args)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    return result.stdout


GREEDY_SET = ["--set", "max_new_tokens=16", "--set", "do_sample=false", "--set",
              "ignore_eos=true"]


def test_cli_commands(deployment):
    name = deployment.deployment_name
    listed = [line.split()[:5] for line in mii_ok("list").splitlines()[1:]]
    assert [name, f"127.0.0.1:{deployment.port}", "ready", "transformers", "1"] in listed
    info = json.loads(mii_ok("status", name, "--json"))
    assert info["serving"] and info["replicas"][0]["healthy"] and info["state"] == "ready"
    assert info["deployment"] == name
    expected = deployment("DeepSpeed is", **GREEDY)[0].generated_text
    assert mii_ok("generate", name, "DeepSpeed is", *GREEDY_SET) == expected + "\n"
    assert mii_ok("generate", name, "DeepSpeed is", "--stream", *GREEDY_SET) == expected + "\n"
    logs = mii_ok("logs", name, "-n", "3").splitlines()
    assert len(logs) == 3 and all(line in open(info["log"]).read() for line in logs)


CLI_ERRORS = [  # (arguments, exit status, stderr must contain)
    (["generate", "nobody", "hi"], 1,
     "mii: DeploymentNotFoundError: no running deployment named 'nobody'"),
    (["generate", "{name}", "hi", "--set", "bogus=1"], 1,
     "mii: UnknownArgument: Keyword argument 'bogus'"),
    (["generate", "{name}", "hi", "--set", "max_new_tokens"], 1, "--set expects key=value"),
    (["generate", "{name}", "hi", "--set", "top_p=2"], 1, "mii: InvalidGenerateParams: top_p"),
    (["status", "nobody"], 1, "mii: DeploymentNotFoundError"),
    (["stop", "nobody"], 1, "mii: DeploymentNotFoundError"),
    (["logs", "nobody"], 1, "no deployment record for 'nobody'"),
    (["serve", "/nonexistent/model"], 1,
     "mii: ConfigError: model_name_or_path: /nonexistent/model does not exist"),
    (["no-such-command"], 2, "invalid choice: 'no-such-command'"),
    ([], 2, "the following arguments are required: command"),
]


def test_cli_error_exits(deployment):
    """Each mistake exits non-zero with one line naming it, no traceback, no stdout."""
    import subprocess

    runs = [(args, code, message, subprocess.Popen(
        [str(MII_SCRIPT), *[a.format(name=deployment.deployment_name) for a in args]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args, code, message in CLI_ERRORS]  # concurrently: each is an interpreter start
    for args, code, message, proc in runs:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out) == (code, ""), (args, err)
        assert message in err and "Traceback" not in err, (args, err)
    assert deployment.is_serving()


def test_ctrl_c_of_the_caller_does_not_stop_the_deployment(tiny_model):
    import signal
    import subprocess

    # Like a terminal: SIGINT to the caller's whole process group (a shell may have ignored it).
    # SIGUSR1 makes the caller print every thread's stack: what it waits on if it hangs.
    script = (f"import faulthandler, mii, signal, time\n"
              "from mii_core.deploy.ports import free_port\n"
              "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "for attempt in range(4):  # a port picked here may be taken before it is bound\n"
              "    try:\n"
              f"        mii.serve({tiny_model!r}, deployment_name='sigint', "
              "port_number=free_port(), engine='transformers')\n"
              "        break\n"
              "    except (mii.errors.PortInUseError, mii.errors.DeploymentStartupError) as e:\n"
              "        if attempt == 3 or 'in use' not in str(e):\n"
              "            raise\n"
              "print('up', flush=True)\n"
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
        assert client("DeepSpeed is", max_new_tokens=3, **FIXED)[0].generated_length == 3
        client.terminate_server()
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_deployment("sigint")


def test_cli_serves_a_static_kv_cache_deployment_that_matches_dynamic(deployment, tiny_model):
    """``mii serve`` (``--set`` values of several types) and ``mii stop``, as the installed
    script; the deployment it starts has a static KV cache and gives the dynamic one's text."""
    settings = ["deployment_name=static-kv", "engine=transformers", "kv_cache=static",
                "max_length=128", "max_batch_size=8"]
    for attempt in range(4):  # the port picked here may be taken before it is bound
        port = free_port()
        args = ["serve", tiny_model, *[f"--set={s}" for s in settings + [f"port_number={port}"]]]
        served = run_mii(*args)
        if served.returncode == 0 or attempt == 3 or "in use" not in served.stderr:
            break
    assert served.returncode == 0, served.stderr
    assert served.stdout == f"static-kv serving on 127.0.0.1:{port}\n"
    try:
        record = registry.load("static-kv")
        config = record.mii_config.model_conf
        assert (config.kv_cache, config.max_length, config.max_batch_size) == ("static", 128, 8)
        static = mii.client("static-kv")
        prompts = ["DeepSpeed is", "Seattle is", "The sea"]
        assert [r.generated_text for r in static(prompts, **GREEDY)] == \
            [r.generated_text for r in deployment(prompts, **GREEDY)]
        with pytest.raises(InvalidGenerateParams, match="max_length"):
            static(" ".join(["word"] * 200), max_new_tokens=2)  # beyond the slot length
        log = LogWatch("static-kv")
        assert mii_ok("stop", "static-kv") == "stopped static-kv\n"
        assert registry.load("static-kv") is None
        assert not [p for p in [*record.pids.values(), record.supervisor_pid]
                    if registry.pid_alive(p)]
        assert "deployment static-kv stopped (terminated)" in log.text()
    finally:
        kill_deployment("static-kv")
