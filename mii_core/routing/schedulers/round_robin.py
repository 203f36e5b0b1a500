"""``round_robin``: request n goes to replica n mod M, skipping unhealthy replicas."""
from __future__ import annotations

from typing import Sequence


class RoundRobinScheduler:
    """Exact round-robin over replica indices (requests 0, 2 -> replica 0; 1, 3 -> replica 1)."""

    name = "round_robin"

    def __init__(self, replica_count: int) -> None:
        self.replica_count = replica_count
        self._next = 0

    def pick(self, candidates: Sequence[int]) -> int:
        """The next replica in cyclic order that is among ``candidates``."""
        healthy = set(candidates)
        for offset in range(self.replica_count):
            replica = (self._next + offset) % self.replica_count
            if replica in healthy:
                self._next = replica + 1
                return replica
        return candidates[0]

    def started(self, replica: int) -> None:
        """Nothing to track."""

    def finished(self, replica: int) -> None:
        """Nothing to track."""
