"""Security defaults: loopback binding, private registry files, an optional shared token.

The deployments here also run half precision on CPU (``dtype``) and, for ``guarded``, a
client-facing ``host`` of its own."""
from __future__ import annotations

import stat

import grpc
import pytest
from conftest import GREEDY, deployed, listening

import mii
from mii.errors import AuthenticationError
from mii_core.deploy import registry
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc

TOKEN = "s3cret-token"
HOST = "127.0.0.2"  # the client-facing host of ``guarded``: a loopback address of its own


@pytest.fixture(scope="module")
def guarded(tiny_model):
    with deployed(tiny_model, "guarded", engine="transformers", auth_token=TOKEN, host=HOST,
                  dtype="bf16") as client:
        yield client


def test_token_holder_is_served(guarded):
    expected = guarded("DeepSpeed is", max_new_tokens=3, **GREEDY)[0]
    assert expected.generated_length == 3
    again = mii.client("guarded")("DeepSpeed is", max_new_tokens=3, **GREEDY)[0]
    assert again.generated_text == expected.generated_text
    remote = mii.client(f"{HOST}:{guarded.port}", token=TOKEN)
    assert remote("hi", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_wrong_or_missing_token_is_refused(guarded):
    wrong = mii.MIIClient(guarded.mii_config.model_copy(update={"auth_token": None}),
                          host=HOST, port=guarded.port, token="nope")
    with pytest.raises(AuthenticationError, match="token"):
        wrong("DeepSpeed is", max_new_tokens=3)
    with pytest.raises(AuthenticationError):
        mii.client(f"{HOST}:{guarded.port}")


def test_token_from_mii_auth_token(guarded, monkeypatch):
    tokenless = guarded.mii_config.model_copy(update={"auth_token": None})
    monkeypatch.setenv("MII_AUTH_TOKEN", TOKEN)
    assert mii.client(f"{HOST}:{guarded.port}")("hi", max_new_tokens=2, **GREEDY)[0] \
        .generated_length == 2
    assert mii.MIIClient(tokenless, host=HOST)("hi", max_new_tokens=2, **GREEDY)[0] \
        .generated_length == 2
    with pytest.raises(AuthenticationError):  # a token given to the client wins
        mii.MIIClient(tokenless, host=HOST, token="nope")("hi", max_new_tokens=2)
    monkeypatch.setenv("MII_AUTH_TOKEN", "wrong")
    with pytest.raises(AuthenticationError):
        mii.MIIClient(tokenless, host=HOST)("hi", max_new_tokens=2)
    assert guarded("hi", max_new_tokens=2, **GREEDY)[0].generated_length == 2  # config wins


def test_dtype_bf16_is_what_the_replica_loads(guarded):
    log = registry.log_path("guarded").read_text()
    assert "transformers LlamaForCausalLM torch.bfloat16 on cpu" in log


@pytest.mark.parametrize("target", ["load_balancer", "replica"])
def test_every_rpc_needs_the_token_including_terminate(guarded, target):
    address = f"{HOST}:{guarded.port}" if target == "load_balancer" else \
        f"127.0.0.1:{registry.load('guarded').replicas[0].port}"
    with grpc.insecure_channel(address) as channel:
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
    assert guarded("still here", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_servers_bind_host_and_loopback_only(guarded):
    """The load balancer listens on ``host`` alone, each replica on the IPv4 loopback alone."""
    record = registry.load("guarded")
    assert listening(record.pids["load-balancer"]) == {(HOST, record.port)}
    for replica in record.replicas:
        assert listening(record.pids[f"replica-{replica.index}"]) == \
            {("127.0.0.1", replica.port)}


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
                  tls_key_file=str(key), auth_token=TOKEN, dtype="fp16") as client:
        assert client("DeepSpeed is", max_new_tokens=3, **GREEDY)[0].generated_length == 3
        remote = mii.client(f"127.0.0.1:{client.port}", token=TOKEN, tls_root_cert=str(cert))
        assert remote("hi", max_new_tokens=2, **GREEDY)[0].generated_length == 2
        assert "transformers LlamaForCausalLM torch.float16 on cpu" in \
            registry.log_path("tls").read_text()
        plaintext = mii.MIIClient(client.mii_config.model_copy(update={"tls_cert_file": None,
                                                                       "tls_key_file": None}),
                                  port=client.port)
        with pytest.raises(mii.errors.DeploymentUnavailable):
            plaintext("hi", max_new_tokens=2)


def test_tls_files_must_exist(tiny_model, tmp_path, no_process_started):
    with pytest.raises(mii.errors.ConfigError, match="tls_cert_file"):
        mii.serve(tiny_model, tls_cert_file=str(tmp_path / "c.pem"),
                  tls_key_file=str(tmp_path / "k.pem"))
    with pytest.raises(mii.errors.ConfigError, match="together"):
        mii.serve(tiny_model, tls_cert_file=str(tmp_path / "c.pem"))


def test_a_certificate_clients_would_refuse_is_refused_before_any_process(tiny_model, tmp_path,
                                                                         no_process_started):
    """A certificate for DNS:localhost alone while serve() dials 127.0.0.1: every client's
    handshake fails, so serve() would wait out startup_timeout on a probe that cannot pass."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout",
                    str(key), "-out", str(cert)], check=True, capture_output=True)
    with pytest.raises(mii.errors.ConfigError, match=(
            rf"^tls_cert_file {cert} does not verify for 127\.0\.0\.1, the address the "
            r"deployment is dialled by: IP address mismatch.*\(the certificate names "
            r"DNS:localhost\)\. Use a certificate whose subjectAltName includes IP:127\.0\.0\.1, "
            r"or set host to one of the certificate's names$")):
        mii.serve(tiny_model, deployment_name="tls-mismatch", tls_cert_file=str(cert),
                  tls_key_file=str(key), startup_timeout=30)
    assert registry.load("tls-mismatch") is None


def test_a_link_planted_at_the_log_path_is_not_followed(tiny_model, tmp_path, no_process_started):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    target.chmod(0o644)
    link = registry.log_path("planted-log")
    link.symlink_to(target)
    try:
        with pytest.raises(mii.errors.DeploymentStartupError,
                           match=rf"cannot open its log: {link} is a symbolic link"):
            mii.serve(tiny_model, deployment_name="planted-log")
    finally:
        link.unlink()
    assert target.read_text() == "precious\n"  # neither appended to ...
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # ... nor chmod'ed
    assert registry.load("planted-log") is None


def test_serve_refuses_a_home_others_may_write(tiny_model, mii_home, monkeypatch):
    shared = mii_home / "shared-home"  # inside the session's home: leaked processes are seen
    shared.mkdir(mode=0o700)
    shared.chmod(0o777)
    monkeypatch.setenv("MII_HOME", str(shared))
    with pytest.raises(mii.errors.ConfigError, match=rf"MII_HOME: refusing to use {shared}: it "
                                                     r"is writable by others than its owner "
                                                     r"\(mode 0777"):
        mii.serve(tiny_model, deployment_name="in-shared-home")
    assert not (shared / "deployments").exists() or not any((shared / "deployments").iterdir())
