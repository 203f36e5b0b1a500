"""What a replica reports about itself through Info: ``ReplicaStats``, spoken by both ends.

The replica's engine loop fills it (``EngineLoop.stats``) and the transport sends it
as JSON (``to_dict``); the gateway's Prometheus exporter and ``mii status`` read it
back with ``from_dict``. Histograms use fixed buckets (seconds) so that replicas'
histograms add up and render as Prometheus text without raw samples.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

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

    def snapshot(self, queue_depth: int, running: int) -> "MetricsSnapshot":
        """Everything, with the current gauges."""
        return MetricsSnapshot(
            time_to_first_token_seconds=self.time_to_first_token.to_dict(),
            inter_token_latency_seconds=self.inter_token_latency.to_dict(),
            end_to_end_latency_seconds=self.end_to_end_latency.to_dict(),
            requests_total=dict(self.requests), tokens_generated_total=self.tokens_generated,
            queue_depth=queue_depth, running_batch_size=running)


@dataclass
class MetricsSnapshot:
    """A replica's serving metrics at one moment (histograms as ``Histogram.to_dict``)."""

    time_to_first_token_seconds: Dict[str, Any] = field(default_factory=dict)
    inter_token_latency_seconds: Dict[str, Any] = field(default_factory=dict)
    end_to_end_latency_seconds: Dict[str, Any] = field(default_factory=dict)
    requests_total: Dict[str, int] = field(default_factory=dict)
    tokens_generated_total: int = 0
    queue_depth: int = 0
    running_batch_size: int = 0


@dataclass
class ReplicaStats:
    """Counters and state of one replica (rank 0's engine loop)."""

    replica: int
    requests: int = 0  # admitted into the queue
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    steps: int = 0  # forward steps that sampled
    prefills: int = 0  # steps that fed prompt tokens
    prefill_rows: int = 0
    padded_prefill_rows: int = 0  # rows computed only to fill a graph bucket (static cache)
    tokens_generated: int = 0
    queue_depth: int = 0  # prompts waiting for admission
    running: int = 0  # sequences in the batch
    kv: Dict[str, Any] = field(default_factory=dict)  # the KV cache's figures (KVStats)
    metrics: MetricsSnapshot = field(default_factory=MetricsSnapshot)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form, for the wire."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Optional["ReplicaStats"]:
        """The stats in a replica's Info entry; None if there are none (the replica did
        not answer). Keys this version does not know are ignored (a newer replica)."""
        if not isinstance(data, dict) or "replica" not in data:
            return None
        known = {f.name for f in fields(cls)} - {"metrics"}
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        snapshot_keys = {f.name for f in fields(MetricsSnapshot)}
        return cls(**{k: v for k, v in data.items() if k in known},
                   metrics=MetricsSnapshot(**{k: v for k, v in metrics.items()
                                              if k in snapshot_keys}))
