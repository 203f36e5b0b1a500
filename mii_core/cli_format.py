"""Human-readable text for the ``mii`` CLI: aligned tables (``mii list``) and the
summary of a deployment's status record (``mii status NAME``).

Everything here is a pure function of plain data (the Info record as JSON, registry
records, table cells), so ``cli.py`` stays a dispatcher and the text is testable without
a deployment. ``mii status NAME --json`` prints the record itself, not this.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mii_core.deploy.registry import DeploymentRecord
from mii_core.routing.stats import ReplicaStats

NOT_REPORTED = "-"  # a cell or figure the record does not have


# -- tables --------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 2) -> str:
    """Left-aligned columns under ``header``, ``gap`` spaces apart; no trailing spaces
    (the last column is not padded, so a long last cell such as a path never widens
    the others)."""
    widths = [len(h) for h in header]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, the header {len(header)}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = []
    for row in [list(header), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append((" " * gap).join(cells).rstrip())
    return "\n".join(lines)


def deployments_table(records: Sequence[Tuple[DeploymentRecord, bool]], now: float) -> str:
    """``mii list``: one row per registry record, given whether its supervisor is alive
    (a dead one is a stale record: its state and uptime mean nothing any more)."""
    rows = []
    for record, alive in records:
        model = record.config.get("model_config", {}).get("model_name_or_path", "")
        uptime = seconds(now - (record.ready_at or record.created_at)) if alive else \
            NOT_REPORTED
        rows.append([record.name, f"{record.host}:{record.port}",
                     record.state if alive else "dead (stale record)", record.engine or
                     NOT_REPORTED, str(len(record.replicas)), uptime, model or NOT_REPORTED])
    return table(["NAME", "ADDRESS", "STATE", "ENGINE", "REPLICAS", "UPTIME", "MODEL"], rows)


# -- numbers -------------------------------------------------------------------------------
def seconds(value: Optional[float]) -> str:
    """A duration for people: ``850 us``, ``37.5 ms``, ``2.40 s``, ``3 min 20 s``, ``1 min``."""
    if value is None:
        return NOT_REPORTED
    if math.isinf(value):
        return "inf"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1.0:
        return f"{value * 1e3:.1f} ms"
    if value < 60.0:
        return f"{value:.2f} s"
    if value < 7200.0:
        minutes, rest = int(value // 60), int(value % 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{value / 3600:.1f} h"


def byte_size(value: int) -> str:
    """``67117056`` -> ``64.0 MiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def percent(part: float, whole: float) -> str:
    """``part`` of ``whole`` as ``12.5 %`` (``-`` when ``whole`` is 0)."""
    return f"{100.0 * part / whole:.1f} %" if whole else NOT_REPORTED


# -- histograms ----------------------------------------------------------------------------
def histogram_quantile(histogram: Mapping[str, Any], q: float) -> Optional[float]:
    """The ``q`` quantile (0 <= q <= 1) of a replica histogram as Info reports it
    (``Histogram.to_dict``: upper bucket bounds, per-bucket counts with a last +Inf
    bucket, sum, count); None when it holds no sample.

    The replica keeps counts per bucket, not samples, so the value is an estimate: the
    rank ``q * count`` is located in its bucket and interpolated linearly between the
    bucket's lower and upper bound (the lower bound of the first bucket is 0), as
    Prometheus' ``histogram_quantile`` does. It is exact only at bucket bounds; within a
    bucket it assumes the samples are spread evenly. A rank in the +Inf bucket has no
    upper bound to interpolate to: the result is ``inf`` (more than the last bound).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    bounds = [float(b) for b in histogram.get("buckets", [])]
    counts = [int(c) for c in histogram.get("counts", [])]
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"histogram has {len(counts)} counts for {len(bounds)} bounds "
                         "(expected one more count, the +Inf bucket)")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0  # samples in the buckets before this one
    for index, count in enumerate(counts):
        # Empty buckets are skipped, so a rank on a bucket bound (q = 0 included) lands
        # in a bucket that holds samples, not in an empty one next to it.
        if count and below + count >= rank:
            if index == len(bounds):
                return math.inf
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * max(0.0, rank - below) / count
        below += count
    raise AssertionError("unreachable: the rank is at most the total")


def _quantile_text(histogram: Mapping[str, Any], q: float) -> str:
    value = histogram_quantile(histogram, q)
    if value is not None and math.isinf(value):
        return f"> {seconds(float(histogram['buckets'][-1]))}"
    return seconds(value)


def latency_line(histogram: Mapping[str, Any]) -> str:
    """``p50 37.5 ms  p99 49.8 ms  mean 34.7 ms  (12 samples)`` for one histogram."""
    count = int(histogram.get("count", 0) or 0)
    if not count:
        return "no samples yet"
    mean = float(histogram.get("sum", 0.0)) / count
    return (f"p50 {_quantile_text(histogram, 0.5)}  p99 {_quantile_text(histogram, 0.99)}  "
            f"mean {seconds(mean)}  ({count} sample{'s' if count != 1 else ''})")


# -- the KV cache ----------------------------------------------------------------------------
def kv_lines(kv: Mapping[str, Any]) -> List[str]:
    """What the replica's KV cache holds, from its ``KVStats`` figures (one line, or two
    for the paged cache: the pool, then the prefix cache and preemptions)."""
    kind = kv.get("kind") or NOT_REPORTED
    if kind == "paged":
        total, used = int(kv.get("blocks_total", 0)), int(kv.get("blocks_used", 0))
        pool = (f"paged: {used}/{total} blocks used ({percent(used, total)}), peak "
                f"{kv.get('blocks_peak', 0)}, {kv.get('block_size', 0)} tokens a block")
        if kv.get("bytes_total"):
            pool += f", pool {byte_size(int(kv['bytes_total']))}"
        queried = int(kv.get("prefix_query_tokens", 0))
        hits = int(kv.get("prefix_hit_tokens", 0))
        return [pool, f"prefix cache hit {hits} of {queried} prompt tokens "
                      f"({percent(hits, queried)}); preemptions {kv.get('preemptions', 0)}"]
    if kind == "dynamic":
        return ["dynamic (no pool: transformers' cache grows with each batch)"]
    if kind == "slots":
        text = "static slots (one fixed-length row per batch slot)"
        if kv.get("bytes_total"):
            text += f", {byte_size(int(kv['bytes_total']))}"
        return [text + f"; padded prefill rows {kv.get('padded_rows', 0)}"]
    return [str(kind)]  # a cache this version does not know: its name is what we can say


# -- mii status ----------------------------------------------------------------------------
def _replica_block(entry: Mapping[str, Any]) -> List[str]:
    index = entry.get("index", entry.get("replica", "?"))
    health = "healthy" if entry.get("healthy") else "UNHEALTHY"
    head = f"replica {index}  {health}  {entry.get('address', NOT_REPORTED)}"
    if entry.get("pid"):
        head += f"  pid {entry['pid']}"
    lines = [head]
    stats = ReplicaStats.from_dict(entry.get("stats"))
    if stats is None:
        # The load balancer could not reach the replica's Info (down, restarting).
        reason = entry.get("error") or "the replica did not report statistics"
        return lines + [f"  routed {entry.get('routed', 0)}; no statistics: {reason}"]
    metrics = stats.metrics
    lines += [
        f"  requests    routed {entry.get('routed', 0)}  admitted {stats.requests}  "
        f"finished {stats.finished}  cancelled {stats.cancelled}  errors {stats.errors}",
        f"  now         queue {stats.queue_depth}  running {stats.running}",
        f"  tokens      generated {stats.tokens_generated}  "
        f"(steps {stats.steps}, prefill steps {stats.prefills})",
        f"  TTFT        {latency_line(metrics.time_to_first_token_seconds)}",
        f"  inter-token {latency_line(metrics.inter_token_latency_seconds)}",
    ]
    kv = kv_lines(stats.kv)
    lines.append(f"  KV cache    {kv[0]}")
    lines += [f"              {more}" for more in kv[1:]]
    return lines


def status_text(info: Mapping[str, Any]) -> str:
    """The summary ``mii status NAME`` prints, from the load balancer's Info record
    (plus ``state``, ``uptime_s``, ``log``, ``serving`` and ``address`` where the CLI
    added them). Latency percentiles are estimated from the replicas' histograms (see
    ``histogram_quantile``)."""
    name = info.get("deployment", NOT_REPORTED)
    state = info.get("state")
    serving = "serving" if info.get("serving") else "NOT SERVING"
    head = f"deployment  {name}  {state + ', ' if state else ''}{serving}"
    if info.get("uptime_s") is not None:
        head += f", up {seconds(float(info['uptime_s']))}"
    replicas: List[Dict[str, Any]] = list(info.get("replicas", []))
    healthy = sum(1 for r in replicas if r.get("healthy"))
    lines = [
        head,
        f"model       {info.get('model', NOT_REPORTED)}",
        f"engine      {info.get('engine', NOT_REPORTED)}  scheduler "
        f"{info.get('scheduler', NOT_REPORTED)}  replicas {healthy}/{len(replicas)} healthy",
        f"address     {info.get('address', NOT_REPORTED)}  (load balancer pid "
        f"{info.get('pid', NOT_REPORTED)})",
    ]
    if info.get("log"):
        lines.append(f"log         {info['log']}")
    for entry in replicas:
        lines += [""] + _replica_block(entry)
    lines += ["", "Latencies are measured by each replica from a prompt's arrival; p50/p99 "
              "are interpolated within histogram buckets."]
    return "\n".join(lines)
