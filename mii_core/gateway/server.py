"""The uvicorn server that runs the gateway's app: one asyncio process, h11 with a header
deadline (``guard.HeaderDeadlineProtocol``), warnings only in the log."""
from __future__ import annotations

import uvicorn

from mii_core.gateway.guard import HeaderDeadlineProtocol
from mii_core.gateway.limits import GatewayLimits


def uvicorn_server(app, host: str, port: int, limits: GatewayLimits) -> uvicorn.Server:
    """A server for ``app`` on ``host:port``; ``run()`` it (or ``serve()`` in a loop)."""
    return uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, http=HeaderDeadlineProtocol.with_header_timeout(
            limits.header_timeout_s), log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=2, backlog=2048))
