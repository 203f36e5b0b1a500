"""Print the short summary of $OUT/gpu_bench.jsonl (tok/s table, checks, errors).

    python3 bench/gpu/summarize.py [--write]   # --write also saves $OUT/summary.txt
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value < 1e5 else f"{value:,.0f}"
    return str(value)


def table(rows: List[Dict]) -> List[str]:
    perf = [r for r in rows if "tok_s" in r and "bs" in r and "error" not in r]
    errors = {(r.get("engine"), r.get("mode"), r.get("bs")) for r in rows
              if "error" in r and "bs" in r}
    keys, batches = [], sorted({r["bs"] for r in perf} | {e[2] for e in errors if e[2]})
    for r in perf:
        key = (r.get("engine"), r.get("mode"))
        if key not in keys:
            keys.append(key)
    ready = {r.get("engine"): r.get("serve_s") for r in rows if r.get("kind") == "deployment"}
    memory = {}
    for r in rows:
        if r.get("kind") == "memory" and isinstance(r.get("gpu_mem_peak_delta_mib"), dict):
            memory[r.get("engine")] = "+".join(str(v) for v in r["gpu_mem_peak_delta_mib"].values())
        elif r.get("kind") == "placement" and isinstance(r.get("gpu_mem_peak_delta_mib"), dict):
            memory[r.get("engine")] = "+".join(str(v) for v in r["gpu_mem_peak_delta_mib"].values())
    head = f"| {'engine':<28} | {'mode':<11} | " + " | ".join(f"bs{b:>4} tok/s" for b in batches)
    lines = [head + " | ready s | GPU MiB (peak-base) |", "|" + "---|" * (len(batches) + 4)]
    for engine, mode in keys:
        cells = []
        for b in batches:
            hit = [r for r in perf if r.get("engine") == engine and r.get("mode") == mode
                   and r["bs"] == b]
            cells.append(_fmt(hit[-1]["tok_s"]) if hit else
                         ("ERR" if (engine, mode, b) in errors else "-"))
        lines.append(f"| {engine:<28} | {mode:<11} | " + " | ".join(f"{c:>11}" for c in cells)
                     + f" | {_fmt(ready.get(engine)):>7} | {memory.get(engine, '-')} |")
    return lines


def checks(rows: List[Dict]) -> List[str]:
    lines = []
    greedy = {r["source"]: r["texts"] for r in rows if r.get("kind") == "greedy" and "texts" in r}
    pairs = [("ours_transformers_tp1", "ours_deepspeed_tp1"),
             ("ours_deepspeed_tp1", "hf_generate"), ("ours_transformers_tp1", "hf_generate"),
             ("ours_deepspeed_tp2", "ours_deepspeed_tp1"),
             ("ours_deepspeed_fp32_tp2", "ours_deepspeed_fp32_tp1")]
    for mine, ref in pairs:
        if mine in greedy and ref in greedy:
            result = common.compare_texts(greedy[mine], greedy[ref])
            lines.append(f"greedy {common.GREEDY_PROMPTS}x{common.GREEDY_TOKENS} {mine} == {ref}: "
                         f"{result['equal']} (first differing token per prompt: "
                         f"{result['first_diff_word_per_prompt']})")
        else:
            lines.append(f"greedy {mine} == {ref}: not measured")
    for r in rows:
        kind = r.get("kind")
        if kind == "round_robin":
            lines.append(f"round robin, 4 sequential requests -> replicas "
                         f"{r['replicas_of_4_sequential']} ok={r['ok']}")
        elif kind == "placement":
            lines.append(f"replica placement: record {r.get('gpu_indices')} own_gpu_by_record="
                         f"{r.get('own_gpu_by_record')}; nvidia-smi replica GPUs "
                         f"{r.get('replica_gpu_via_nvidia_smi')} own_gpu_by_nvidia_smi="
                         f"{r.get('own_gpu_by_nvidia_smi')}; both GPUs loaded="
                         f"{r.get('both_gpus_loaded')} (peak-base MiB "
                         f"{r.get('gpu_mem_peak_delta_mib')})")
        elif kind == "replica_scaling":
            lines.append(f"2 replicas vs 1 at {r['bs']} concurrent: {r['two_replicas_tok_s']} vs "
                         f"{r['one_replica_tok_s']} tok/s = x{r['ratio']}")
        elif kind == "env_check":
            lines.append(f"tp2 ranks' multicast-off env: {r.get('ranks')}")
        elif kind == "cleanup":
            lines.append(f"CLEANUP had to kill: {r}")
    tp1 = {r["bs"]: r["tok_s"] for r in rows if r.get("engine") == "ours_deepspeed_tp1"
           and r.get("mode") == "concurrent" and "tok_s" in r}
    tp2 = {r["bs"]: r["tok_s"] for r in rows if r.get("engine") == "ours_deepspeed_tp2"
           and r.get("mode") == "concurrent" and "tok_s" in r}
    for bs in sorted(set(tp1) & set(tp2)):
        lines.append(f"tp2 vs tp1 at bs {bs} (concurrent): {tp2[bs]} vs {tp1[bs]} tok/s = "
                     f"x{tp2[bs] / tp1[bs]:.2f}")

    def best(engine: str, mode: str) -> Dict[int, float]:
        return {r["bs"]: r["tok_s"] for r in rows if r.get("engine") == engine
                and r.get("mode") == mode and "tok_s" in r}

    anchors = {"hf_dynamic": best("hf_dynamic", "generate"),
               "hf_static": best("hf_static", "generate")}
    for engine in ("ours_deepspeed_tp1", "ours_transformers_tp1"):
        for mode in ("concurrent", "one_request"):
            mine = best(engine, mode)
            for anchor, ref in anchors.items():
                shared = sorted(set(mine) & set(ref))
                if shared:
                    lines.append(f"{engine} {mode} / {anchor}: " + ", ".join(
                        f"bs{b} x{mine[b] / ref[b]:.2f}" for b in shared))
    return lines


def problems(rows: List[Dict]) -> List[str]:
    lines = [f"ERROR {r.get('phase')} {r.get('engine', '')} bs={r.get('bs', '')}: "
             f"{str(r['error'])[:300]}" for r in rows if "error" in r]
    lines += [f"SHORT {r.get('engine')} {r.get('mode')} bs={r.get('bs')}: not every response "
              f"had {common.G} tokens" for r in rows if r.get("all_full") is False]
    return lines


def main() -> int:
    rows = common.read_jsonl()
    phases = [r for r in rows if r.get("kind") == "phase_end"]
    out = ["", "=" * 30 + " SUMMARY (tok/s = generated tokens / wall s) " + "=" * 30]
    out += [f"phase {r['name']}: rc={r['rc']} {r['seconds']} s (limit {r['limit_s']} s)"
            for r in phases]
    out += table(rows) + [""] + checks(rows) + problems(rows)
    text = "\n".join(out)
    print(text)
    if "--write" in sys.argv:
        with open(os.path.join(common.OUT, "summary.txt"), "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
