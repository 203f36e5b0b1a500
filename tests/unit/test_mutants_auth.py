"""The shared-token check of the gRPC servers (``mii_transport/grpc/auth.py``), on an
in-process grpc.aio server on loopback: no deployment, no model (written from
mutation testing: tools/mutation.py)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from mii_transport.grpc.auth import HEADER, TokenInterceptor, auth_metadata, token_matches
from mii_transport.grpc.status import ERROR_KEY

TOKEN = "s3cret"


def test_metadata_carries_a_bearer_token_only_when_there_is_one():
    assert auth_metadata(TOKEN) == (("authorization", f"Bearer {TOKEN}"),)
    assert HEADER == "authorization"
    assert auth_metadata(None) == ()
    assert auth_metadata("") == ()


@pytest.mark.parametrize("header, expected", [
    (f"Bearer {TOKEN}", True), (None, False), ("", False), (TOKEN, False),
    ("Bearer nope", False), (f"Bearer {TOKEN}x", False), (f"bearer {TOKEN}", False),
])
def test_token_matches_only_the_exact_header(header, expected):
    assert token_matches(TOKEN, header) is expected


def _unary(request, context):
    return b"unary:" + request


def _stream(request, context):
    for part in (b"a", b"b"):
        yield part + request


def _health(request, context):
    return b"healthy"


async def _serve_and_call(calls):
    """Start a token-guarded server with a unary, a streaming and a health method; run
    ``calls(channel)`` against it."""
    server = grpc.aio.server(interceptors=[TokenInterceptor(TOKEN)])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        }),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(_health),
        }),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await calls(channel)
    finally:
        await server.stop(None)


async def _outcome(call):
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            return ("ok", [part async for part in result])
        return ("ok", await result)
    except grpc.aio.AioRpcError as error:
        trailing = dict(error.trailing_metadata() or ())
        return (error.code(), error.details(), trailing.get(ERROR_KEY))


def _run(metadata):
    async def calls(channel):
        unary = channel.unary_unary("/test.Echo/Unary")
        stream = channel.unary_stream("/test.Echo/Stream")
        health = channel.unary_unary("/grpc.health.v1.Health/Check")
        missing = channel.unary_unary("/test.Echo/Missing")
        return [await _outcome(lambda: unary(b"x", metadata=metadata)),
                await _outcome(lambda: stream(b"y", metadata=metadata)),
                await _outcome(lambda: health(b"", metadata=metadata)),
                await _outcome(lambda: missing(b"", metadata=metadata))]

    return asyncio.run(_serve_and_call(calls))


DENIED = (grpc.StatusCode.UNAUTHENTICATED,
          "missing or wrong token: pass the deployment's auth_token", "AuthenticationError")


def test_the_token_holder_is_served_unary_and_streaming():
    unary, stream, health, missing = _run(auth_metadata(TOKEN))
    assert unary == ("ok", b"unary:x")
    assert stream == ("ok", [b"ay", b"by"])
    assert health == ("ok", b"healthy")
    assert missing[0] == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("metadata", [(), auth_metadata("wrong"), (("authorization", TOKEN),)])
def test_calls_without_the_token_are_refused_but_the_health_check_is_open(metadata):
    unary, stream, health, missing = _run(metadata)
    assert unary == DENIED
    assert stream == DENIED
    assert health == ("ok", b"healthy")  # probes (load balancer, serve()) need no token
    assert missing[0] == grpc.StatusCode.UNIMPLEMENTED  # an unknown method stays unknown
