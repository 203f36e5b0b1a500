"""Deployment state: registry records, logs, placement on devices, ports, model sources."""
