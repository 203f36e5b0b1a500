"""The text of ``mii list`` / ``mii status``: tables, durations, histogram quantiles and the
status summary, from plain records (no deployment)."""
from __future__ import annotations

import math

import pytest

from mii_core.cli_format import (
    byte_size,
    deployments_table,
    histogram_quantile,
    kv_lines,
    latency_line,
    seconds,
    status_text,
    table,
)
from mii_core.deploy.registry import DeploymentRecord, ReplicaRecord
from mii_core.routing.stats import BUCKETS_S, Histogram, ReplicaStats, ServingMetrics


def histogram(*samples: float) -> dict:
    h = Histogram()
    for value in samples:
        h.observe(value)
    return h.to_dict()


# -- histogram_quantile ----------------------------------------------------------------------
def test_quantile_of_an_empty_histogram_is_none():
    assert histogram_quantile(histogram(), 0.5) is None


def test_quantile_interpolates_linearly_within_the_bucket():
    # Four samples in (0.01, 0.025]: rank 2 of 4 is halfway through that bucket.
    h = histogram(0.011, 0.012, 0.013, 0.014)
    assert histogram_quantile(h, 0.5) == pytest.approx(0.01 + 0.015 * 0.5)
    assert histogram_quantile(h, 1.0) == pytest.approx(0.025)
    assert histogram_quantile(h, 0.0) == pytest.approx(0.01)  # the bucket's lower bound


def test_quantile_of_the_first_bucket_starts_at_zero():
    h = histogram(0.0005, 0.0005)
    assert histogram_quantile(h, 0.5) == pytest.approx(0.0005)  # half of (0, 0.001]


def test_quantile_skips_empty_buckets_between_samples():
    h = histogram(0.003, 4.0)  # buckets (0.0025, 0.005] and (2.5, 5.0], empty ones between
    assert histogram_quantile(h, 0.5) == pytest.approx(0.005)  # top of the lower bucket
    assert histogram_quantile(h, 0.75) == pytest.approx(2.5 + 2.5 * 0.5)
    assert histogram_quantile(h, 0.0) == pytest.approx(0.0025)  # not 0 (an empty bucket)


def test_quantile_in_the_overflow_bucket_is_infinite():
    h = histogram(0.002, 100.0)
    assert math.isinf(histogram_quantile(h, 0.99))
    assert "p99 > 1 min" in latency_line(h)  # above the last bound, 60 s


@pytest.mark.parametrize("samples", [
    [0.004 * i for i in range(1, 40)],
    [0.3, 0.31, 0.7, 1.5, 2.0, 2.2, 9.0],
    [0.0001] * 10 + [0.2] * 3,
])
def test_quantile_lies_in_the_bucket_of_the_exact_percentile(samples):
    h = histogram(*samples)
    bounds = (0.0,) + BUCKETS_S
    ordered = sorted(samples)
    previous = 0.0
    for q in (0.1, 0.5, 0.9, 0.99):
        exact = ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest-rank percentile
        estimate = histogram_quantile(h, q)
        upper = next(i for i, b in enumerate(bounds) if exact <= b)
        assert bounds[upper - 1] <= estimate <= bounds[upper], (q, exact, estimate)
        assert estimate >= previous  # non-decreasing in q
        previous = estimate


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_quantile_outside_zero_one_is_refused(q):
    with pytest.raises(ValueError, match="quantile must be within"):
        histogram_quantile(histogram(0.1), q)


def test_quantile_of_a_malformed_histogram_is_refused():
    with pytest.raises(ValueError, match="expected one more count"):
        histogram_quantile({"buckets": [0.1, 1.0], "counts": [1, 2]}, 0.5)


def test_latency_line_names_percentiles_mean_and_samples():
    assert latency_line(histogram()) == "no samples yet"
    line = latency_line(histogram(0.011, 0.012, 0.013, 0.014))
    assert line == "p50 17.5 ms  p99 24.9 ms  mean 12.5 ms  (4 samples)"
    assert latency_line(histogram(0.02)).endswith("(1 sample)")


# -- small formatters ------------------------------------------------------------------------
@pytest.mark.parametrize("value, text", [
    (None, "-"), (0.00085, "850 us"), (0.0375, "37.5 ms"), (2.4, "2.40 s"),
    (59.5, "59.50 s"), (60.0, "1 min"), (75.0, "1 min 15 s"), (200.0, "3 min 20 s"),
    (9000.0, "2.5 h"), (math.inf, "inf"),
])
def test_seconds(value, text):
    assert seconds(value) == text


@pytest.mark.parametrize("value, text", [(512, "512 B"), (67117056, "64.0 MiB"),
                                         (3 * 2**40, "3072.0 GiB")])
def test_byte_size(value, text):
    assert byte_size(value) == text


def test_table_aligns_columns_under_the_header():
    text = table(["NAME", "STATE", "MODEL"], [["a", "ready", "/m/one"],
                                              ["longer-name", "dead (stale record)", "x"]])
    assert text.splitlines() == [
        "NAME         STATE                MODEL",
        "a            ready                /m/one",
        "longer-name  dead (stale record)  x",
    ]


def record(name: str, replicas: int, **fields) -> DeploymentRecord:
    return DeploymentRecord(
        name=name, config={"model_config": {"model_name_or_path": f"/models/{name}"}},
        host="127.0.0.1", port=50050, log_path="/dev/null", engine="transformers",
        replicas=[ReplicaRecord(index=i, hostname="localhost", port=4000 + i, dist_port=0)
                  for i in range(replicas)], **fields)


def test_deployments_table_marks_stale_records():
    rows = [(record("tiny", 2, state="ready", created_at=900.0, ready_at=1000.0), True),
            (record("gone-deployment", 1, state="ready", created_at=10.0), False)]
    assert deployments_table(rows, now=1075.0).splitlines() == [
        "NAME             ADDRESS          STATE                ENGINE        REPLICAS  UPTIME"
        "      MODEL",
        "tiny             127.0.0.1:50050  ready                transformers  2         "
        "1 min 15 s  /models/tiny",
        "gone-deployment  127.0.0.1:50050  dead (stale record)  transformers  1         -"
        "           /models/gone-deployment",
    ]


def test_table_refuses_a_row_of_another_width():
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        table(["a", "b", "c"], [["1", "2"]])


# -- the KV cache and the status summary -----------------------------------------------------
PAGED = {"kind": "paged", "block_size": 16, "blocks_total": 8192, "blocks_used": 96,
         "blocks_peak": 120, "bytes_total": 67117056, "prefix_hit_tokens": 32,
         "prefix_query_tokens": 128, "preemptions": 2, "padded_rows": 0}


def test_kv_lines_for_each_cache():
    assert kv_lines(PAGED) == [
        "paged: 96/8192 blocks used (1.2 %), peak 120, 16 tokens a block, pool 64.0 MiB",
        "prefix cache hit 32 of 128 prompt tokens (25.0 %); preemptions 2"]
    assert kv_lines({"kind": "dynamic"}) == [
        "dynamic (no pool: transformers' cache grows with each batch)"]
    assert kv_lines({"kind": "slots", "bytes_total": 2048, "padded_rows": 3}) == [
        "static slots (one fixed-length row per batch slot), 2.0 KiB; padded prefill rows 3"]
    assert kv_lines({"kind": "future-cache"}) == ["future-cache"]


def replica_entry(index: int, kv: dict, routed: int, tokens: int) -> dict:
    metrics = ServingMetrics()
    for value in (0.02, 0.03):
        metrics.time_to_first_token.observe(value)
    for value in (0.004, 0.006, 0.008):
        metrics.inter_token_latency.observe(value)
    metrics.requests["ok"] = routed
    metrics.tokens_generated = tokens
    stats = ReplicaStats(replica=index, requests=routed, finished=routed, steps=tokens,
                         prefills=1, tokens_generated=tokens, queue_depth=1, running=2, kv=kv,
                         metrics=metrics.snapshot(1, 2))
    return {"index": index, "address": f"127.0.0.1:{4000 + index}", "healthy": True,
            "routed": routed, "role": "replica", "pid": 100 + index,
            "stats": stats.to_dict()}


def test_status_text_summarises_every_replica():
    info = {"deployment": "demo", "model": "/models/tiny", "engine": "transformers",
            "scheduler": "round_robin", "pid": 99, "state": "ready", "uptime_s": 75.0,
            "serving": True, "log": "/tmp/demo.log", "address": "127.0.0.1:50050",
            "replicas": [replica_entry(0, PAGED, 3, 24), replica_entry(1, {"kind": "dynamic"},
                                                                       2, 16),
                         {"index": 2, "address": "127.0.0.1:4002", "healthy": False,
                          "routed": 1, "error": "failed to connect to all addresses"}]}
    lines = status_text(info).splitlines()
    assert lines[:5] == [
        "deployment  demo  ready, serving, up 1 min 15 s",
        "model       /models/tiny",
        "engine      transformers  scheduler round_robin  replicas 2/3 healthy",
        "address     127.0.0.1:50050  (load balancer pid 99)",
        "log         /tmp/demo.log",
    ]
    text = "\n".join(lines)
    assert "replica 0  healthy  127.0.0.1:4000  pid 100" in lines
    assert "  requests    routed 3  admitted 3  finished 3  cancelled 0  errors 0" in lines
    assert "  now         queue 1  running 2" in lines
    assert "  tokens      generated 24  (steps 24, prefill steps 1)" in lines
    assert "  TTFT        p50 25.0 ms  p99 49.5 ms  mean 25.0 ms  (2 samples)" in lines
    assert "  inter-token p50 6.2 ms  p99 9.9 ms  mean 6.0 ms  (3 samples)" in lines
    assert f"  KV cache    {kv_lines(PAGED)[0]}" in lines
    assert f"              {kv_lines(PAGED)[1]}" in lines
    assert "  KV cache    dynamic (no pool: transformers' cache grows with each batch)" in lines
    assert "replica 2  UNHEALTHY  127.0.0.1:4002" in lines
    assert "  routed 1; no statistics: failed to connect to all addresses" in lines
    assert "interpolated within histogram buckets" in text


def test_status_text_of_a_remote_deployment_without_a_record():
    text = status_text({"deployment": "far", "serving": False, "replicas": []})
    assert text.splitlines()[0] == "deployment  far  NOT SERVING"
    assert "log " not in text
