"""The built-in plugins fill the role protocols they are registered for."""
from __future__ import annotations

from mii_core.plugins.interfaces import Connection
from mii_transport.grpc.plugin import GrpcTransport


def test_the_grpc_connection_is_a_connection():
    connection = GrpcTransport().connect("127.0.0.1", 9)  # channels connect lazily
    try:
        assert isinstance(connection, Connection)
        assert connection.address == "127.0.0.1:9"
        assert not connection.is_serving(timeout=0.2)  # nothing listens on port 9
    finally:
        connection.close()
