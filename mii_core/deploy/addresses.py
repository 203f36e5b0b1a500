"""Which host names are this machine, and which address to dial or bind for each role.

One rule, used by every process: a replica placed on a local name (``localhost``,
``127.0.0.1``, ``""`` or this machine's hostname, as a hostfile may write it) binds the
loopback only and is dialled there; a replica on another host binds every interface
(the load balancer must reach it) and is dialled by its name. Servers bound to a
wildcard address are reached on the loopback of the matching family.

"This machine" is the deployment's head, where the supervisor and the load balancer
run. A rank started on another host (``remote_main``) sets ``MII_HEAD_HOST`` to the
head's hostname, so that there its own hostname is not mistaken for the head's.

What a user names a deployment by is either its name or its ``host:port`` address, told
apart by the ':' (``parse_address``).
"""
from __future__ import annotations

import os
import socket
from typing import Optional, Tuple

HEAD_HOST_ENV = "MII_HEAD_HOST"
LOOPBACK_NAMES = frozenset({"", "localhost", "127.0.0.1"})


def is_local(hostname: str) -> bool:
    """True if ``hostname`` names the deployment's head machine (this one, unless
    ``MII_HEAD_HOST`` names another)."""
    head = os.environ.get(HEAD_HOST_ENV) or socket.gethostname()
    return hostname in LOOPBACK_NAMES or hostname == head


def replica_bind_host(hostname: str) -> str:
    """The address a replica placed on ``hostname`` binds."""
    return "127.0.0.1" if is_local(hostname) else "0.0.0.0"


def replica_dial_host(hostname: str) -> str:
    """The address the load balancer dials for a replica placed on ``hostname``: the
    same interface ``replica_bind_host`` bound."""
    return "127.0.0.1" if is_local(hostname) else hostname


def dial_host(bound: str) -> str:
    """Where to reach a server bound to ``bound`` from this machine."""
    if bound in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if bound == "::" else bound


def gateway_bind_host(host: str) -> str:
    """The address the REST gateway binds: ``localhost`` means the IPv4 loopback only."""
    return "127.0.0.1" if host in ("", "localhost") else host


def parse_address(target: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` of a ``host:port`` target; None for a deployment name. A name never
    holds ':' (``check_deployment_name``), so a target with one is an address and must be
    a valid one: ValueError says what is wrong with it (an IPv6 host keeps its brackets:
    ``[::1]:50050``, as gRPC dials it)."""
    if ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{target!r} is not a deployment name (names cannot contain ':') "
                         f"nor a host:port address (the port must be 1-65535)")
    return host, int(port)
