"""The fast-engine table of docs/benchmarks.md, from one run's JSON lines.

    python3 bench/gpu/fast_table.py RUN.jsonl [--probe PROBE.jsonl] [--docs docs/benchmarks.md]

RUN.jsonl holds the ``D_static`` rows (ours through mii.serve) and the ``A_hf`` rows
(transformers ``generate``) of one device call; PROBE.jsonl the ``P_probe`` rows and
the ``D_static`` rows of one call (in-process vs served, same machine). Without
``--docs`` the table is printed; with it, the text between the two FAST-TABLE markers
is replaced (run.sh writes $OUT/fast_table.md the same way on the device).
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Dict, List, Optional

BATCHES = (1, 16, 64)
BEGIN, END = "<!-- FAST-TABLE:BEGIN -->", "<!-- FAST-TABLE:END -->"
ROWS = [("ours_compiled", "mii, `kv_cache=\"static\"`, `torch_compile=True`"),
        ("ours_static", "mii, `kv_cache=\"static\"`"),
        ("ours_dynamic", "mii, default (dynamic cache)"),
        ("hf_static", "transformers `generate`, static cache (auto-compiled)"),
        ("hf_dynamic", "transformers `generate`, dynamic cache")]


def read(path: str) -> List[Dict]:
    """Every JSON line of ``path``."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip().startswith("{")]


def _tok_s(rows: List[Dict]) -> Dict[str, Dict[int, float]]:
    table: Dict[str, Dict[int, float]] = {}
    for row in rows:
        if "tok_s" in row and row.get("bs") in BATCHES and "engine" in row:
            table.setdefault(row["engine"], {})[row["bs"]] = row["tok_s"]
    return table


def _n(value: Optional[float]) -> str:
    return "" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def render(run: List[Dict], probe: Optional[List[Dict]] = None) -> str:
    """Markdown: throughput, ratios, latency/memory, served vs in-process, greedy checks."""
    tok = _tok_s(run)
    lines = ["| engine | bs 1 tok/s | bs 16 tok/s | bs 64 tok/s | ready after |",
             "|---|---|---|---|---|"]
    ready = {r["engine"]: r.get("ready_s") for r in run if r.get("kind") == "latency_memory"}
    for key, label in ROWS:
        if key in tok:
            cells = " | ".join(_n(tok[key].get(b)) for b in BATCHES)
            lines.append(f"| {label} | {cells} | {_n(ready.get(key)) and f'{ready[key]} s'} |")
    best = "ours_compiled" if "ours_compiled" in tok else "ours_static"
    for peer in ("hf_static", "hf_dynamic"):
        if best in tok and peer in tok:
            ratios = ", ".join(f"bs {b} ×{tok[best][b] / tok[peer][b]:.2f}" for b in BATCHES
                               if b in tok[best] and b in tok[peer])
            lines.append(f"\n{best} / {peer} (same run): {ratios}")
    lines += ["", "| engine | TTFT p50 / p99 bs 1 | ITL p50 / p99 bs 1 | TTFT p50 / p99 bs 64 "
              "| ITL p50 / p99 bs 64 | peak GPU memory |", "|---|---|---|---|---|---|"]
    for row in run:
        if row.get("kind") == "latency_memory":
            peak = row.get("gpu_mem_peak_delta_mib", {})
            memory = " + ".join(f"{v:,} MiB" for v in peak.values()) if isinstance(peak, dict) \
                else "n/a"
            cells = [f"{row.get(f'{m}_ms_p50_bs{b}')} / {row.get(f'{m}_ms_p99_bs{b}')} ms"
                     for b in (1, 64) for m in ("ttft", "itl")]
            lines.append(f"| {row['engine']} | {' | '.join(cells)} | {memory} |")
    if probe:
        served, inproc = _tok_s(probe), {}
        for row in probe:
            if row.get("phase") == "P_probe" and "error" not in row:
                inproc[row["variant"]] = {b: row.get(f"inprocess_tok_s_bs{b}") for b in BATCHES}
        if "compiled" in inproc and "ours_compiled" in served:
            cells = ", ".join(f"bs {b}: {served['ours_compiled'][b]:,.0f} / "
                              f"{inproc['compiled'][b]:,.0f} = {served['ours_compiled'][b] / inproc['compiled'][b]:.3f}"
                              for b in BATCHES if inproc["compiled"].get(b))
            lines.append(f"\nServed / in-process engine (same machine, one call): {cells}")
    checks = [f"{r['what']}: {'identical' if r['equal'] else 'first differing word ' + str(r['first_diff_word_per_prompt'])}"
              for r in run if r.get("kind") == "greedy_compare"]
    if checks:
        lines.append("\nGreedy text (4 prompts × 32 tokens): " + "; ".join(checks))
    return "\n".join(lines)


def write_docs(path: str, table: str) -> None:
    """Replace the text between the FAST-TABLE markers of ``path``."""
    with open(path) as handle:
        text = handle.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    with open(path, "w") as handle:
        handle.write(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--probe")
    parser.add_argument("--docs")
    args = parser.parse_args()
    table = render(read(args.run), read(args.probe) if args.probe else None)
    if args.docs:
        write_docs(args.docs, table)
    else:
        print(table)


if __name__ == "__main__":
    main()
