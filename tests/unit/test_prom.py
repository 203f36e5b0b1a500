"""The gateway's Prometheus page from an Info reply (``mii_core/gateway/prom.py``): the
KV cache's figures per replica and summed, a replica that did not answer left out."""
from __future__ import annotations

from dataclasses import asdict

from prometheus_client.parser import text_string_to_metric_families

from mii_core.gateway.prom import render_deployment
from mii_core.routing.stats import ServingMetrics

METRICS = asdict(ServingMetrics().snapshot(queue_depth=0, running=0))


def _replica(index, **kv):
    return {"index": index, "healthy": True, "routed": 3,
            "stats": {"replica": index, "kv": dict(kind="paged", **kv), "metrics": METRICS}}


def _samples(text: bytes):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def test_prefix_cache_and_blocks_per_replica_and_summed():
    info = {"deployment": "d", "replicas": [
        _replica(0, blocks_total=100, blocks_used=7, prefix_query_tokens=4096,
                 prefix_hit_tokens=3072, preemptions=2),
        _replica(1, blocks_total=100, blocks_used=5, prefix_query_tokens=1000,
                 prefix_hit_tokens=0, preemptions=0),
        {"index": 2, "healthy": False, "routed": 0},  # did not answer: left out
    ]}
    got = _samples(render_deployment(info, "d"))
    one = (("replica", "0"),)
    assert got[("mii_replica_prefix_cache_hit_tokens_total", one)] == 3072
    assert got[("mii_replica_prefix_cache_query_tokens_total", one)] == 4096
    assert got[("mii_replica_kv_blocks_used", (("replica", "1"),))] == 5
    assert got[("mii_replica_kv_preemptions_total", one)] == 2
    assert ("mii_replica_kv_blocks_total", (("replica", "2"),)) not in got
    assert got[("mii_prefix_cache_hit_tokens_total", ())] == 3072
    assert got[("mii_prefix_cache_query_tokens_total", ())] == 5096
    assert got[("mii_kv_blocks_total", ())] == 200
    assert got[("mii_kv_blocks_used", ())] == 12


def test_a_dynamic_cache_reports_zeros():
    info = {"deployment": "d", "replicas": [
        {"index": 0, "healthy": True, "routed": 1,
         "stats": {"replica": 0, "kv": {"kind": "dynamic"}, "metrics": METRICS}}]}
    got = _samples(render_deployment(info, "d"))
    assert got[("mii_replica_kv_blocks_total", (("replica", "0"),))] == 0
    assert got[("mii_prefix_cache_hit_tokens_total", ())] == 0
