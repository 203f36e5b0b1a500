"""A TLS certificate is checked against the address the deployment is dialled by
(``mii_core.deploy.tls``): up front between two in-memory endpoints, and against a
running server (the supervisor's readiness probe). The verdicts must be gRPC's: the
last test asks a real gRPC client."""
from __future__ import annotations

import socket
import ssl
import subprocess
import threading

import pytest
from test_mutants_supervisor import env  # noqa: F401 - the supervisor fixture, used below

SANS = {"dns-only": "DNS:localhost", "dns-and-ip": "DNS:localhost,IP:127.0.0.1"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """name -> (cert, key): self-signed, CN=localhost, with the subjectAltName of SANS
    (and "no-san": none at all); EC keys, made in milliseconds."""
    root = tmp_path_factory.mktemp("certs")
    made = {}
    for name, san in [*SANS.items(), ("no-san", None)]:
        cert, key = root / f"{name}.pem", root / f"{name}.key"
        extra = ["-addext", f"subjectAltName={san}"] if san else []
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", *extra, "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        made[name] = (str(cert), str(key))
    return made


class TlsServer:
    """A TLS server on a free loopback port that completes handshakes and closes."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):  # the client refused us
                pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        self.sock.close()
        self.thread.join(timeout=5)


def test_a_certificate_for_localhost_only_is_refused_for_127_0_0_1_up_front(certs):
    from mii_core.deploy.tls import certificate_problem

    cert, key = certs["dns-only"]
    problem = certificate_problem(cert, key, ["127.0.0.1"])
    assert problem == (
        f"tls_cert_file {cert} does not verify for 127.0.0.1, the address the deployment is "
        "dialled by: IP address mismatch, certificate is not valid for '127.0.0.1' (the "
        "certificate names DNS:localhost). Use a certificate whose subjectAltName includes "
        "IP:127.0.0.1, or set host to one of the certificate's names")
    assert certificate_problem(cert, key, ["localhost"]) is None
    assert certificate_problem(*certs["dns-and-ip"], ["127.0.0.1", "localhost"]) is None
    assert "the certificate names CN=localhost and no subjectAltName" in \
        certificate_problem(*certs["no-san"], ["127.0.0.1"])


def test_every_dialled_host_is_checked(certs):
    from mii_core.deploy.tls import certificate_problem, dialed_hosts

    assert dialed_hosts("localhost", rest_gateway=True) == ["localhost"]
    assert dialed_hosts("0.0.0.0", rest_gateway=False) == ["0.0.0.0"]
    assert dialed_hosts("0.0.0.0", rest_gateway=True) == ["0.0.0.0", "127.0.0.1"]
    problem = certificate_problem(*certs["dns-and-ip"], ["127.0.0.1", "example.org"])
    assert "does not verify for example.org" in problem and "includes DNS:example.org" in problem


def test_a_key_that_is_not_the_certificate_s_is_refused(certs):
    from mii_core.deploy.tls import certificate_problem

    cert, _ = certs["dns-only"]
    _, other_key = certs["dns-and-ip"]
    assert "key values mismatch" in certificate_problem(cert, other_key, ["localhost"])


def test_the_probe_reports_a_running_server_s_certificate_mismatch(certs):
    from mii_core.deploy.tls import handshake_problem

    server = TlsServer(*certs["dns-only"])
    try:
        problem = handshake_problem("127.0.0.1", server.port, certs["dns-only"][0])
        assert problem.startswith(f"tls_cert_file {certs['dns-only'][0]} does not verify for "
                                  "127.0.0.1") and "names DNS:localhost" in problem
        assert handshake_problem("localhost", server.port, certs["dns-only"][0]) is None
    finally:
        server.close()


def test_the_probe_says_nothing_while_nothing_answers(certs):
    from mii_core.deploy.tls import handshake_problem

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        assert handshake_problem("127.0.0.1", sock.getsockname()[1], certs["dns-only"][0]) is None


@pytest.mark.parametrize("name", ["dns-only", "dns-and-ip", "no-san"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_verdicts_are_grpc_s(certs, name, host):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from mii_core.deploy.tls import certificate_problem
    from mii_transport.grpc.client import is_serving

    cert, key = certs[name]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    with open(key, "rb") as k, open(cert, "rb") as c:
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(k.read(),
                                                                                   c.read())]))
    server.start()
    try:
        grpc_accepts = is_serving(f"{host}:{port}", 5.0, tls_root_cert=cert)
    finally:
        server.stop(0)
    assert grpc_accepts == (certificate_problem(cert, key, [host]) is None)


def test_the_supervisor_fails_start_up_at_once_when_clients_refuse_the_certificate(
        env, monkeypatch, certs):
    """The health probe cannot tell a refused certificate from a server still starting;
    the handshake check can, so start-up fails at once rather than after startup_timeout."""
    from test_mutants_supervisor import Clock, child, with_fake_children

    from mii_core.control import supervisor as sup
    from mii_core.deploy import registry

    clock = Clock()
    monkeypatch.setattr(sup, "time", clock)
    cert, key = certs["dns-only"]
    server = TlsServer(cert, key)  # the load balancer, as a client's handshake meets it
    try:
        s = env.supervisor("sup-tls", port_number=server.port, tls_cert_file=cert,
                           tls_key_file=key, startup_timeout=60.0)
        with_fake_children(s, monkeypatch, **{"replica-0": child("replica-0")})
        started = clock.now
        assert s.watch() == 1  # env.transport's health probe never passes
    finally:
        server.close()
    assert clock.now - started < 1.0
    saved = registry.load("sup-tls")
    assert saved.state == "failed" and saved.error.startswith(
        f"tls_cert_file {cert} does not verify for 127.0.0.1") and "DNS:localhost" in saved.error
