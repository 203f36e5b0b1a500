"""Which host names are this machine, and which address to dial or bind for each role.

One rule, used by every process: a replica placed on a local name (``localhost``,
``127.0.0.1``, ``""`` or this machine's hostname, as a hostfile may write it) binds the
loopback only and is dialled there; a replica on another host binds every interface
(the load balancer must reach it) and is dialled by its name. Servers bound to a
wildcard address are reached on the loopback of the matching family.

"This machine" is the deployment's head, where the supervisor and the load balancer
run. A rank started on another host (``remote_main``) sets ``MII_HEAD_HOST`` to the
head's hostname, so that there its own hostname is not mistaken for the head's.
"""
from __future__ import annotations

import os
import socket

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
