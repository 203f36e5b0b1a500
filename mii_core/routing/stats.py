"""Serving metrics kept by each replica's engine loop and reported through Info.

Histograms use fixed buckets (seconds) so that the load balancer / gateway can add
replicas' histograms together and render Prometheus text without raw samples.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Dict, List

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
             30.0, 60.0)


class Histogram:
    """Counts per bucket (non-cumulative), plus sum and count."""

    def __init__(self) -> None:
        self.counts: List[int] = [0] * (len(BUCKETS_S) + 1)  # last: +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one sample."""
        self.counts[bisect_left(BUCKETS_S, value)] += 1
        self.total += value
        self.count += 1

    def to_dict(self) -> Dict:
        """JSON-able form: bucket bounds, per-bucket counts, sum, count."""
        return {"buckets": list(BUCKETS_S), "counts": list(self.counts),
                "sum": self.total, "count": self.count}


class ServingMetrics:
    """What one replica measured since it started."""

    def __init__(self) -> None:
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()
        self.end_to_end_latency = Histogram()
        self.requests: Dict[str, int] = {"ok": 0, "cancelled": 0, "rejected": 0, "error": 0}
        self.tokens_generated = 0

    def snapshot(self, queue_depth: int, running: int) -> Dict:
        """Everything, JSON-able, with the current gauges."""
        return {"time_to_first_token_seconds": self.time_to_first_token.to_dict(),
                "inter_token_latency_seconds": self.inter_token_latency.to_dict(),
                "end_to_end_latency_seconds": self.end_to_end_latency.to_dict(),
                "requests_total": dict(self.requests), "tokens_generated_total":
                self.tokens_generated, "queue_depth": queue_depth, "running_batch_size": running}
