"""Entry point of the REST gateway process: ``python -m mii_core.control.gateway_main RECORD``.

Started by the supervisor when ``enable_restful_api=True``, in its own process
group, and stopped with the rest of the deployment. It reaches the deployment
only through the public client API (``MIIClient``), like any other client.
"""
from __future__ import annotations

import logging
import sys

from mii_core.control import lifecycle
from mii_core.deploy.addresses import dial_host, gateway_bind_host

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Serve the deployment's REST / OpenAI-compatible API until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    record = lifecycle.start_child("rest-gateway", args[0])
    if record is None:
        return 2
    from mii_core.api.client import MIIClient
    from mii_core.gateway import create_app
    from mii_core.gateway.limits import GatewayLimits, body_limit
    from mii_core.gateway.server import uvicorn_server

    config = record.mii_config
    host = dial_host(record.host)
    client = MIIClient(config, host=host, port=record.port)
    limits = GatewayLimits(max_body_bytes=body_limit(config.max_request_bytes))
    app = create_app(config, client, limits)
    bind = gateway_bind_host(config.restful_api_host)
    if bind not in ("127.0.0.1", "::1") and not config.auth_token:
        log.warning("the REST gateway binds %s without auth_token: anyone who can reach it "
                    "can generate", bind)
    log.info("[progress] REST gateway on http://%s:%d (deployment %s on port %d; at most %d "
             "requests in flight)", bind, config.restful_api_port, config.deployment_name,
             record.port, config.restful_processes)
    server = uvicorn_server(app, bind, config.restful_api_port, limits)
    server.run()
    # uvicorn returns (rather than raising) when it cannot bind; say so in the exit status.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
