"""Bounding what one HTTP request costs the gateway before any of its fields is read.

- ``HeaderDeadlineProtocol``: uvicorn's h11 protocol with a deadline for each request's
  line and headers (uvicorn has none; see ``limits``); 408 when it passes.
- ``read_json``: the body of a POST, only if it says it is JSON (415 otherwise), at most
  ``max_body_bytes`` (413, from Content-Length before anything is read, else while a
  chunked body is counted), within ``body_timeout_s`` (408), nested at most
  ``MAX_JSON_DEPTH`` deep (400).
- ``CloseUnreadBody``: a response sent before the body was read in full closes the
  connection, so that a refused or ignored body cannot keep it open.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable, List, Optional, Tuple

import h11
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from mii_core.gateway import openai_api as oa
from mii_core.gateway.limits import MAX_JSON_DEPTH, GatewayLimits


class RequestRefused(Exception):
    """A request refused for its framing or its JSON before any field was looked at.

    ``code`` is the OpenAI-style error code, ``mii_type`` the error type on ``/mii``."""

    def __init__(self, status: int, message: str, code: Optional[str], mii_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.mii_type = mii_type

    def as_error(self, mii: bool) -> oa.RequestError:
        """The error in the shape of ``/mii`` (``mii=True``) or of the OpenAI routes."""
        return oa.RequestError(self.status, self.message,
                               self.mii_type if mii else "invalid_request_error", None, self.code)


def _timed_out(what: str, seconds: float) -> RequestRefused:
    return RequestRefused(408, f"the request {what} did not arrive within {seconds:g} s",
                          "request_timeout", "RequestTimeout")


def _too_large(limit: int, seen: str) -> RequestRefused:
    return RequestRefused(413, f"the request body is larger than the gateway's limit of {limit} "
                          f"bytes ({seen})", "request_too_large", "RequestTooLarge")


def _invalid_json(why: str) -> RequestRefused:
    return RequestRefused(400, f"the request body is not valid JSON ({why})", None,
                          "InvalidRequest")


def _too_deep() -> RequestRefused:
    return RequestRefused(400, f"the request body nests objects and arrays deeper than "
                          f"{MAX_JSON_DEPTH} levels", None, "InvalidRequest")


def require_json(content_type: Optional[str]) -> None:
    """Refuse a body whose Content-Type is not JSON (``application/json`` or
    ``application/*+json``, any parameters). A web page may send text/plain, form or
    multipart bodies to any origin without a CORS preflight; JSON needs one, so a page
    cannot start generations on a gateway that has no ``auth_token``."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    got = repr(content_type) if content_type else "none"
    raise RequestRefused(415, f"the request body must be JSON sent with Content-Type: "
                         f"application/json (got {got})", "unsupported_content_type",
                         "UnsupportedMediaType")


async def read_body(request: Request, limits: GatewayLimits) -> bytes:
    """The whole body, within the size limit and the body deadline."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, f"Content-Length: {declared}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    chunks: List[bytes] = []
    size = 0
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), deadline - loop.time())
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise _timed_out(f"body ({size} bytes came)", limits.body_timeout_s) from None
        size += len(chunk)
        if size > limit:  # only a chunked body: h11 holds others to their Content-Length
            raise _too_large(limit, f"more than {limit} bytes came")
        chunks.append(chunk)


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether objects and arrays in ``value`` nest more than ``limit`` deep; level by
    level, since a recursive walk would hit the recursion limit this guards against."""
    level = [value]
    for _ in range(limit):
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def parse_json(body: bytes) -> Any:
    """The parsed body; 400 for invalid JSON or nesting deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(body)
    except RecursionError:  # the parser's own recursion: far deeper than the limit
        raise _too_deep() from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise _invalid_json(str(error)) from None
    # fewer brackets than the limit cannot nest deeper: most bodies skip the walk
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and \
            isinstance(value, (dict, list)) and _nests_deeper(value, MAX_JSON_DEPTH):
        raise _too_deep()
    return value


async def read_json(request: Request, limits: GatewayLimits) -> Any:
    """The JSON body of a POST: checked for its content type, size, deadline and depth."""
    require_json(request.headers.get("content-type"))
    return parse_json(await read_body(request, limits))


def _has_body(headers: Iterable[Tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
               for name, value in headers)


class CloseUnreadBody:
    """ASGI middleware: a response that starts before the request body was read in full
    says ``Connection: close``, and uvicorn closes the connection after it. Otherwise
    uvicorn keeps the connection and discards the rest of the body for as long as the
    client sends it: a 401, 404, 413 or 415 would leave the connection to a client that
    sends its body slowly open for ever."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            return await self.app(scope, receive, send)
        body_read = False

        async def receive_noting_the_end():
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True  # the last chunk came (or the client is gone)
            return message

        async def send_closing(message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing)


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(_timed_out("headers", seconds).as_error(mii=False).body(),
                      separators=(",", ":")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with ``header_timeout_s`` for each request's line and headers.

    The clock starts when the connection opens and, on a kept-alive connection, with the
    first byte of the next request (until then uvicorn's ``timeout_keep_alive`` applies).
    When it runs out the connection is closed, after a JSON 408 if part of a request came.
    Use a subclass that sets ``header_timeout_s`` (``with_header_timeout``)."""

    header_timeout_s: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._request_begun = False

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type:
        """The protocol class to give uvicorn (``http=``)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds})

    def _start_header_clock(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._request_begun = False

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a request whose headers are due
            if self._header_timer is None:
                self._start_header_clock()
            self._request_begun = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in (or it was refused)
            self._stop_header_clock()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)
