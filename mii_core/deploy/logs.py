"""Per-deployment log file: every process of a deployment appends to one file.

Lines tagged ``[progress]`` are also shown in the terminal that called ``serve()``.
Log files are opened as ``home.open_private`` opens them: never through a symbolic link.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from pathlib import Path

from mii_core.deploy import home
from mii_core.errors import ConfigError

PROGRESS_TAG = "[progress]"


def configure(role: str) -> None:
    """Log to stderr (the deployment log file for child processes) tagged with ``role``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {role} pid=%(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MII_LOG_LEVEL", "INFO"))
    # grpc/transformers chatter at INFO hides our own progress lines.
    for noisy in ("grpc", "asyncio", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def tail(path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of ``path`` ('' if it does not exist or is not a private
    file of this user)."""
    try:
        with home.open_private_text(path) as handle:
            return "".join(deque(handle, maxlen=lines))
    except (OSError, ConfigError):
        return ""


class ProgressFollower:
    """Yields new ``[progress]`` lines of a log file, reading from where it was created."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = self.path.lstat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[str]:
        """Progress lines appended since the last call."""
        try:
            with home.open_private_text(self.path) as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except (OSError, ConfigError):
            return []
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        return [line.split(PROGRESS_TAG, 1)[1].strip() for line in complete.splitlines()
                if PROGRESS_TAG in line]
