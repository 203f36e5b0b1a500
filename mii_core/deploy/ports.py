"""Port checks and free-port selection, so that busy ports fail early and by name."""
from __future__ import annotations

import contextlib
import socket
from typing import List

from mii_core.errors import PortInUseError


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``port`` can be bound on ``host`` right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        # Like the servers we start: TIME_WAIT leftovers must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortInUseError` naming ``what`` if ``port`` is bound."""
    if not is_port_free(port, host):
        raise PortInUseError(f"{what} port {port} on {host} is already in use; "
                             f"choose another {what} or stop whatever listens there")


def free_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """``count`` distinct ports that were free a moment ago (held together while picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port that was free a moment ago."""
    return free_ports(1, host)[0]
