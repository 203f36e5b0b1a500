"""Where ``serve()``'s time goes on CPU: serve the tiny model, ask for one token, stop.

    python bench/start_time.py [--runs 5] [--out bench/results/start_time.json] [-- SERVE_KWARGS_JSON]

Each run times ``mii.serve(...)`` returning and the first reply, then reads the
deployment log's timestamps (every process writes to it, to the millisecond) for the
phases between: the supervisor starting the replica, the replica's imports (until it
names its engine), loading (until ready), the runtime and transport (until serving),
and readiness reaching ``serve()``. Prints one JSON line per run and the medians.
Each run also times the floor in a fresh process: what any replica must do before it
can answer, with nothing of ours (``import torch``, transformers' auto classes, the tiny
model's ``from_pretrained`` and tokenizer, one forward); ``serve()`` less the floor is
what our processes and their hand-offs cost.
``-X importtime`` of a replica's imports: ``python -X importtime -m
mii_core.control.replica_main`` shows them (it exits at once for want of arguments).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

import mii
from mii.testing.tiny_model import ensure_tiny_model
from mii_core.deploy import registry
from mii_core.deploy.ports import free_port

# (phase, the log line that ends it); each phase starts where the previous one ended
MARKS = [("spawn", r"supervisor .* starting replica-0"),
         ("replica_imports", r"replica-0/rank-0 .* engine \S+ \(rank 0"),
         ("load", r"replica-0/rank-0 .*\[progress\] replica 0 rank 0 ready in"),
         ("runtime_and_transport", r"replica-0/rank-0 .*\[progress\] replica 0 serving on"),
         ("ready_seen", r"supervisor .* deployment \S+ ready on")]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(line: str) -> Optional[float]:
    match = STAMP.match(line)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases(log: str, started: float) -> Dict[str, float]:
    """Seconds of each phase in ``MARKS``, from the first line matching each mark."""
    found: Dict[str, float] = {}
    lines = log.splitlines()
    for name, pattern in MARKS:
        for line in lines:
            if re.search(pattern, line):
                stamp = _stamp(line)
                if stamp is not None:
                    found[name] = stamp
                break
    result, previous = {}, started
    for name, _ in MARKS:
        if name in found:
            result[name] = round(found[name] - previous, 3)
            previous = found[name]
    return result


FLOOR = """
import sys, time
started = time.time()
import torch
imported_torch = time.time()
from transformers import AutoModelForCausalLM, AutoTokenizer
imported = time.time()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
loaded = time.time()
with torch.no_grad():
    model(**tokenizer("DeepSpeed is", return_tensors="pt"))
print(imported_torch - started, imported - imported_torch, loaded - imported, time.time() - loaded,
      time.time())
"""


def floor_once(model: str) -> Dict:
    """The floor: a fresh interpreter that imports, loads and runs the model (no mii),
    from its start to the forward's end (its exit not counted)."""
    started = time.time()
    out = subprocess.run([sys.executable, "-c", FLOOR, model], check=True, capture_output=True,
                         text=True).stdout.split()
    torch_s, transformers_s, load_s, forward_s = (round(float(v), 3) for v in out[-5:-1])
    return dict(floor_s=round(float(out[-1]) - started, 3), torch_s=torch_s,
                transformers_s=transformers_s, load_s=load_s, forward_s=forward_s)


def run_once(model: str, kwargs: Dict) -> Dict:
    name = f"start-time-{free_port()}"
    started = time.time()
    client = mii.serve(model, deployment_name=name, port_number=free_port(), **kwargs)
    served = time.time()
    try:
        client("DeepSpeed is", max_new_tokens=1, do_sample=False)
        replied = time.time()
        log = registry.log_path(name).read_text()
    finally:
        client.terminate_server()
    return dict(serve_s=round(served - started, 3), first_reply_s=round(replied - started, 3),
                phases=phases(log, started), floor=floor_once(model))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("serve_kwargs", nargs="?", default="{}",
                        help="JSON of extra serve() keywords, e.g. '{\"engine\": \"deepspeed\"}'")
    args = parser.parse_args(argv)
    kwargs = json.loads(args.serve_kwargs)
    model = str(ensure_tiny_model())
    runs = []
    for _ in range(args.runs):
        runs.append(run_once(model, kwargs))
        print(json.dumps(runs[-1]), flush=True)
    summary = dict(runs=len(runs), serve_kwargs=kwargs,
                   median_first_reply_s=statistics.median(r["first_reply_s"] for r in runs),
                   median_serve_s=statistics.median(r["serve_s"] for r in runs),
                   median_floor_s=statistics.median(r["floor"]["floor_s"] for r in runs),
                   median_over_floor_s=round(statistics.median(
                       r["first_reply_s"] - r["floor"]["floor_s"] for r in runs), 3),
                   median_floor={key: statistics.median(r["floor"][key] for r in runs)
                                 for key in runs[0]["floor"]},
                   median_phases={name: statistics.median(r["phases"].get(name, 0.0)
                                                          for r in runs)
                                  for name, _ in MARKS})
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(summary, each=runs), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
