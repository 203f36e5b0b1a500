"""What keeps ``serve()``'s start-up short (docs/architecture.md, "Start-up time").

Only a replica needs torch, transformers and DeepSpeed: the caller of ``serve()``, the
supervisor, the load balancer and the REST gateway start without them, and ``import mii``
imports neither torch nor grpc (each checked in a fresh interpreter). The supervisor's
side (children spawned before its transport is loaded, its start-up poll) is checked in
test_mutants_supervisor.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "deepspeed")
BUILT_IN_DRIVERS = """
from mii_core.plugins.discovery import hooks, load_driver
for kind, name in [("engine", "transformers"), ("engine", "deepspeed"),
                   ("scheduler", "round_robin"), ("scheduler", "least_outstanding"),
                   ("transport", "grpc")]:
    load_driver(kind, name)
hooks()
"""


def imported(code: str, *, cwd=None) -> set:
    """The modules of HEAVY + grpc that a fresh interpreter holds after running ``code``."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in {HEAVY + ("grpc",)!r} if m in sys.modules]))
        """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_mii_imports_neither_torch_nor_grpc():
    assert imported("import mii") == set()


@pytest.mark.parametrize("module", ["mii_core.control.supervisor", "mii_core.control.lb_main",
                                    "mii_core.control.gateway_main"])
def test_the_supervisor_load_balancer_and_gateway_start_without_torch(module):
    # The entry point plus every built-in driver and the hook plugins, as these processes
    # load them; the gateway's web stack too.
    extra = "import uvicorn, mii_core.gateway\n" if module.endswith("gateway_main") else ""
    assert not imported(f"import {module}\n{extra}{BUILT_IN_DRIVERS}") & set(HEAVY)


def test_serve_validates_without_torch(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4,
                                                   "num_key_value_heads": 2,
                                                   "max_position_embeddings": 128}))
    code = f"""
        from mii_core.api.serve import prepare
        from mii_core.config.kwargs import parse_serve_kwargs
        prepare(parse_serve_kwargs({str(model)!r}, None, None))
        """
    assert not imported(code) & set(HEAVY)


def test_the_replica_entry_point_imports_torch_only_when_it_runs():
    # replica_main reaches the runtime through mii_engines.runtime.service, which imports
    # torch inside its functions; the engine it loads imports what it needs.
    assert not imported("import mii_core.control.replica_main") & set(HEAVY)


def test_the_load_balancer_retries_a_starting_replica_within_its_probe_interval():
    from mii_transport.grpc.load_balancer import REPLICA_CHANNEL_OPTIONS
    from mii_transport.grpc.server import CHANNEL_OPTIONS

    options = dict(REPLICA_CHANNEL_OPTIONS)
    assert len(options) == len(REPLICA_CHANNEL_OPTIONS)  # one value per key
    assert options.pop("grpc.max_reconnect_backoff_ms") == 100
    assert options == {k: v for k, v in CHANNEL_OPTIONS if k != "grpc.max_reconnect_backoff_ms"}
