"""Per-deployment log file: every process of a deployment appends to one file.

Lines tagged ``[progress]`` are also shown in the terminal that called ``serve()``.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from pathlib import Path

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
    """The last ``lines`` lines of ``path`` ('' if it does not exist)."""
    try:
        with open(path, "r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


class ProgressFollower:
    """Yields new ``[progress]`` lines of a log file, reading from where it was created."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[str]:
        """Progress lines appended since the last call."""
        try:
            with open(self.path, "r", errors="replace") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        return [line.split(PROGRESS_TAG, 1)[1].strip() for line in complete.splitlines()
                if PROGRESS_TAG in line]
