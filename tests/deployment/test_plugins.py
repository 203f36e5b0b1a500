"""Plugin discovery through entry points, including a pip-installed third-party package."""
import json

import pytest

import mii
from mii.errors import PluginError
from mii_core.plugins.discovery import (
    discover,
    load_driver,
    plugin_manager,
    resolve_engine_name,
)
from mii_core.routing.schedulers.round_robin import RoundRobinScheduler


def test_our_defaults_come_from_entry_points():
    names = {(i.kind, i.name): i for k in ("engine", "scheduler", "transport") for i in discover(k)}
    for key in [("engine", "transformers"), ("engine", "deepspeed"), ("scheduler", "round_robin"),
                ("scheduler", "least_outstanding"), ("transport", "grpc")]:
        assert key in names and names[key].distribution == "mii-serve", key
        assert not names[key].error, names[key].error


def test_unknown_driver_lists_installed_names():
    with pytest.raises(PluginError, match=r"unknown scheduler 'nope'.*least_outstanding.*round_robin"):
        load_driver("scheduler", "nope")


def test_broken_plugin_is_reported_by_name():
    broken = [i for i in discover("engine") if i.name == "broken"]
    assert broken and "mii_thirdparty_missing_module" in broken[0].error
    with pytest.raises(PluginError, match=r"engine plugin 'broken'.*failed to load.*ModuleNotFoundError"):
        load_driver("engine", "broken")


def test_third_party_drivers_and_hooks_are_discovered():
    assert load_driver("engine", "float64").name == "float64"
    assert load_driver("scheduler", "highest_first")(3).pick([0, 2]) == 2
    names = [name for name, _ in plugin_manager().list_name_plugin()]
    assert any("thirdparty_hooks" in name for name in names)


def test_auto_engine_prefers_deepspeed_when_installed():
    assert resolve_engine_name("auto") == "deepspeed"
    assert resolve_engine_name("transformers") == "transformers"


def test_round_robin_is_exact_and_skips_unhealthy():
    scheduler = RoundRobinScheduler(3)
    assert [scheduler.pick([0, 1, 2]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [scheduler.pick([0, 2]) for _ in range(4)] == [0, 2, 0, 2]


def test_cli_lists_plugins_with_distribution(tmp_path):
    from conftest import run_python

    result = run_python("from mii_core.cli import main; main(['plugins'])")
    assert result.returncode == 0, result.stderr
    assert "float64" in result.stdout and "mii-thirdparty-test" in result.stdout
    assert "BROKEN" in result.stdout


def test_serve_uses_third_party_engine_scheduler_and_hook(tiny_model, free_port, mii_home):
    client = mii.serve(tiny_model, deployment_name="thirdparty", port_number=free_port,
                       engine="float64", scheduler="highest_first", replica_num=2,
                       inference_engine_config={"thirdparty_max_batch": 3})
    try:
        out = client(["DeepSpeed is"] * 3, max_new_tokens=4, do_sample=False)
        assert {r.replica for r in out} == {1}  # highest_first always picks replica 1
        info = client.info()
        assert info["scheduler"] == "highest_first" and info["engine"] == "float64"
        assert [r["routed"] for r in info["replicas"]] == [0, 1]
        log = (mii_home / "logs").glob("thirdparty-*.log")
        text = next(log).read_text()
        assert "thirdparty hook saw float64 engine (third party)" in text
        assert "max_batch_size=3" in text  # mii_adjust_config changed the config before launch
    finally:
        client.terminate_server()
