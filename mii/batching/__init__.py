"""In-process generation at DeepSpeed-MII's path (``mii.batching``)."""
from mii.batching.data_classes import Response
from mii_core.control.pipeline import MIIPipeline

__all__ = ["MIIPipeline", "Response"]
