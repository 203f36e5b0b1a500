"""Backend classes at DeepSpeed-MII's paths."""
from mii.backend.client import MIIClient

__all__ = ["MIIClient"]
