"""Processes of a deployment: the supervisor, launch commands, and each child's entry point."""
