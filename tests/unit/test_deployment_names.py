"""Deployment names: a documented safe alphabet (``MIIConfig.deployment_name``), defaults
that always satisfy it, and one rule telling a name from a ``host:port`` address."""
from __future__ import annotations

import json

import pytest

import mii
from mii.errors import ConfigError, DeploymentNotFoundError
from mii_core.config.models import MIIConfig, default_deployment_name

REFUSED = {
    "llama:7": "taken for host:port by client/status/stop",
    "two\nlines": "forges log lines, splits `mii list`",
    "nul\0byte": "a NUL",
    ".hidden": "hides its files",
    "../up": "climbs out of $MII_HOME",
    "org/../x": "climbs out of $MII_HOME",
    "a//b": "an empty part",
    "/abs": "an empty part",
    "tab\there": "a control character",
    "caf\u00e9": "not ASCII",
    "x" * 201: "too long",
}


@pytest.mark.parametrize("name", REFUSED, ids=[f"{i}-{why}" for i, why in
                                               enumerate(REFUSED.values())])
def test_a_name_outside_the_alphabet_is_refused_naming_the_field(name):
    with pytest.raises(ConfigError, match=r"^deployment_name: must be 1-200 characters: "
                                          r"letters, digits, '\.', '_' and '-'"):
        mii.serve("/nonexistent-model", deployment_name=name)
    with pytest.raises(ValueError, match="deployment_name"):
        MIIConfig(model_config={"model_name_or_path": "m"}, deployment_name=name)


@pytest.mark.parametrize("name", ["tiny", "org/model-mii-deployment", "a.b_c-9", "x" * 200,
                                  "Llama-3.2-1B"])
def test_names_in_the_alphabet_are_kept(name):
    assert MIIConfig(model_config={"model_name_or_path": "m"},
                     deployment_name=name).deployment_name == name


def test_default_names_of_hub_models_are_mii_s(tmp_path):
    for model in ("meta-llama/Llama-3.2-1B", "gpt2", "Qwen/Qwen2.5-0.5B-Instruct"):
        assert default_deployment_name(model) == f"{model}-mii-deployment"
        assert MIIConfig(model_config={"model_name_or_path": model}).deployment_name == \
            f"{model}-mii-deployment"


@pytest.mark.parametrize("directory, expected", [
    ("tiny-llama", "tiny-llama-mii-deployment"),
    ("my model (v2)", "my-model-v2--mii-deployment"),
    (".hidden", "hidden-mii-deployment"),
    ("llama:7", "llama-7-mii-deployment"),
    ("\u00fcber", "ber-mii-deployment"),
    ("\u6a21\u578b", "model-mii-deployment"),
])
def test_default_names_of_local_models_are_valid(tmp_path, directory, expected):
    path = tmp_path / directory
    path.mkdir()
    assert default_deployment_name(str(path)) == expected
    config = MIIConfig(model_config={"model_name_or_path": str(path)})
    assert config.deployment_name == expected


def test_a_long_default_name_is_cut_to_the_limit():
    name = default_deployment_name("org/" + "m" * 300)
    assert len(name) == 200 and name.endswith("m-mii-deployment")
    assert MIIConfig(model_config={"model_name_or_path": "org/" + "m" * 300})


@pytest.mark.parametrize("target, expected", [
    ("llama:7", ("llama", 7)), ("127.0.0.1:50050", ("127.0.0.1", 50050)),
    ("[::1]:50050", ("[::1]", 50050)), ("tiny", None), ("org/model-mii-deployment", None)])
def test_a_target_is_an_address_exactly_when_it_holds_a_colon(target, expected):
    from mii_core.deploy.addresses import parse_address

    assert parse_address(target) == expected


@pytest.mark.parametrize("target", ["llama:x", "host:0", "host:65536", ":50050", "host:",
                                    "host:\u0663"])
def test_a_colon_without_a_valid_address_is_an_error_saying_so(target):
    with pytest.raises(DeploymentNotFoundError, match=r"is not a deployment name \(names "
                                                      r"cannot contain ':'\) nor a host:port"):
        mii.client(target)


def test_a_record_with_a_name_outside_the_alphabet_is_not_listed(tmp_path, monkeypatch):
    from mii_core.deploy import registry

    monkeypatch.setenv("MII_HOME", str(tmp_path / "home"))
    forged = {"name": "x\nforged-row", "config": {"model_config": {"model_name_or_path": "m"}},
              "host": "127.0.0.1", "port": 1, "log_path": "/dev/null"}
    path = registry.mii_home() / "deployments" / "forged.json"
    path.write_text(json.dumps(forged))
    path.chmod(0o600)
    assert registry.list_records() == []
    assert registry.read_problem(path).startswith("invalid record: name: must be 1-200 characters")


def test_a_model_directory_with_a_colon_is_looked_up_by_its_default_name(tmp_path):
    model = tmp_path / "llama:7"
    model.mkdir()
    with pytest.raises(DeploymentNotFoundError, match=rf"no running deployment named "
                                                      rf"'{model}' or 'llama-7-mii-deployment'"):
        mii.client(str(model))
