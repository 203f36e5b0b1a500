"""Every example runs: the scripts against real deployments, the plugin examples installed."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import ROOT, deployed, kill_deployment

import mii
from mii_core.deploy import registry

EXAMPLES = ROOT / "examples"


def run_example(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180,
                          cwd=str(ROOT), env=env)


def test_quickstart(tiny_model):
    result = run_example(str(EXAMPLES / "quickstart.py"), tiny_model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("new tokens (length)") == 2 and "terminated" in result.stdout
    assert registry.load("tiny-llama-mii-deployment") is None


def test_persistent_scripts_in_three_processes(tiny_model):
    try:
        for script in ("serve.py", "reconnect.py", "terminate.py"):
            result = run_example(str(EXAMPLES / "persistent" / script), tiny_model)
            assert result.returncode == 0, f"{script}: {result.stderr}"
        assert "terminated" in result.stdout
        assert registry.load("tiny-llama-mii-deployment") is None
    finally:
        kill_deployment("tiny-llama-mii-deployment")


def test_engine_plugin_example(tiny_model):
    with deployed(tiny_model, "example-engine", engine="hf_options",
                  inference_engine_config={"attn_implementation": "eager"}) as client:
        assert client("DeepSpeed is", max_new_tokens=4)[0].generated_length == 4
        assert client.info()["engine"] == "hf_options"


def test_scheduler_plugin_example(tiny_model, monkeypatch):
    monkeypatch.setenv("MII_REPLICA_WEIGHTS", "3,1")  # inherited by the load balancer
    with deployed(tiny_model, "example-scheduler", engine="transformers", replica_num=2,
                  scheduler="weighted_round_robin") as client:
        served = Counter(client("hi", max_new_tokens=2)[0].replica for _ in range(8))
        assert served == {0: 6, 1: 2}
