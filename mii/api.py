"""The persistent and in-process entry points at DeepSpeed-MII's path (``mii.api``)."""
from mii_core.api.serve import client, serve
from mii_core.control.pipeline import pipeline

__all__ = ["serve", "client", "pipeline"]
