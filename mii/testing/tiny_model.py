"""Facade for :mod:`mii_engines.tiny_model` so ``python -m mii.testing.tiny_model DIR`` works."""

from __future__ import annotations

import sys

from mii_engines.tiny_model import (
    build_tiny_model,
    default_tiny_model_dir,
    ensure_tiny_model,
    main,
)

__all__ = ["build_tiny_model", "default_tiny_model_dir", "ensure_tiny_model", "main"]

if __name__ == "__main__":
    sys.exit(main())
