"""``Response`` at DeepSpeed-MII's path (``mii.batching.data_classes.Response``)."""
from mii_core.api.response import Response

__all__ = ["Response"]
