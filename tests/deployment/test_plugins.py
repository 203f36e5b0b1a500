"""Plugin discovery through entry points, including a pip-installed third-party package."""
import json

import pytest
from conftest import GREEDY, LogWatch, run_mii, serve, wait_until

from mii.errors import PluginError
from mii_core.config.models import ModelConfig
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


def test_auto_engine_is_deepspeed_where_it_shards_or_is_configured():
    def engine(**fields):
        return resolve_engine_name(ModelConfig(model_name_or_path="m", **fields))

    assert engine(tensor_parallel=2) == "deepspeed"
    assert engine(inference_engine_config={"a": 1}) == "deepspeed"
    # one rank: AutoTP shards nothing, and the transformers engine skips DeepSpeed's import
    assert engine() == "transformers"
    assert engine(engine="transformers", tensor_parallel=2) == "transformers"
    assert engine(engine="deepspeed") == "deepspeed"


def test_round_robin_is_exact_and_skips_unhealthy():
    scheduler = RoundRobinScheduler(3)
    assert [scheduler.pick([0, 1, 2]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [scheduler.pick([0, 2]) for _ in range(4)] == [0, 2, 0, 2]


def test_cli_lists_plugins_with_distribution():
    result = run_mii("plugins")  # the installed script: its exit status is checked
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:3]): line for line in result.stdout.splitlines()}
    assert ("engine", "float64", "mii-thirdparty-test") in rows
    assert ("engine", "transformers", "mii-serve") in rows
    assert ("scheduler", "highest_first", "mii-thirdparty-test") in rows
    assert "BROKEN: ModuleNotFoundError" in rows[("engine", "broken", "mii-thirdparty-test")]
    assert rows[("engine", "float64", "mii-thirdparty-test")].endswith("  ok")


def test_serve_uses_third_party_engine_scheduler_and_hook(tiny_model, mii_home):
    client = serve(tiny_model, deployment_name="thirdparty", engine="float64",
                   scheduler="highest_first", replica_num=2,
                   inference_engine_config={"thirdparty_max_batch": 3})
    try:
        assert wait_until(lambda: all(r["healthy"] for r in client.info()["replicas"]))
        log = LogWatch("thirdparty")
        out = client(["DeepSpeed is"] * 3, max_new_tokens=4, **GREEDY)
        info = client.info()
        if not log.health_missed():  # else replica 1 may rightly have been skipped
            assert {r.replica for r in out} == {1}  # highest_first always picks replica 1
            assert [r["routed"] for r in info["replicas"]] == [0, 1]
        assert info["scheduler"] == "highest_first" and info["engine"] == "float64"
        log = (mii_home / "logs").glob("thirdparty-*.log")
        text = next(log).read_text()
        assert "thirdparty hook saw float64 engine (third party)" in text
        assert "max_batch_size=3" in text  # mii_adjust_config changed the config before launch
    finally:
        client.terminate_server()


def test_the_chosen_scheduler_s_own_hooks_validate_before_anything_starts(tiny_model):
    """A scheduler plugin's @hookimpl methods run in serve() (no second entry point)."""
    import mii
    from mii.errors import ConfigError
    from mii_core.deploy import registry

    with pytest.raises(ConfigError, match="highest_first needs replica_num >= 2"):
        mii.serve(tiny_model, deployment_name="hooked-scheduler", scheduler="highest_first",
                  replica_num=1)
    assert registry.load("hooked-scheduler") is None
