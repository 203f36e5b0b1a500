"""Security defaults: loopback binding, private registry files, an optional shared token."""
from __future__ import annotations

import stat

import grpc
import psutil
import pytest
from conftest import deployed

import mii
from mii.errors import AuthenticationError
from mii_core.deploy import registry
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(tiny_model):
    with deployed(tiny_model, "guarded", engine="transformers", auth_token=TOKEN) as client:
        yield client


def test_token_holder_is_served(guarded):
    assert guarded("DeepSpeed is", max_new_tokens=3)[0].generated_length == 3
    assert mii.client("guarded")("DeepSpeed is", max_new_tokens=3)[0].generated_length == 3
    remote = mii.client(f"127.0.0.1:{guarded.port}", token=TOKEN)
    assert remote("hi", max_new_tokens=2)[0].generated_length == 2


def test_wrong_or_missing_token_is_refused(guarded):
    wrong = mii.MIIClient(guarded.mii_config.model_copy(update={"auth_token": None}),
                          port=guarded.port, token="nope")
    with pytest.raises(AuthenticationError, match="token"):
        wrong("DeepSpeed is", max_new_tokens=3)
    with pytest.raises(AuthenticationError):
        mii.client(f"127.0.0.1:{guarded.port}")


@pytest.mark.parametrize("target", ["load_balancer", "replica"])
def test_every_rpc_needs_the_token_including_terminate(guarded, target):
    port = guarded.port if target == "load_balancer" else registry.load("guarded").replicas[0].port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = mii_pb2_grpc.MIIServiceStub(channel)
        request = mii_pb2.GenerateRequest(prompts=["hi"])
        calls = [lambda: stub.Generate(request), lambda: list(stub.GenerateStream(request)),
                 lambda: stub.Info(mii_pb2.InfoRequest()),
                 lambda: stub.Terminate(mii_pb2.TerminateRequest())]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert guarded.is_serving()  # the refused Terminate changed nothing
    assert guarded("still here", max_new_tokens=2)[0].generated_length == 2


def test_servers_bind_loopback_only(guarded):
    record = registry.load("guarded")
    ports = {record.port} | {r.port for r in record.replicas}
    listening = {c.laddr.port: c.laddr.ip.removeprefix("::ffff:")  # v4-mapped v6 socket
                 for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port in ports}
    assert listening and set(listening.values()) == {"127.0.0.1"}


def test_registry_and_logs_are_private(guarded, mii_home):
    assert stat.S_IMODE((mii_home / "deployments").stat().st_mode) == 0o700
    assert stat.S_IMODE((mii_home / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE(registry.record_path("guarded").stat().st_mode) == 0o600
    assert stat.S_IMODE(registry.log_path("guarded").stat().st_mode) == 0o600


def test_tls_deployment(tiny_model, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with deployed(tiny_model, "tls", engine="transformers", tls_cert_file=str(cert),
                  tls_key_file=str(key), auth_token=TOKEN) as client:
        assert client("DeepSpeed is", max_new_tokens=3)[0].generated_length == 3
        remote = mii.client(f"127.0.0.1:{client.port}", token=TOKEN, tls_root_cert=str(cert))
        assert remote("hi", max_new_tokens=2)[0].generated_length == 2
        plaintext = mii.MIIClient(client.mii_config.model_copy(update={"tls_cert_file": None,
                                                                       "tls_key_file": None}),
                                  port=client.port)
        with pytest.raises(mii.errors.DeploymentUnavailable):
            plaintext("hi", max_new_tokens=2)


def test_tls_files_must_exist(tiny_model, tmp_path):
    with pytest.raises(mii.errors.ConfigError, match="tls_cert_file"):
        mii.serve(tiny_model, tls_cert_file=str(tmp_path / "c.pem"),
                  tls_key_file=str(tmp_path / "k.pem"))
    with pytest.raises(mii.errors.ConfigError, match="together"):
        mii.serve(tiny_model, tls_cert_file=str(tmp_path / "c.pem"))
