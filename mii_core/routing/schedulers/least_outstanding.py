"""``least_outstanding``: the replica with the fewest requests in flight (lowest index on ties)."""
from __future__ import annotations

from typing import Sequence


class LeastOutstandingScheduler:
    """Routes to the least-loaded healthy replica."""

    name = "least_outstanding"

    def __init__(self, replica_count: int) -> None:
        self.outstanding = [0] * replica_count

    def pick(self, candidates: Sequence[int]) -> int:
        """The candidate with the fewest in-flight requests."""
        return min(candidates, key=lambda r: (self.outstanding[r], r))

    def started(self, replica: int) -> None:
        """Count a request in flight."""
        self.outstanding[replica] += 1

    def finished(self, replica: int) -> None:
        """A request left ``replica``."""
        self.outstanding[replica] = max(0, self.outstanding[replica] - 1)
