"""Test helpers for mii (tiny offline models and fixtures)."""
