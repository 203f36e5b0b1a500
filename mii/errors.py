"""Every exception mii raises (``mii.errors.UnknownArgument`` etc.)."""
from mii_core.errors import *  # noqa: F401,F403
from mii_core.errors import ERROR_CLASSES, MIIError

__all__ = ["MIIError", *ERROR_CLASSES]
