"""Our serving path on the GPU: ``mii.serve(...)`` + the client, end to end.

    python3 bench/gpu/serving_bench.py ours --engine deepspeed   # B: tp=1, batch 1/16/64
    python3 bench/gpu/serving_bench.py ours --engine transformers
    python3 bench/gpu/serving_bench.py tp2                       # C: tensor_parallel=2
    python3 bench/gpu/serving_bench.py replicas                  # C: replica_num=2 x tp=1
    python3 bench/gpu/serving_bench.py greedy_fp32               # optional: tp2 == tp1 in fp32?

Batch N means N prompts of 128 tokens, 128 new tokens each (ignore_eos, greedy), sent
either as N concurrent single-prompt requests (``concurrent``: asyncio ``agenerate``
calls gathered) or as one request with N prompts (``one_request``). tok/s = generated
tokens / client wall time. Each deployment is terminated in a ``finally``; if that
fails, the processes named in its registry record are killed (cleanup.py).
Results: JSON lines in $OUT/gpu_bench.jsonl (see common.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cleanup  # noqa: E402
import common  # noqa: E402
from common import BATCHES, MODEL_DIR, TINY, G, log  # noqa: E402

CALL_TIMEOUT = 240.0
STARTED: List[str] = []  # deployment names this process started


def gen_kwargs(new_tokens: int) -> Dict:
    return dict(max_new_tokens=new_tokens, ignore_eos=True, do_sample=False,
                max_length=512 if TINY else 2048)


def serve_kwargs(args, **extra) -> Dict:
    kw = dict(engine=args.engine, port_number=_free_port(), startup_timeout=300.0,
              max_batch_size=max(max(BATCHES), 64), max_restarts=0)
    if not TINY:
        kw["dtype"] = "bfloat16"
    kw.update(extra)
    # e.g. BENCH_SERVE_EXTRA='{"inference_engine_config": {...}}' (applies to every deployment)
    kw.update(json.loads(os.environ.get("BENCH_SERVE_EXTRA") or "{}"))
    return kw


def _free_port() -> int:
    from mii_core.deploy.ports import free_port

    return free_port()


@asynccontextmanager
async def deployment(phase: str, name: str, **kwargs):
    """serve() -> (client, ready seconds); always terminated; failures keep the log tail."""
    import mii
    from mii_core.deploy import logs, registry

    client = None
    STARTED.append(name)
    started = time.perf_counter()
    try:
        client = mii.serve(MODEL_DIR, deployment_name=name, **kwargs)
    except Exception as error:  # serve() stopped what it started; its message has the log tail
        common.append_deploy_log(f"{name}: serve() failed", str(error)[-6000:])
        raise
    try:
        record = registry.load(name)
        if not TINY and record is not None and any(not r.gpu_indices for r in record.replicas):
            raise RuntimeError(f"{name} was placed on the CPU ({[r.gpu_indices for r in record.replicas]}): "
                               "mii saw no GPU; stopping this phase")
        yield client, time.perf_counter() - started
    except BaseException as error:
        common.append_deploy_log(f"{name}: {type(error).__name__} during the phase",
                                 logs.tail(registry.log_path(name), 80))
        raise
    finally:
        stopped = False
        if client is not None:
            t = time.perf_counter()
            try:
                client.terminate_server(wait=40)
                stopped = True
                log(phase=phase, kind="terminate", deployment=name,
                    terminate_s=round(time.perf_counter() - t, 2))
            except Exception as error:  # noqa: BLE001
                log(phase=phase, kind="terminate", deployment=name, error=repr(error)[:300])
        if not stopped:
            killed = cleanup.stop_named(name, f"{phase} did not terminate it")
            if killed is not None:
                log(phase=phase, kind="cleanup", deployment=name, killed=killed)


def stats(responses, wall: float) -> Dict:
    tokens = sum(r.generated_length for r in responses)
    ttft = [r.time_to_first_token_s for r in responses if r.time_to_first_token_s]
    total = [r.total_time_s for r in responses if r.total_time_s]
    return dict(tokens=tokens, wall_s=round(wall, 3), tok_s=round(tokens / wall, 1),
                all_full=all(r.generated_length == G for r in responses),
                prompt_len=responses[0].prompt_length if responses else None,
                ttft_p50_s=round(statistics.median(ttft), 4) if ttft else None,
                server_total_max_s=round(max(total), 3) if total else None,
                replicas_used=sorted({r.replica for r in responses if r.replica is not None}))


async def run_concurrent(client, texts: List[str], new_tokens: int = G):
    started = time.perf_counter()
    results = await asyncio.gather(*(client.agenerate(t, timeout=CALL_TIMEOUT,
                                                      **gen_kwargs(new_tokens))
                                     for t in texts))
    return [r[0] for r in results], time.perf_counter() - started


async def run_one_request(client, texts: List[str], new_tokens: int = G):
    started = time.perf_counter()
    results = await client.agenerate(texts, timeout=CALL_TIMEOUT, **gen_kwargs(new_tokens))
    return results, time.perf_counter() - started


async def warm_up(client) -> float:
    started = time.perf_counter()
    await run_one_request(client, common.prompts(1, seed=7), 8)
    await run_one_request(client, common.prompts(max(BATCHES), seed=8), 8)
    await run_concurrent(client, common.prompts(4, seed=9), 8)
    return time.perf_counter() - started


async def greedy(client, phase: str, source: str) -> List[str]:
    responses, _ = await run_one_request(client, common.greedy_prompts(), common.GREEDY_TOKENS)
    texts = [r.generated_text for r in responses]
    log(phase=phase, kind="greedy", source=source, texts=texts,
        lengths=[r.generated_length for r in responses])
    return texts


async def measure(client, phase: str, tag: str, batches, modes=("concurrent", "one_request"),
                  **labels) -> Dict:
    """tok/s per (mode, batch); one timed run each, errors logged per run."""
    found = {}
    for bs in batches:
        for mode in modes:
            if mode == "one_request" and bs == 1:
                continue  # the same thing as concurrent at batch 1
            texts = common.prompts(bs, seed=100 + bs)
            try:
                runner = run_concurrent if mode == "concurrent" else run_one_request
                responses, wall = await runner(client, texts)
                row = log(phase=phase, engine=tag, mode=mode, bs=bs, **labels,
                          **stats(responses, wall))
                found[(mode, bs)] = row["tok_s"]
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                log(phase=phase, engine=tag, mode=mode, bs=bs, **labels, error=repr(error)[:400])
    return found


def deployment_facts(client, name: str) -> Dict:
    """Info reply (trimmed), placement from the registry record, pids."""
    from mii_core.deploy import registry

    facts: Dict = {}
    try:
        info = client.info()
        facts["replicas_info"] = [{k: r.get(k) for k in ("index", "healthy", "pid", "engine",
                                                          "routed", "stats", "error")}
                                  for r in info.get("replicas", [])]
    except Exception as error:  # noqa: BLE001
        facts["info_error"] = repr(error)[:300]
    record = registry.load(name)
    if record is not None:
        facts["gpu_indices"] = [r.gpu_indices for r in record.replicas]
        facts["pids"] = record.pids
        facts["supervisor_pid"] = record.supervisor_pid
    return facts


def children_of(pid: int) -> List[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def latest(rows, **match) -> Optional[Dict]:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "error" not in r]
    return hits[-1] if hits else None


# -- phases ------------------------------------------------------------------------------
async def phase_ours(args) -> None:
    phase = f"B_{args.engine}_tp1"
    tag = f"ours_{args.engine}_tp1"
    name = f"bench-{args.engine}-tp1"
    with common.GpuSampler() as sampler:
        async with deployment(phase, name, **serve_kwargs(args)) as (client, ready):
            facts = deployment_facts(client, name)
            log(phase=phase, kind="deployment", engine=tag, serve_s=round(ready, 2), **facts)
            warm = await warm_up(client)
            log(phase=phase, kind="warmup", engine=tag, warmup_s=round(warm, 2))
            await greedy(client, phase, tag)
            await measure(client, phase, tag, BATCHES, tp=1, replicas=1)
            log(phase=phase, kind="memory", engine=tag, serve_s=round(ready, 2),
                compute_apps=common.compute_apps(), **sampler.summary())


async def phase_tp2(args) -> None:
    phase, tag, name = "C_tp2", f"ours_{args.engine}_tp2", f"bench-{args.engine}-tp2"
    rows = common.read_jsonl()
    reference = latest(rows, kind="greedy", source=f"ours_{args.engine}_tp1")
    with common.GpuSampler() as sampler:
        async with deployment(phase, name, **serve_kwargs(args, tensor_parallel=2)) as (client, ready):
            facts = deployment_facts(client, name)
            log(phase=phase, kind="deployment", engine=tag, serve_s=round(ready, 2), **facts)
            ranks = []
            launcher = facts.get("pids", {}).get("replica-0")
            if launcher:
                ranks = children_of(launcher)
            log(phase=phase, kind="env_check", ranks={pid: common.env_check(pid) for pid in ranks})
            texts = await greedy(client, phase, tag)
            if reference is not None:
                log(phase=phase, kind="greedy_compare", what="tp2 vs tp1",
                    **common.compare_texts(texts, reference["texts"]))
            else:
                log(phase=phase, kind="greedy_compare", what="tp2 vs tp1",
                    error="no tp1 greedy reference in gpu_bench.jsonl (phase B failed?)")
            warm = await warm_up(client)
            log(phase=phase, kind="warmup", engine=tag, warmup_s=round(warm, 2))
            await measure(client, phase, tag, BATCHES, modes=("concurrent",), tp=2, replicas=1)
            log(phase=phase, kind="memory", engine=tag, serve_s=round(ready, 2),
                compute_apps=common.compute_apps(), **sampler.summary())


async def phase_replicas(args) -> None:
    phase, tag, name = "C_replicas", f"ours_{args.engine}_2x_tp1", f"bench-{args.engine}-rep2"
    with common.GpuSampler() as sampler:
        async with deployment(phase, name, **serve_kwargs(args, replica_num=2)) as (client, ready):
            # Round robin first: any earlier request would move the scheduler's cursor.
            order = []
            for text in common.prompts(4, seed=11):
                order.append(client.generate(text, timeout=CALL_TIMEOUT, **gen_kwargs(4))[0].replica)
            log(phase=phase, kind="round_robin", replicas_of_4_sequential=order,
                ok=order == [0, 1, 0, 1])
            facts = deployment_facts(client, name)
            log(phase=phase, kind="deployment", engine=tag, serve_s=round(ready, 2), **facts)
            warm = await warm_up(client)
            log(phase=phase, kind="warmup", engine=tag, warmup_s=round(warm, 2))
            apps = common.compute_apps()
            replica_pids = {r.get("index"): r.get("pid") for r in facts.get("replicas_info", [])}
            gpu_of_pid = {a["pid"]: a["gpu"] for a in apps}
            top = max(BATCHES)
            await measure(client, phase, tag, (top, 2 * top), modes=("concurrent",), tp=1,
                          replicas=2)
            mem = sampler.summary()
            deltas = mem.get("gpu_mem_peak_delta_mib", {})
            placement = facts.get("gpu_indices", [])
            via_smi = [gpu_of_pid.get(replica_pids.get(i)) for i in range(2)]
            log(phase=phase, kind="placement", gpu_indices=placement, compute_apps=apps,
                replica_pids=replica_pids, replica_gpu_via_nvidia_smi=via_smi,
                own_gpu_by_record=len(placement) == 2 and placement[0] != placement[1],
                own_gpu_by_nvidia_smi=(None not in via_smi and via_smi[0] != via_smi[1]),
                both_gpus_loaded=(len(deltas) >= 2 and all(v > 1000 for v in deltas.values())),
                **mem)
            single = latest(common.read_jsonl(), engine=f"ours_{args.engine}_tp1",
                            mode="concurrent", bs=top)
            mine = latest(common.read_jsonl(), engine=tag, mode="concurrent", bs=top)
            if single and mine:
                log(phase=phase, kind="replica_scaling", bs=top, one_replica_tok_s=single["tok_s"],
                    two_replicas_tok_s=mine["tok_s"],
                    ratio=round(mine["tok_s"] / single["tok_s"], 3))


async def phase_greedy_fp32(args) -> None:
    """Optional: greedy tp2 vs tp1 in float32, to tell bf16 rounding from a sharding bug."""
    phase, texts = "C_fp32", {}
    for tp in (1, 2):
        name = f"bench-{args.engine}-fp32-tp{tp}"
        kwargs = serve_kwargs(args, tensor_parallel=tp, dtype="float32")
        async with deployment(phase, name, **kwargs) as (client, ready):
            log(phase=phase, kind="deployment", engine=f"ours_{args.engine}_fp32_tp{tp}",
                serve_s=round(ready, 2))
            texts[tp] = await greedy(client, phase, f"ours_{args.engine}_fp32_tp{tp}")
    log(phase=phase, kind="greedy_compare", what="fp32 tp2 vs fp32 tp1",
        **common.compare_texts(texts[2], texts[1]))


PHASES = {"ours": phase_ours, "tp2": phase_tp2, "replicas": phase_replicas,
          "greedy_fp32": phase_greedy_fp32}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--engine", default="deepspeed")
    args = parser.parse_args()
    common.exit_on_sigterm()
    os.environ.setdefault("MII_QUIET", "0")
    label = {"ours": f"B_{args.engine}_tp1", "tp2": "C_tp2", "replicas": "C_replicas",
             "greedy_fp32": "C_fp32"}[args.phase]
    log(phase=label, kind="start", model=MODEL_DIR, **common.python_info())
    status = 0
    try:
        asyncio.run(PHASES[args.phase](args))
    except BaseException as error:  # noqa: BLE001 - SystemExit from SIGTERM included
        traceback.print_exc()
        what = ("stopped by its timeout (SIGTERM); results above are partial"
                if isinstance(error, SystemExit) and error.code == 143 else
                f"{type(error).__name__}: {str(error)[:1500]}")
        log(phase=label, error=what)
        status = 1
    finally:
        for name in STARTED:  # belt and braces: nothing of ours may outlive the phase
            killed = cleanup.stop_named(name, f"{label} exiting")
            if killed is not None:
                log(phase=label, kind="cleanup", deployment=name, killed=killed)
    return status


if __name__ == "__main__":
    sys.exit(main())
