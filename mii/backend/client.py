"""``mii.backend.client.MIIClient(mii_config, host=...)``, as in DeepSpeed-MII."""
from mii_core.api.client import MIIClient

__all__ = ["MIIClient"]
