"""What one HTTP request may cost the REST gateway (``mii_core/gateway/guard.py``): the
real uvicorn server of ``gateway_main`` (``server.uvicorn_server``) running the real app in
a thread of this process, with short limits, driven over raw sockets. Its client points at
a port that refuses connections: every request here is answered before a generate."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Iterator, Optional, Tuple

import httpx
import pytest
from conftest import refused_port

from mii_core.api.client import MIIClient
from mii_core.config.models import MIIConfig, ModelConfig
from mii_core.gateway import create_app
from mii_core.gateway.limits import GatewayLimits
from mii_core.gateway.server import uvicorn_server

LIMITS = GatewayLimits(max_body_bytes=256 * 1024, header_timeout_s=1.0, body_timeout_s=1.0)
NAME = "guarded-gateway"
WAIT = 15.0  # far beyond any limit: a socket still open by then is held for good


class Gateway:
    """The running server: its port, the client it uses, ``raw`` and ``post`` helpers."""

    def __init__(self, port: int, client: MIIClient, http: httpx.Client) -> None:
        self.port = port
        self.client = client
        self.base = f"http://127.0.0.1:{port}"
        self.http = http

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(WAIT)
        return sock

    def post(self, path: str, body: bytes, content_type: Optional[str] = "application/json"
             ) -> httpx.Response:
        headers = {"content-type": content_type} if content_type else {}
        return self.http.post(self.base + path, content=body, headers=headers)


def read_until_closed(sock: socket.socket) -> Tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    data = b""
    while True:
        chunk = sock.recv(65536)  # socket.timeout (a failure) if it stays open for WAIT
        if not chunk:
            return data, time.monotonic()
        data += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole response (it has a Content-Length) from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head = data.partition(b"\r\n\r\n")[0].decode().lower()
    length = int(head.split("content-length: ")[1].split("\r\n")[0])
    while len(data) < len(head) + 4 + length:
        data += sock.recv(65536)
    return data


def response(data: bytes) -> Tuple[int, dict, dict]:
    """(status, lower-cased headers, JSON body) of one raw HTTP response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    config = MIIConfig(model_config=ModelConfig(model_name_or_path="unused"),
                       deployment_name=NAME)
    with refused_port() as nowhere:
        client = MIIClient(config, host="127.0.0.1", port=nowhere)
        server = uvicorn_server(create_app(config, client, LIMITS), "127.0.0.1", 0, LIMITS)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        try:
            with httpx.Client(timeout=WAIT) as http:
                yield Gateway(server.servers[0].sockets[0].getsockname()[1], client, http)
        finally:
            server.should_exit = True
            thread.join(10)
            assert not thread.is_alive()


# -- item 10: slow headers and bodies --------------------------------------------------------
def test_a_silent_connection_is_closed_after_the_header_timeout(gateway):
    with gateway.connect() as sock:
        opened = time.monotonic()
        data, closed = read_until_closed(sock)
    assert data == b""  # nothing of a request came: nothing to answer
    assert closed - opened >= LIMITS.header_timeout_s * 0.9


def test_headers_sent_slowly_get_408_and_the_connection_closed(gateway):
    with gateway.connect() as sock:
        opened = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
        data, closed = read_until_closed(sock)
    status, headers, body = response(data)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_timeout" and "headers" in body["error"]["message"]
    assert closed - opened >= LIMITS.header_timeout_s * 0.9


def test_the_header_deadline_applies_to_each_request_of_a_kept_alive_connection(gateway):
    with gateway.connect() as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(read_response(sock))[0] == 200
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")  # the next request stalls
        data, _ = read_until_closed(sock)
    assert response(data)[0] == 408


@pytest.mark.parametrize("path, shape", [("/mii/" + NAME, "RequestTimeout"),
                                         ("/v1/completions", "invalid_request_error")])
def test_a_body_sent_slowly_gets_408_in_the_routes_shape(gateway, path, shape):
    with gateway.connect() as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"prompt".encode())  # 8 of 100 bytes
        opened = time.monotonic()
        data, closed = read_until_closed(sock)
    status, headers, body = response(data)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["type"] == shape and body["error"]["code"] == "request_timeout"
    assert "8 bytes came" in body["error"]["message"]
    assert closed - opened >= LIMITS.body_timeout_s * 0.9


def test_a_body_the_route_does_not_read_does_not_hold_the_connection(gateway):
    """A route that answers without reading the body (here a GET; likewise a 401 or a 404)
    closes the connection rather than wait for the rest of a slow body."""
    with gateway.connect() as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        data, _ = read_until_closed(sock)
    status, headers, body = response(data)
    assert status == 200 and headers["connection"] == "close" and body["object"] == "list"
    # a request without a body keeps its connection (keep-alive is untouched)
    assert "connection" not in gateway.http.get(gateway.base + "/v1/models").headers


# -- item 1 (REST): the body byte limit -------------------------------------------------------
def test_a_content_length_over_the_limit_is_413_before_the_body_is_sent(gateway):
    with gateway.connect() as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {10 * 2 ** 20}\r\n\r\n".encode())  # a 10 MiB body
        data, _ = read_until_closed(sock)
    status, headers, body = response(data)
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large"
    assert f"limit of {LIMITS.max_body_bytes} bytes" in body["error"]["message"]
    assert "Content-Length: 10485760" in body["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413_as_it_is_counted(gateway):
    half = LIMITS.max_body_bytes // 2
    with gateway.connect() as sock:
        sock.sendall(f"POST /mii/{NAME} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.sendall(b"%x\r\n%s\r\n" % (half, b" " * half))
        # one byte more than the limit, and nothing after it (not even the end of the
        # chunk): the count, not the end of the body, decides, and no byte is left unread
        sock.sendall(b"%x\r\n%s" % (half + 1, b" " * (half + 1)))
        data, _ = read_until_closed(sock)
    status, headers, body = response(data)
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["type"] == "RequestTooLarge"
    assert f"more than {LIMITS.max_body_bytes} bytes came" in body["error"]["message"]


def test_a_body_at_the_limit_is_read(gateway):
    body = json.dumps({"prompts": "hi", "max_new_tokens": 0}).encode()
    body += b" " * (LIMITS.max_body_bytes - len(body))
    reply = gateway.post(f"/mii/{NAME}", body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_new_tokens"


# -- item 10: JSON content types only ---------------------------------------------------------
@pytest.mark.parametrize("path, shape", [("/mii/" + NAME, "UnsupportedMediaType"),
                                         ("/v1/completions", "invalid_request_error"),
                                         ("/v1/chat/completions", "invalid_request_error")])
def test_a_body_not_sent_as_json_is_415(gateway, path, shape):
    """Including the types a web page may send anywhere without a CORS preflight."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None, "application/jsonp",
                         "text/json"):
        reply = gateway.post(path, b'{"prompts": "hi", "model": "m", "prompt": "hi"}',
                             content_type)
        assert reply.status_code == 415, (content_type, reply.text)
        error = reply.json()["error"]
        assert error["type"] == shape and error["code"] == "unsupported_content_type"
        assert "application/json" in error["message"]


def test_json_content_types_are_accepted(gateway):
    for content_type in ("application/json", "Application/JSON",
                         "application/json; charset=utf-8", "application/vnd.api+json"):
        reply = gateway.post(f"/mii/{NAME}", b'{"prompts": "hi", "max_new_tokens": 0}',
                             content_type)
        assert reply.status_code == 400, (content_type, reply.text)
        assert reply.json()["error"]["param"] == "max_new_tokens"


# -- item 7: no plain-text 500 ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/mii/" + NAME, "/v1/completions"])
def test_deeply_nested_json_is_400(gateway, path):
    for depth in (33, 100_000):  # past the limit; past Python's recursion limit
        reply = gateway.post(path, b"[" * depth + b"]" * depth)
        assert reply.status_code == 400, (depth, reply.text)
        assert "deeper than 32 levels" in reply.json()["error"]["message"]


def test_json_nested_32_deep_is_read(gateway):
    stop = "[" * 31 + "]" * 31  # 32 levels with the body's object
    reply = gateway.post(f"/mii/{NAME}", f'{{"prompts": "hi", "stop": {stop}}}'.encode())
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop.0"


def test_a_self_key_is_400_naming_it(gateway):
    """Not a TypeError (a 500) from ``agenerate(prompts, **body)`` meeting its own ``self``."""
    reply = gateway.post(f"/mii/{NAME}", json.dumps({"prompts": "hi", "self": 1}).encode())
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "UnknownArgument" and error["param"] == "self"


@pytest.mark.parametrize("path, shape", [("/mii/" + NAME, "ServerError"),
                                         ("/v1/completions", "server_error")])
def test_an_unexpected_error_is_a_json_500_with_the_traceback_only_in_the_log(
        gateway, monkeypatch, caplog, path, shape):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(gateway.client, "agenerate", broken)
    body = {"prompts": "hi"} if path.startswith("/mii") else {"model": NAME, "prompt": "hi"}
    with caplog.at_level(logging.ERROR, logger="mii_core.gateway.app"):
        reply = gateway.post(path, json.dumps(body).encode())
    assert reply.status_code == 500 and reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["type"] == shape and "internal error" in error["message"]
    assert "secret detail" not in reply.text
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


def test_an_unexpected_error_mid_stream_is_an_error_event(gateway, monkeypatch, caplog):
    from mii_core.api.response import Response

    async def breaks_after_one(*args, **kwargs):
        yield Response(generated_text="a", prompt_length=1, generated_length=1,
                       finish_reason="none", index=0)
        raise RuntimeError("secret detail")

    monkeypatch.setattr(gateway.client, "astream", breaks_after_one)
    with caplog.at_level(logging.ERROR, logger="mii_core.gateway.app"):
        reply = gateway.post("/v1/completions", json.dumps(
            {"model": NAME, "prompt": "hi", "stream": True}).encode())
    events = [e for e in reply.text.split("\n\n") if e]
    assert reply.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
    assert "secret detail" not in reply.text
    assert any(r.exc_info for r in caplog.records)


# -- item 8: timeouts --------------------------------------------------------------------------
def test_a_timeout_out_of_range_is_400_naming_it(gateway):
    numbers = ("NaN", "Infinity", "-Infinity", "-1", "0", "1e10", "1e400", str(2 ** 70),
               "86400.5")
    for timeout in numbers + ('"10"', "true"):
        reply = gateway.post(f"/mii/{NAME}",
                             f'{{"prompts": "hi", "timeout": {timeout}}}'.encode())
        assert reply.status_code == 400, (timeout, reply.text)
        error = reply.json()["error"]
        assert error["param"] == "timeout", (timeout, error)
        assert timeout not in numbers or "at most 86400" in error["message"], (timeout, error)


def test_a_timeout_in_range_is_passed_to_the_client(gateway, monkeypatch):
    seen = []

    async def record(prompts, timeout=None, **kwargs):
        seen.append(timeout)
        return []

    monkeypatch.setattr(gateway.client, "agenerate", record)
    for timeout in ("86400", "0.25"):
        reply = gateway.post(f"/mii/{NAME}", f'{{"prompts": "hi", "timeout": {timeout}}}'.encode())
        assert reply.status_code == 200, reply.text
    assert seen == [86400.0, 0.25]


def test_a_value_beyond_the_wire_format_is_400_naming_the_field(gateway):
    """Values that GenerateParamsConfig refuses (e.g. beyond the int64 the wire carries)
    are refused before any call, in either route's names; not a 500 from protobuf."""
    cases = [("/mii/" + NAME, {"prompts": "hi", "max_new_tokens": 2 ** 70}, "max_new_tokens"),
             ("/mii/" + NAME, {"prompts": "hi", "max_length": 2 ** 64}, "max_length"),
             ("/mii/" + NAME, {"prompts": "hi", "top_k": 2 ** 70}, "top_k"),
             ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2 ** 70},
              "max_tokens"),
             ("/v1/completions", {"model": NAME, "prompt": "hi", "top_k": 2 ** 70}, "top_k")]
    for path, body, field in cases:
        reply = gateway.post(path, json.dumps(body).encode())
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == field, reply.text
