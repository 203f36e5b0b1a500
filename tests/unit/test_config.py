"""Configs validate like DeepSpeed-MII 0.3's; serve() kwargs parsing names every bad key."""
import pytest

import mii
from mii.config import GenerateParamsConfig, MIIConfig, ModelConfig
from mii.errors import ConfigError, InvalidGenerateParams, UnknownArgument
from mii_core.config.kwargs import (
    check_prompts,
    parse_generate_kwargs,
    parse_serve_kwargs,
)


def test_defaults_match_deepspeed_mii():
    config = MIIConfig(model_config=ModelConfig(model_name_or_path="org/model"))
    model = config.model_conf
    assert (config.port_number, config.restful_api_port, config.restful_processes) == (50050, 51080, 32)
    assert config.deployment_type == mii.DeploymentType.LOCAL and not config.enable_restful_api
    assert config.restful_api_host == "localhost"
    assert config.deployment_name == "org/model-mii-deployment"
    assert (model.tensor_parallel, model.replica_num, model.torch_dist_port) == (1, 1, 29500)
    assert model.device_map == "auto" and model.task == mii.TaskType.TEXT_GENERATION
    assert model.tokenizer == "org/model" and model.max_length is None
    params = GenerateParamsConfig()
    assert (params.min_new_tokens, params.top_p, params.do_sample) == (0, 0.9, True)
    assert params.max_new_tokens is None and params.stop == []
    # MII's class says 1024, but its server fills an unset max_length with the served
    # context (ModelConfig.max_length or the model's): None here means that.
    assert params.max_length is None
    assert params.new_token_budget(prompt_length=1500, context_length=4096) == 2596
    assert GenerateParamsConfig(max_length=1600).new_token_budget(1500, 4096) == 100
    assert GenerateParamsConfig(max_new_tokens=8).new_token_budget(1500, 4096) == 8


def test_deployment_name_from_local_dir_uses_basename(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    config = MIIConfig(model_config={"model_name_or_path": str(model_dir)})
    assert config.deployment_name == "my-model-mii-deployment"


@pytest.mark.parametrize("field, value", [("replica_num", 0), ("tensor_parallel", 0),
                                          ("torch_dist_port", 70000), ("dtype", "int3"),
                                          ("max_length", -5)])
def test_model_config_rejects_bad_values_naming_field(field, value):
    with pytest.raises(ConfigError, match=field):
        parse_serve_kwargs("m", **{field: value})


def test_device_map_shorthands():
    assert ModelConfig(model_name_or_path="m", device_map=1).device_map == {"localhost": [[1]]}
    assert ModelConfig(model_name_or_path="m", device_map=[0, 1]).device_map == {"localhost": [[0, 1]]}
    assert ModelConfig(model_name_or_path="m", device_map=[[0], [1]]).device_map == {"localhost": [[0], [1]]}
    with pytest.raises(ValueError, match="device_map"):
        ModelConfig(model_name_or_path="m", device_map="gpu0")


def test_replica_configs_must_match_replica_num():
    with pytest.raises(ValueError, match="replica_configs has 1 entries but replica_num is 2"):
        ModelConfig(model_name_or_path="m", replica_num=2, replica_configs=[{"hostname": "a"}])


def test_kwargs_reach_model_and_mii_config():
    config = parse_serve_kwargs("m", tensor_parallel=2, port_number=1234,
                                model_config={"replica_num": 3}, mii_config={"scheduler": "least_outstanding"})
    assert config.model_conf.tensor_parallel == 2 and config.model_conf.replica_num == 3
    assert config.port_number == 1234 and config.scheduler == "least_outstanding"


def test_model_config_nested_in_mii_config():
    config = parse_serve_kwargs(mii_config={"model_config": {"model_name_or_path": "m"},
                                            "deployment_name": "d"})
    assert config.model_conf.model_name_or_path == "m" and config.deployment_name == "d"


def test_unknown_kwarg_names_it_and_suggests():
    with pytest.raises(UnknownArgument, match=r"'tensor_paralel'.*did you mean 'tensor_parallel'"):
        parse_serve_kwargs("m", tensor_paralel=2)
    with pytest.raises(UnknownArgument, match="'bogus'"):
        parse_serve_kwargs("m", model_config={"bogus": 1})
    with pytest.raises(UnknownArgument, match="'portnumber'.*'port_number'"):
        parse_serve_kwargs("m", mii_config={"portnumber": 1})


def test_same_key_twice_with_different_values_is_an_error():
    with pytest.raises(ConfigError, match="tensor_parallel given twice"):
        parse_serve_kwargs("m", model_config={"tensor_parallel": 2}, tensor_parallel=4)
    config = parse_serve_kwargs("m", model_config={"tensor_parallel": 2}, tensor_parallel=2)
    assert config.model_conf.tensor_parallel == 2
    with pytest.raises(ConfigError, match="model_name_or_path given twice"):
        parse_serve_kwargs("a", model_config={"model_name_or_path": "b"})


def test_missing_model_name_is_an_error():
    with pytest.raises(ConfigError, match="model_name_or_path"):
        parse_serve_kwargs()


@pytest.mark.parametrize("kwargs, field", [
    ({"top_p": 2}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_length": 0}, "max_length"), ({"min_new_tokens": -2}, "min_new_tokens"),
    ({"do_sample": "maybe"}, "do_sample"), ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"),
    ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens"),
])
def test_generate_params_errors_name_the_field(kwargs, field):
    with pytest.raises(InvalidGenerateParams, match=field):
        parse_generate_kwargs(kwargs)


def test_unknown_generate_kwarg_suggests():
    with pytest.raises(UnknownArgument, match="'max_tokens'.*'max_new_tokens'"):
        parse_generate_kwargs({"max_tokens": 5})
    with pytest.raises(UnknownArgument, match="prompt_length"):
        parse_generate_kwargs({"prompt_length": 5})  # filled in by the server


def test_stop_string_becomes_list():
    assert GenerateParamsConfig(stop="\n").stop == ["\n"]


@pytest.mark.parametrize("prompts, match", [([], "empty"), ([1], r"prompts\[0\]"),
                                            (["ok", None], r"prompts\[1\]"), (5, "prompts"),
                                            ([""], r"prompts\[0\]: the prompt is empty")])
def test_prompt_checks(prompts, match):
    with pytest.raises(InvalidGenerateParams, match=match):
        check_prompts(prompts)


def test_config_round_trips_through_json():
    config = parse_serve_kwargs("m", tensor_parallel=2, device_map={"localhost": [[0, 1]]})
    assert MIIConfig.model_validate_json(config.to_json()) == config


def test_a_typo_of_a_config_dict_parameter_suggests_it():
    import mii
    from mii.errors import UnknownArgument

    with pytest.raises(UnknownArgument, match="did you mean 'model_config'"):
        mii.serve("/nonexistent/model", model_confg={})
