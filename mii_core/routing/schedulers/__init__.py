"""mii's own scheduler plugins (registered through the ``mii.schedulers`` entry points)."""
