"""Helpers shared by test folders (import as ``helpers.<module>``; tests/ is on the path)."""
