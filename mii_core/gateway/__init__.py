"""The REST gateway (``enable_restful_api=True``): MII's RESTful API, an OpenAI-compatible
API, ``/health`` and Prometheus ``/metrics`` over a deployment's client API.

Run by ``python -m mii_core.control.gateway_main RECORD`` (started by the supervisor).
"""
from mii_core.gateway.app import create_app

__all__ = ["create_app"]
