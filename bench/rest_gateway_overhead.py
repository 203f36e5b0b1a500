"""CPU benchmark of the REST gateway's overhead on the tiny model (not a test).

Sequential, identical greedy requests (8 new tokens) against one deployment with
``enable_restful_api=True``: through the Python client (client -> load balancer ->
replica; unary and streamed) and through the gateway (HTTP client -> gateway -> load
balancer -> replica), on ``/mii/{name}``, ``/v1/completions`` and streamed
``/v1/completions``. The gateway's cost is the difference of the medians.

    python -m bench.rest_gateway_overhead [--requests 100] \
        [--out bench/results/rest_gateway_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

import mii
from bench.serving_overhead import PARAMS, PROMPT, _timed  # same request, same timing
from mii.testing.tiny_model import ensure_tiny_model
from mii_core.deploy.ports import free_port


def _summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_ms": round(1000 * statistics.median(ordered), 3),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 3),
            "mean_ms": round(1000 * statistics.fmean(ordered), 3), "n": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    model = str(ensure_tiny_model())
    rest_port = free_port()
    name = "bench-rest"
    client = mii.serve(model, deployment_name=name, port_number=free_port(),
                       engine="transformers", enable_restful_api=True, restful_api_port=rest_port)
    results = {}
    try:
        base = f"http://127.0.0.1:{rest_port}"
        openai_body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                       "ignore_eos": True}
        with httpx.Client(base_url=base, timeout=60) as http:
            def via_mii_route():
                reply = http.post(f"/mii/{name}", json={"prompts": PROMPT, **PARAMS})
                assert reply.status_code == 200, reply.text

            def via_completions():
                reply = http.post("/v1/completions", json=openai_body)
                assert reply.status_code == 200, reply.text

            def via_stream():
                with http.stream("POST", "/v1/completions",
                                 json=dict(openai_body, stream=True)) as reply:
                    assert reply.status_code == 200
                    for _ in reply.iter_lines():
                        pass

            runs = {"python_client": lambda: client(PROMPT, **PARAMS),
                    "python_client_stream": lambda: list(client.stream(PROMPT, **PARAMS)),
                    "rest_mii_route": via_mii_route, "rest_v1_completions": via_completions,
                    "rest_v1_completions_stream": via_stream}
            for _ in range(2):  # interleave rounds so that drift affects every path alike
                for label, call in runs.items():
                    results.setdefault(label, []).extend(_timed(call, args.requests // 2))
    finally:
        client.terminate_server()
    report = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "cpus": os.cpu_count()},
              "requests_per_path": args.requests, "params": PARAMS,
              "latency": {label: _summary(values) for label, values in results.items()}}
    p50 = {label: summary["p50_ms"] for label, summary in report["latency"].items()}
    report["gateway_overhead_p50_ms"] = {  # each REST path minus the same call in Python
        "rest_mii_route": round(p50["rest_mii_route"] - p50["python_client"], 3),
        "rest_v1_completions": round(p50["rest_v1_completions"] - p50["python_client"], 3),
        "rest_v1_completions_stream": round(p50["rest_v1_completions_stream"]
                                            - p50["python_client_stream"], 3)}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
