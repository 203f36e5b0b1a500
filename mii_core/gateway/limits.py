"""What one HTTP request may cost the REST gateway: how long its headers and its body may
take to arrive, how large its body may be and how deeply its JSON may nest (its
``timeout`` is checked as every client's is: ``config.kwargs.check_timeout``).

uvicorn bounds none of the first three by itself (measured with uvicorn 0.54 / h11 0.16):
a client that connects and sends nothing, sends its headers a byte at a time, or stops
half-way through its body holds its connection open for ever, and any body size is read
into memory. h11 bounds the size of the request line and headers (16 KiB).
"""
from __future__ import annotations

from dataclasses import dataclass

from mii_core.config.models import MIIConfig

BODY_OVERHEAD_BYTES = 2 ** 20
"""Room in a body beyond its prompt text: the JSON around it and the other parameters."""


def body_limit(max_request_bytes: int) -> int:
    """The largest body that can carry ``max_request_bytes`` of prompt text (a
    deployment's ``MIIConfig.max_request_bytes``) and its JSON."""
    return max_request_bytes + BODY_OVERHEAD_BYTES


MAX_BODY_BYTES = body_limit(MIIConfig.model_fields["max_request_bytes"].default)
"""Default largest request body: that of MIIConfig's default ``max_request_bytes``.
Refused (413) before it is parsed."""
HEADER_TIMEOUT_S = 10.0
"""Default time a request's line and headers may take to arrive in full, counted from the
connection's start or, on a kept-alive connection, from the request's first byte."""
BODY_TIMEOUT_S = 60.0
"""Default time a request's whole body may take to arrive once its headers are in (in all,
not between reads: a client sending a byte now and then is cut off too; 9 MiB in 60 s
needs 160 KB/s)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of objects and arrays in a request body (OpenAI's bodies nest 4 deep);
deeper bodies would exhaust Python's recursion limit somewhere after parsing."""


@dataclass(frozen=True)
class GatewayLimits:
    """The per-request bounds a gateway enforces (see the module constants)."""

    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
