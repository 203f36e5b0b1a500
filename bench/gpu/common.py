"""Shared pieces of the GPU benchmark: settings, prompts, JSON lines, nvidia-smi sampling.

Settings come from the environment (run.sh sets them):
  OUT          folder of gpu_bench.jsonl and deploy_logs.txt (default /tmp/gpu_bench_out)
  MODEL_DIR    the 1.50B random-weight Llama built by ``anchors.py build`` (default /tmp/llama1b)
  BENCH_TINY=1 CPU dry run: the tiny model, short prompts, small batches
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

TINY = os.environ.get("BENCH_TINY", "0") == "1"
OUT = os.environ.get("OUT") or "/tmp/gpu_bench_out"
MODEL_DIR = os.environ.get("MODEL_DIR") or ("/tmp/mii_tiny_bench" if TINY else "/tmp/llama1b")
JSONL = os.path.join(OUT, "gpu_bench.jsonl")
DEPLOY_LOGS = os.path.join(OUT, "deploy_logs.txt")

P = 16 if TINY else 128  # prompt words (= tokens with the anchors' WordLevel tokenizer)
G = 16 if TINY else 128  # new tokens, forced
BATCHES = (1, 4, 8) if TINY else (1, 16, 64)
GREEDY_PROMPTS, GREEDY_TOKENS = 4, (8 if TINY else 32)
TINY_WORDS = ("the model is fast and the cache is warm so every token flows through "
              "deepspeed with tensor parallel ranks on cpu").split()


def prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` prompts of ``P`` words; the same generator as anchors/peer_probe.py."""
    rng = random.Random(seed)
    if TINY:
        return [" ".join(rng.choice(TINY_WORDS) for _ in range(P)) for _ in range(n)]
    return [" ".join(f"w{rng.randrange(10, 128000)}" for _ in range(P)) for _ in range(n)]


def greedy_prompts() -> List[str]:
    """The prompts of the greedy-equality checks (shared by every phase)."""
    return prompts(GREEDY_PROMPTS, seed=4242)


def log(**fields) -> Dict:
    """Append one JSON line to gpu_bench.jsonl and print it (short form)."""
    fields.setdefault("ts", round(time.time(), 1))
    fields.setdefault("tiny", TINY)
    os.makedirs(OUT, exist_ok=True)
    line = json.dumps(fields, default=str)
    with open(JSONL, "a") as handle:
        handle.write(line + "\n")
    short = {k: v for k, v in fields.items() if k not in ("texts", "info", "ts", "tiny")}
    print("RESULT " + json.dumps(short, default=str)[:600], flush=True)
    return fields


def append_deploy_log(title: str, text: str) -> None:
    """Keep a deployment's log tail in $OUT/deploy_logs.txt (one file for all of them)."""
    os.makedirs(OUT, exist_ok=True)
    with open(DEPLOY_LOGS, "a") as handle:
        handle.write(f"===== {title} ({time.strftime('%H:%M:%S')})\n{text}\n")


def read_jsonl() -> List[Dict]:
    """Every record written so far (this run)."""
    if not os.path.exists(JSONL):
        return []
    rows = []
    with open(JSONL) as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def exit_on_sigterm() -> None:
    """`timeout` sends SIGTERM: turn it into SystemExit so ``finally`` blocks stop deployments."""
    def handler(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def nvidia_smi(*args: str, timeout: float = 10.0) -> Optional[str]:
    """Output of ``nvidia-smi ARGS`` or None (no GPU, no binary, error)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                              timeout=timeout, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def gpu_memory() -> Dict[int, int]:
    """MiB used per GPU index (empty without nvidia-smi)."""
    text = nvidia_smi("--query-gpu=index,memory.used", "--format=csv,noheader,nounits")
    used = {}
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            used[int(parts[0])] = int(float(parts[1]))
    return used


def compute_apps() -> List[Dict]:
    """Processes on GPUs as nvidia-smi reports them: pid, gpu index, used MiB."""
    gpus = nvidia_smi("--query-gpu=index,uuid", "--format=csv,noheader")
    index = {}
    for line in (gpus or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2:
            index[parts[1]] = int(parts[0])
    apps = nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory",
                      "--format=csv,noheader,nounits")
    found = []
    for line in (apps or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            found.append({"pid": int(parts[0]), "gpu": index.get(parts[1], parts[1]),
                          "used_mib": int(float(parts[2])) if parts[2].replace(".", "").isdigit()
                          else parts[2]})
    return found


class GpuSampler:
    """Polls nvidia-smi in a thread; ``peak`` is the most MiB seen per GPU."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.baseline = gpu_memory()
        self.peak: Dict[int, int] = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.enabled = bool(self.baseline)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for gpu, used in gpu_memory().items():
                self.peak[gpu] = max(self.peak.get(gpu, 0), used)

    def __enter__(self) -> "GpuSampler":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=15)

    def summary(self) -> Dict:
        """Baseline, peak and peak minus baseline (MiB) per GPU."""
        if not self.enabled:
            return {"gpu_mem": "n/a (no nvidia-smi)"}
        return {"gpu_mem_baseline_mib": self.baseline, "gpu_mem_peak_mib": self.peak,
                "gpu_mem_peak_delta_mib": {g: self.peak[g] - self.baseline.get(g, 0)
                                           for g in self.peak}}


def first_difference(a: str, b: str) -> Optional[int]:
    """Index of the first differing word of two generated texts (None if equal)."""
    wa, wb = a.split(), b.split()
    for i, (x, y) in enumerate(zip(wa, wb)):
        if x != y:
            return i
    return None if len(wa) == len(wb) else min(len(wa), len(wb))


def compare_texts(mine: List[str], reference: List[str]) -> Dict:
    """equal, and per prompt the first differing word position (None where equal)."""
    firsts = [first_difference(x, y) for x, y in zip(mine, reference)]
    return {"equal": len(mine) == len(reference) and all(f is None for f in firsts),
            "first_diff_word_per_prompt": firsts}


def env_check(pid: int, names=("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                               "NVSHMEM_DISABLE_NVLS")) -> Dict:
    """The multicast-off variables as the process ``pid`` sees them (from /proc)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(item.decode(errors="replace").split("=", 1)
                       for item in handle.read().split(b"\0") if b"=" in item)
    except OSError as error:
        return {"error": str(error)}
    return {name: env.get(name) for name in names}


def python_info() -> Dict:
    """Interpreter and installed versions (from metadata: nothing is imported)."""
    import importlib.metadata as md

    info = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "deepspeed", "grpcio", "protobuf", "pydantic",
                 "typing_extensions", "mii-serve"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    return info
