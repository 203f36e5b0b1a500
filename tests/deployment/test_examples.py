"""Every example runs: the scripts against real deployments, the plugin examples installed."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest
from conftest import GREEDY, ROOT, LogWatch, deployed, kill_deployment, wait_until

import mii
from mii.errors import ConfigError
from mii_core.deploy import registry

EXAMPLES = ROOT / "examples"


def run_example(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180,
                          cwd=str(ROOT), env=env)


QUICKSTART_LINE = re.compile(r"(\d+) prompt tokens -> (\d+) new tokens \((\w+)\): '.*'")


def test_quickstart(tiny_model):
    result = run_example(str(EXAMPLES / "quickstart.py"), tiny_model)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "terminated" and len(lines) == 3, result.stdout
    for line in lines[:2]:  # the example is greedy: the same 32 tokens on every run
        prompt, new, reason = QUICKSTART_LINE.fullmatch(line).groups()
        assert int(prompt) > 0 and (int(new), reason) == (32, "length"), line
    assert registry.load("tiny-llama-mii-deployment") is None


def test_persistent_scripts_in_three_processes(tiny_model):
    try:
        for script in ("serve.py", "reconnect.py", "terminate.py"):
            result = run_example(str(EXAMPLES / "persistent" / script), tiny_model)
            assert result.returncode == 0, f"{script}: {result.stderr}"
            if script != "terminate.py":  # each printed the list of its two responses
                assert result.stdout.startswith("[") and "]" in result.stdout, result.stdout
        assert result.stdout == "terminated\n"
        assert registry.load("tiny-llama-mii-deployment") is None
    finally:
        kill_deployment("tiny-llama-mii-deployment")


def test_engine_plugin_example(tiny_model):
    with deployed(tiny_model, "example-engine", engine="hf_options",
                  inference_engine_config={"attn_implementation": "eager"}) as client:
        assert client("DeepSpeed is", max_new_tokens=4, **GREEDY)[0].generated_length == 4
        assert client.info()["engine"] == "hf_options"
        # the options reached from_pretrained (with ModelConfig.dtype's fallback)
        assert "hf_options LlamaForCausalLM on cpu (attn_implementation=eager, " \
               "dtype=torch.float32)" in registry.log_path("example-engine").read_text()


def test_engine_plugin_example_refuses_before_any_process(tiny_model, no_process_started):
    with pytest.raises(ConfigError, match="inference_engine_config: device_map is set by mii"):
        mii.serve(tiny_model, deployment_name="example-engine-bad", engine="hf_options",
                  inference_engine_config={"device_map": "cpu"})
    with pytest.raises(ConfigError, match="hf_options engine: no tensor_parallel > 1"):
        mii.serve(tiny_model, deployment_name="example-engine-bad", engine="hf_options",
                  quantization_mode="wf6af16")


def test_scheduler_plugin_example(tiny_model, monkeypatch):
    monkeypatch.setenv("MII_REPLICA_WEIGHTS", "3,1")  # inherited by the load balancer
    with deployed(tiny_model, "example-scheduler", engine="transformers", replica_num=2,
                  scheduler="weighted_round_robin") as client:
        assert wait_until(lambda: all(r["healthy"] for r in client.info()["replicas"]))
        log = LogWatch("example-scheduler")
        served = Counter(client("hi", max_new_tokens=2, **GREEDY)[0].replica for _ in range(8))
        if not log.health_missed():  # a missed health check rightly skips a replica
            assert served == {0: 6, 1: 2}
        assert sum(served.values()) == 8 and set(served) <= {0, 1}


def test_scheduler_plugin_example_refuses_bad_weights_before_any_process(
        tiny_model, monkeypatch, no_process_started):
    monkeypatch.setenv("MII_REPLICA_WEIGHTS", "3,x")
    with pytest.raises(ConfigError, match="expected comma-separated integers"):
        mii.serve(tiny_model, deployment_name="example-scheduler-bad", replica_num=2,
                  scheduler="weighted_round_robin")
