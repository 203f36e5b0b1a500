"""Prometheus text for the gateway's ``/metrics``: the deployment's serving metrics, read
from the load balancer's Info reply at scrape time, plus the gateway's own counters.

Per-replica families are named ``mii_replica_*`` and carry ``replica="<index>"``;
the same quantities summed over every replica that answered are ``mii_*`` without
the label (so ``sum()`` over either never double counts). Names and meanings are
listed in docs/metrics.md.
"""
from __future__ import annotations

from dataclasses import asdict

from typing import Any, Dict, Iterable, List, Optional, Tuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from mii_core.routing.stats import BUCKETS_S, ReplicaStats

OUTCOMES = ("ok", "cancelled", "rejected", "error")
HISTOGRAMS = (
    ("time_to_first_token_seconds", "Seconds from a prompt's arrival at a replica to its first "
     "generated token."),
    ("inter_token_latency_seconds", "Seconds between consecutive generated tokens of a prompt."),
    ("end_to_end_latency_seconds", "Seconds from a prompt's arrival at a replica to its last "
     "token."),
)


class _Hist:
    """A replica histogram as reported in Info: per-bucket counts (last is +Inf), sum, count."""

    def __init__(self, data: Dict[str, Any]) -> None:
        self.bounds: List[float] = [float(b) for b in data.get("buckets", [])]
        self.counts: List[int] = [int(c) for c in data.get("counts", [])]
        self.total = float(data.get("sum", 0.0))
        self.count = int(data.get("count", 0))
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("histogram counts do not match its buckets")

    def add(self, other: "_Hist") -> None:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.count += other.count

    def cumulative(self) -> List[Tuple[str, float]]:
        buckets, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            buckets.append((floatToGoString(bound), running))
        buckets.append(("+Inf", running + self.counts[-1]))
        return buckets


# The KV cache's figures (``KVStats`` in each replica's stats): (key, family suffix, is a
# counter, help). A replica without a block pool (the dynamic cache) reports zeros.
KV_FIGURES = (
    ("blocks_total", "kv_blocks_total", False, "KV cache blocks in the replica's pool."),
    ("blocks_used", "kv_blocks_used", False, "KV cache blocks held by sequences now."),
    ("prefix_query_tokens", "prefix_cache_query_tokens", True,
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_hit_tokens", "prefix_cache_hit_tokens", True,
     "Prompt tokens found in the prefix cache (their KV reused, not recomputed)."),
    ("preemptions", "kv_preemptions", True,
     "Running sequences preempted for KV memory (recomputed later)."),
)


def _kv_families(answered: List[Tuple[str, Dict[str, Any]]]) -> List[Metric]:
    """Per-replica and aggregated families of the KV cache's figures, from (replica
    label, its ``kv`` stats) of the replicas that answered Info."""
    families: List[Metric] = []
    for key, suffix, counter, doc in KV_FIGURES:
        kind = CounterMetricFamily if counter else GaugeMetricFamily
        per = kind(f"mii_replica_{suffix}", doc, labels=["replica"])
        total = 0
        for label, kv in answered:
            value = int(kv.get(key, 0) or 0)
            per.add_metric([label], value)
            total += value
        families += [per, kind(f"mii_{suffix}", doc + " All replicas.", value=total)]
    return families


def deployment_families(info: Optional[Dict[str, Any]], deployment: str) -> List[Metric]:
    """Metric families describing the deployment from its Info reply (None: it did not answer)."""
    up = GaugeMetricFamily("mii_deployment_up", "1 if the deployment answered the gateway's "
                           "Info call for this scrape, else 0.")
    up.add_metric([], 1 if info is not None else 0)
    families: List[Metric] = [up]
    if info is None:
        return families
    described = GaugeMetricFamily("mii_deployment_info", "The served deployment (value is 1).",
                                  labels=["deployment", "model", "engine", "scheduler"])
    described.add_metric([str(info.get("deployment", deployment)), str(info.get("model", "")),
                          str(info.get("engine", "")), str(info.get("scheduler", ""))], 1)
    families.append(described)
    replicas = [r for r in info.get("replicas", []) if isinstance(r, dict)]

    replica_count = GaugeMetricFamily("mii_replicas", "Replicas of the deployment.")
    replica_count.add_metric([], len(replicas))
    healthy_count = GaugeMetricFamily("mii_replicas_healthy",
                                      "Replicas passing the load balancer's health check.")
    healthy_count.add_metric([], sum(1 for r in replicas if r.get("healthy")))
    healthy = GaugeMetricFamily("mii_replica_healthy", "1 if the replica passes the load "
                                "balancer's health check, else 0.", labels=["replica"])
    routed = CounterMetricFamily("mii_replica_routed_requests", "Requests the load balancer "
                                 "routed to the replica since the load balancer started.",
                                 labels=["replica"])
    per_requests = CounterMetricFamily("mii_replica_requests", "Requests finished by the "
                                       "replica, by outcome (ok, cancelled, rejected, error).",
                                       labels=["replica", "outcome"])
    per_tokens = CounterMetricFamily("mii_replica_tokens_generated",
                                     "Tokens generated by the replica.", labels=["replica"])
    per_queue = GaugeMetricFamily("mii_replica_queue_depth", "Requests waiting in the "
                                  "replica's queue (not yet in the running batch).",
                                  labels=["replica"])
    per_running = GaugeMetricFamily("mii_replica_running_batch_size",
                                    "Prompts in the replica's running batch.", labels=["replica"])
    per_hist = {name: HistogramMetricFamily(f"mii_replica_{name}", doc, labels=["replica"])
                for name, doc in HISTOGRAMS}

    requests = {outcome: 0 for outcome in OUTCOMES}
    tokens = queue = running = 0
    sums: Dict[str, Optional[_Hist]] = {name: None for name, _ in HISTOGRAMS}
    answered_kv: List[Tuple[str, Dict[str, Any]]] = []  # (label, kv stats) of those answering
    for entry in replicas:
        label = str(entry.get("index", replicas.index(entry)))
        healthy.add_metric([label], 1 if entry.get("healthy") else 0)
        routed.add_metric([label], int(entry.get("routed", 0)))
        stats = ReplicaStats.from_dict(entry.get("stats"))
        if stats is None:  # the replica did not answer Info (restarting, lost)
            continue
        metrics = asdict(stats.metrics)
        answered_kv.append((label, stats.kv))
        for outcome, count in sorted(metrics.get("requests_total", {}).items()):
            per_requests.add_metric([label, outcome], int(count))
            requests[outcome] = requests.get(outcome, 0) + int(count)
        per_tokens.add_metric([label], int(metrics.get("tokens_generated_total", 0)))
        tokens += int(metrics.get("tokens_generated_total", 0))
        per_queue.add_metric([label], int(metrics.get("queue_depth", 0)))
        queue += int(metrics.get("queue_depth", 0))
        per_running.add_metric([label], int(metrics.get("running_batch_size", 0)))
        running += int(metrics.get("running_batch_size", 0))
        for name, _ in HISTOGRAMS:
            if not isinstance(metrics.get(name), dict):
                continue
            hist = _Hist(metrics[name])
            per_hist[name].add_metric([label], hist.cumulative(), hist.total)
            if sums[name] is None:
                sums[name] = _Hist(metrics[name])
            else:
                sums[name].add(hist)

    total_requests = CounterMetricFamily("mii_requests", "Requests finished by all replicas, by "
                                         "outcome.", labels=["outcome"])
    for outcome, count in sorted(requests.items()):
        total_requests.add_metric([outcome], count)
    total_tokens = CounterMetricFamily("mii_tokens_generated", "Tokens generated by all "
                                       "replicas.", value=tokens)
    total_queue = GaugeMetricFamily("mii_queue_depth", "Requests waiting in all replicas' "
                                    "queues.", value=queue)
    total_running = GaugeMetricFamily("mii_running_batch_size", "Prompts in all replicas' "
                                      "running batches.", value=running)
    families += [replica_count, healthy_count, healthy, routed, per_requests, per_tokens,
                 per_queue, per_running, *per_hist.values(), total_requests, total_tokens,
                 total_queue, total_running]
    families += _kv_families(answered_kv)
    for name, doc in HISTOGRAMS:
        total = sums[name] or _Hist({"buckets": list(BUCKETS_S),
                                     "counts": [0] * (len(BUCKETS_S) + 1)})
        family = HistogramMetricFamily(f"mii_{name}", doc + " All replicas.")
        family.add_metric([], total.cumulative(), total.total)
        families.append(family)
    return families


class _Families:
    """A collector that yields a fixed list of families (one scrape's worth)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


def render_deployment(info: Optional[Dict[str, Any]], deployment: str) -> bytes:
    """Prometheus text exposition of :func:`deployment_families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(deployment_families(info, deployment)))
    return generate_latest(registry)


class GatewayMetrics:
    """The gateway's own counters, in a registry of their own (not the process-global one)."""

    def __init__(self, max_in_flight: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mii_gateway_requests", "HTTP requests answered by the gateway, "
                                "by route and status code.", ["route", "code"],
                                registry=self.registry)
        self.duration = Histogram("mii_gateway_request_duration_seconds", "Seconds from "
                                  "request to the last byte of the response (streams "
                                  "included), by route.", ["route"], buckets=BUCKETS_S,
                                  registry=self.registry)
        self.in_flight = Gauge("mii_gateway_in_flight_requests", "Generate requests the "
                               "gateway is forwarding to the deployment now.",
                               registry=self.registry)
        self.waiting = Gauge("mii_gateway_waiting_requests", "Generate requests waiting for "
                             "one of the gateway's in-flight slots (restful_processes).",
                             registry=self.registry)
        limit = Gauge("mii_gateway_max_in_flight_requests", "The gateway's limit of generate "
                      "requests in flight (restful_processes).", registry=self.registry)
        limit.set(max_in_flight)

    def observe(self, route: str, code: int, seconds: float) -> None:
        """Count one answered HTTP request."""
        self.requests.labels(route, str(code)).inc()
        self.duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition of the gateway's own metrics."""
        return generate_latest(self.registry)


def render(info: Optional[Dict[str, Any]], deployment: str,
           gateway: Optional[GatewayMetrics] = None) -> bytes:
    """The whole ``/metrics`` page."""
    text = render_deployment(info, deployment)
    return text + (gateway.render() if gateway is not None else b"")

