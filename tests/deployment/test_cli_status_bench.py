"""``mii status`` (summary and ``--json``), ``mii list`` and ``mii bench`` as the installed
script, against a real two-replica deployment of the tiny model (paged KV cache)."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List

import pytest

from conftest import GREEDY, deployed, run_mii

NAME = "cli-status-bench"


@pytest.fixture(scope="module")
def two_replicas(tiny_model):
    with deployed(tiny_model, NAME, engine="transformers", replica_num=2,
                  kv_cache="paged") as client:
        yield client


def mii_ok(*args: str) -> str:
    result = run_mii(*args)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    return result.stdout


def status_record() -> Dict[str, Any]:
    return json.loads(mii_ok("status", NAME, "--json"))


def replica_block(summary: str, index: int) -> str:
    """The lines of replica ``index`` in the summary (up to the next blank line)."""
    match = re.search(rf"^replica {index} .*?(?=\n\n|\Z)", summary, re.MULTILINE | re.DOTALL)
    assert match, summary
    return match.group(0)


def columns(table: str) -> List[Dict[str, str]]:
    """Rows of an aligned table as dicts, cut at the header's column starts (so a cell
    that is not under its header shows up as a wrong value)."""
    header, *rows = table.splitlines()
    names = header.split()
    starts = [header.index(name) for name in names]
    ends = starts[1:] + [None]
    return [{name: row[start:end].strip() for name, start, end in zip(names, starts, ends)}
            for row in rows]


def test_status_summary_and_list_agree_with_the_record(two_replicas):
    before = status_record()
    for prompt in ("DeepSpeed is", "Seattle is", "The sea", "A computer"):
        two_replicas(prompt, max_new_tokens=5, **GREEDY)
    record = status_record()
    summary = mii_ok("status", NAME)
    assert record["serving"] and record["state"] == "ready"
    assert summary.splitlines()[0].startswith(f"deployment  {NAME}  ready, serving, up ")
    assert "replicas 2/2 healthy" in summary
    assert f"address     127.0.0.1:{two_replicas.port}" in summary
    routed = 0
    for old, entry in zip(before["replicas"], record["replicas"]):
        stats = entry["stats"]
        block = replica_block(summary, entry["index"])
        assert block.splitlines()[0] == (f"replica {entry['index']}  healthy  "
                                         f"{entry['address']}  pid {entry['pid']}")
        assert (f"routed {entry['routed']}  admitted {stats['requests']}  "
                f"finished {stats['finished']}  cancelled 0  errors 0") in block
        assert f"generated {stats['tokens_generated']}  " in block
        assert "queue 0  running 0" in block
        assert re.search(r"TTFT        p50 \S+ \S+  p99 \S+ \S+  mean \S+ \S+  \(\d+ sample",
                         block), block
        assert "KV cache    paged: " in block and "prefix cache hit " in block
        # Round robin: two of the four requests each, five tokens each.
        assert entry["routed"] - old["routed"] == 2
        assert stats["tokens_generated"] - old["stats"]["tokens_generated"] == 10
        routed += entry["routed"]
    assert routed >= 4

    listing = mii_ok("list")
    assert listing.splitlines()[0].split() == ["NAME", "ADDRESS", "STATE", "ENGINE",
                                               "REPLICAS", "UPTIME", "MODEL"]
    ours = [row for row in columns(listing) if row["NAME"] == NAME]
    assert len(ours) == 1
    assert {k: v for k, v in ours[0].items() if k != "UPTIME"} == {
        "NAME": NAME, "ADDRESS": f"127.0.0.1:{two_replicas.port}", "STATE": "ready",
        "ENGINE": "transformers", "REPLICAS": "2", "MODEL": record["model"]}
    assert re.fullmatch(r"[\d.]+ (s|ms|min( \d+ s)?|h)", ours[0]["UPTIME"]), ours[0]


def ordered(stats: Dict[str, float]) -> bool:
    return stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_bench_streams_the_requests_it_was_asked_for(two_replicas, tmp_path):
    before = status_record()
    out = tmp_path / "bench.json"
    result = run_mii("bench", NAME, "--requests", "8", "--concurrency", "4", "--prompt-tokens",
                     "8-16", "--new-tokens", "4", "--stream", "--json-out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == {"started": 8, "finished": 8, "ok": 8, "failed": 0}
    assert report["errors"] == {} and report["interrupted"] is False
    assert report["tokens"]["generated_total"] == 32
    assert report["tokens"]["prompt_mean"] > 0
    assert report["parameters"] == {"concurrency": 4, "requests": 8, "duration_s": None,
                                    "prompt_tokens": "8-16", "new_tokens": "4", "seed": 0,
                                    "sample": False, "stream": True, "timeout_s": None}
    latency = report["latency_s"]
    for key in ("request", "ttft", "replica_ttft"):
        assert latency[key]["count"] == 8 and ordered(latency[key]), key
    assert ordered(latency["inter_token"]) and latency["inter_token"]["count"] <= 8 * 3
    assert sum(report["replicas"].values()) == 8 and set(report["replicas"]) == {"0", "1"}
    assert report["throughput"]["generated_tokens_per_s"] > 0
    assert result.stdout.startswith(f"mii bench {NAME}: 8 requests (8 ok, 0 failed) in ")
    assert "errors            none" in result.stdout

    # The bench is a client like any other: the replicas counted its requests, the two
    # calibration probes (one token each) included.
    probes = report["calibration"]["probes"]
    after = status_record()
    routed = sum(a["routed"] - b["routed"] for a, b in zip(after["replicas"], before["replicas"]))
    tokens = sum(a["stats"]["tokens_generated"] - b["stats"]["tokens_generated"]
                 for a, b in zip(after["replicas"], before["replicas"]))
    assert probes == 2 and report["calibration"]["note"] == ""
    assert (routed, tokens) == (8 + probes, 32 + probes)


def test_bench_without_streaming_reports_request_latency(two_replicas, tmp_path):
    out = tmp_path / "unary.json"
    result = run_mii("bench", NAME, "--requests", "4", "--concurrency", "2", "--prompt-tokens",
                     "12", "--new-tokens", "3", "--json-out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["requests"]["ok"], report["tokens"]["generated_total"]) == (4, 12)
    assert report["latency_s"]["ttft"] is None and report["latency_s"]["inter_token"] is None
    assert ordered(report["latency_s"]["request"])
    assert "need --stream" in result.stdout


def test_bench_refuses_a_missing_deployment_and_a_bad_range():
    missing = run_mii("bench", "nobody", "--requests", "1")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "mii: DeploymentNotFoundError: no running deployment named 'nobody'" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = run_mii("bench", "nobody", "--prompt-tokens", "64-")
    assert bad.returncode == 2
    assert "argument --prompt-tokens: expected a token count N or a range LOW-HIGH" in bad.stderr
