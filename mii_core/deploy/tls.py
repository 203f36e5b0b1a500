"""Does the client-facing TLS certificate verify for the address clients dial?

A certificate that names only ``DNS:localhost`` while ``serve()`` dials ``127.0.0.1``
serves happily and fails every client's handshake; without a check, ``serve()`` waits
the whole ``startup_timeout`` on a health probe that can never pass. Clients trust
``tls_cert_file`` itself (``MIIClient`` uses it as the root certificate) and check the
host they dial against its names, as gRPC does; so does this module, with Python's
``ssl`` (OpenSSL) in two places: ``certificate_problem`` before any process starts (a
handshake between two in-memory endpoints), and ``handshake_problem`` against the running
load balancer (the supervisor's readiness probe, when the health check does not pass).
"""
from __future__ import annotations

import socket
import ssl
from typing import Dict, Iterable, List, Optional

from mii_core.deploy.addresses import dial_host

_HANDSHAKE_ROUNDS = 16  # a TLS 1.2/1.3 handshake takes 2-3 flights each way
_NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH


def dialed_hosts(host: str, rest_gateway: bool) -> List[str]:
    """The names a deployment with client-facing ``host`` is dialled by from this machine:
    ``serve()``, its client and the supervisor's probe use ``host`` itself, the REST
    gateway the loopback that reaches it (``dial_host``)."""
    hosts = [host]
    if rest_gateway and dial_host(host) != host:
        hosts.append(dial_host(host))
    return hosts


def certificate_problem(cert_file: str, key_file: str, hosts: Iterable[str]) -> Optional[str]:
    """Why a client dialling any of ``hosts`` would refuse a server presenting
    ``cert_file`` / ``key_file`` (None: every one would accept it). No socket, no process:
    the handshake runs between two in-memory TLS endpoints."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        return (f"tls_cert_file {cert_file} and tls_key_file {key_file} cannot serve TLS: "
                f"{error} (is the key the certificate's, both PEM?)")
    for host in hosts:
        try:
            _memory_handshake(server, _client_context(cert_file, check_hostname=True), host)
        except ssl.SSLCertVerificationError as error:
            cert = _memory_handshake(server, _client_context(cert_file, False), host)
            return explain(error, cert_file, host, cert)
        except ssl.SSLError as error:
            return f"tls_cert_file {cert_file}: a TLS handshake with it fails: {error}"
    return None


def handshake_problem(host: str, port: int, cert_file: str,
                      timeout: float = 1.0) -> Optional[str]:
    """Why a TLS client trusting ``cert_file`` refuses the server at ``host:port`` (None
    if it accepts it, or if nothing answers there yet: only a verdict on the certificate
    is reported, never a server that is still starting)."""
    try:
        _connect_tls(host, port, _client_context(cert_file, check_hostname=True), timeout)
        return None
    except ssl.SSLCertVerificationError as error:
        try:
            cert = _connect_tls(host, port, _client_context(cert_file, False), timeout)
        except (OSError, ssl.SSLError):
            cert = {}
        return explain(error, cert_file, host, cert)
    except (OSError, ssl.SSLError):
        return None


def explain(error: ssl.SSLCertVerificationError, cert_file: str, host: str,
            cert: Dict) -> str:
    """The refusal in words: what failed, the certificate's names, the dialled host, and
    what to do."""
    names = certificate_names(cert)
    why = (error.verify_message or str(error)).rstrip(".")
    text = (f"tls_cert_file {cert_file} does not verify for {host}, the address the "
            f"deployment is dialled by: {why} (the certificate names {names})")
    if error.verify_code in _NAME_MISMATCH:
        kind = "IP" if _is_ip(host) else "DNS"
        text += (f". Use a certificate whose subjectAltName includes {kind}:{host}, or set "
                 f"host to one of the certificate's names")
    return text


def certificate_names(cert: Dict) -> str:
    """``DNS:localhost, IP:127.0.0.1`` from ``SSLSocket.getpeercert()``; the subject's CN
    when there is no subjectAltName."""
    alt = [f"{'IP' if kind == 'IP Address' else kind}:{value}"
           for kind, value in cert.get("subjectAltName", ())]
    if alt:
        return ", ".join(alt)
    common = [value for rdn in cert.get("subject", ()) for key, value in rdn
              if key == "commonName"]
    return f"CN={common[0]} and no subjectAltName" if common else "nothing"


def _client_context(cert_file: str, check_hostname: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert_file)
    # The certificate is its own trust root for clients even when a CA issued it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = check_hostname
    return context


def _memory_handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
                      host: str) -> Dict:
    """Handshake a client of ``host`` with ``server_context`` through memory buffers;
    the server certificate as the client saw it."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, client_out, server_hostname=host)
    server = server_context.wrap_bio(to_server, server_out, server_side=True)
    pending = [client, server]
    for _ in range(_HANDSHAKE_ROUNDS):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if not pending:
            return client.getpeercert()
    raise ssl.SSLError(f"the TLS handshake did not finish in {_HANDSHAKE_ROUNDS} rounds")


def _connect_tls(host: str, port: int, context: ssl.SSLContext, timeout: float) -> Dict:
    with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host.strip("[]")) as tls:
            return tls.getpeercert()


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.strip("[]"))
            return True
        except OSError:
            continue
    return False
