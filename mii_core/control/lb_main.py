"""Entry point of the load-balancer process: ``python -m mii_core.control.lb_main RECORD``."""
from __future__ import annotations

import logging
import sys

from mii_core.control import lifecycle
from mii_core.deploy.addresses import replica_dial_host
from mii_core.plugins.discovery import load_driver, register_driver

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Serve the deployment's client-facing port with the configured transport and scheduler."""
    args = sys.argv[1:] if argv is None else argv
    record = lifecycle.start_child("load-balancer", args[0])
    if record is None:
        return 2
    config = record.mii_config
    scheduler = load_driver("scheduler", config.scheduler)(len(record.replicas))
    transport = load_driver("transport", config.transport)()
    register_driver(scheduler, "scheduler")
    addresses = [f"{replica_dial_host(r.hostname)}:{r.port}" for r in record.replicas]
    log.info("[progress] load balancer on %s:%d -> %s (scheduler %s)", config.host,
             config.port_number, ", ".join(addresses), config.scheduler)
    transport.serve_load_balancer(config, addresses, scheduler,
                                  lifecycle.request_deployment_shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
