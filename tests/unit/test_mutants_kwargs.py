"""``serve()`` / ``pipeline()`` / ``generate()`` keyword parsing (``mii_core/config/kwargs.py``):
exact messages, where each key goes, and the type checks (written from mutation testing:
tools/mutation.py)."""
from __future__ import annotations

import pytest

from mii_core.config import kwargs as parsing
from mii_core.config.kwargs import (
    check_prompts,
    parse_generate_kwargs,
    parse_pipeline_kwargs,
    parse_serve_kwargs,
    unknown_argument,
)
from mii_core.config.models import GenerateParamsConfig, MIIConfig, ModelConfig
from mii_core.errors import ConfigError, InvalidGenerateParams, UnknownArgument


def test_fields_are_named_by_alias():
    names = parsing._fields(MIIConfig)
    assert "model_config" in names and "model_conf" not in names
    assert {"port_number", "deployment_name", "auth_token"} <= names
    assert None not in names
    assert parsing._fields(ModelConfig) == set(ModelConfig.model_fields)


def test_unknown_argument_suggests_at_most_three_close_names():
    error = unknown_argument("abcd", ["abcf", "abce", "abcg", "abch", "zzzz"], "thing")
    assert isinstance(error, UnknownArgument)
    assert str(error) == ("Keyword argument 'abcd' not recognized as a thing; "
                          "did you mean 'abch' or 'abcg' or 'abcf'?")


def test_unknown_argument_without_a_close_name_has_no_hint():
    assert str(unknown_argument("qqq", ["tensor_parallel", "replica_num"], "ModelConfig field")) \
        == "Keyword argument 'qqq' not recognized as a ModelConfig field"
    # similarity 0.43 (< the 0.6 cutoff): no suggestion either
    assert "did you mean" not in str(unknown_argument("abcdefg", ["abcxyzw"], "x"))
    assert "did you mean 'abcdefx'" in str(unknown_argument("abcdefg", ["abcdefx"], "x"))


@pytest.mark.parametrize("call, error, message", [
    (lambda: parse_generate_kwargs({"top_p": 2}), InvalidGenerateParams,
     "top_p: Input should be less than or equal to 1 (got 2)"),
    (lambda: parse_generate_kwargs({"min_new_tokens": 9, "max_new_tokens": 3}),
     InvalidGenerateParams, "(config): min_new_tokens (9) must not exceed max_new_tokens (3)"),
    (lambda: parse_generate_kwargs({"top_k": 0, "temperature": 0}), InvalidGenerateParams,
     "top_k: Input should be greater than 0 (got 0); "
     "temperature: Input should be greater than 0 (got 0)"),
    (lambda: parse_serve_kwargs("m", port_number=0), ConfigError,
     "port_number: Input should be greater than or equal to 1 (got 0)"),
    (lambda: parse_serve_kwargs("m", replica_configs=[{"hostname": 1}]), ConfigError,
     "replica_configs.0.hostname: Input should be a valid string (got 1)"),
    (lambda: parse_serve_kwargs("m", inference_engine_config=5), ConfigError,
     "inference_engine_config: Input should be a valid dictionary (got 5)"),
    (lambda: parse_serve_kwargs("m", tls_cert_file="a"), ConfigError,
     "(config): tls_cert_file and tls_key_file must be given together"),
])
def test_validation_errors_are_one_readable_line_per_field(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert str(caught.value) == message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_dict_input_is_not_repeated_in_the_message():
    with pytest.raises(ConfigError) as caught:
        parse_serve_kwargs("m", device_map={"h": "x"})
    first = str(caught.value).split("; ")[0]
    assert first == "device_map.literal['auto']: Input should be 'auto'"  # no "(got {...})"


def test_describe_validation_error_prefix():
    with pytest.raises(Exception) as caught:
        GenerateParamsConfig(top_p=5)
    assert parsing.describe_validation_error(caught.value, "params.") == \
        "params.top_p: Input should be less than or equal to 1 (got 5)"


def test_same_value_twice_is_accepted_and_keys_land_where_they_belong():
    config = parse_serve_kwargs("m", model_config={"model_name_or_path": "m", "replica_num": 2},
                                mii_config={"port_number": 1234, "max_restarts": 5},
                                replica_num=2, port_number=1234, dtype="fp16", host="0.0.0.0")
    assert config.model_conf.model_name_or_path == "m" and config.model_conf.replica_num == 2
    assert config.model_conf.dtype == "fp16"
    assert (config.port_number, config.max_restarts, config.host) == (1234, 5, "0.0.0.0")


def test_equal_values_twice_are_accepted_even_as_distinct_objects():
    config = parse_serve_kwargs("m", model_config={"inference_engine_config": {"a": [1]}},
                                inference_engine_config={"a": [1]},
                                mii_config={"auth_token": "".join(["to", "ken"])},
                                auth_token="token")
    assert config.model_conf.inference_engine_config == {"a": [1]}
    assert config.auth_token == "token"


def test_a_misspelt_keyword_is_matched_against_both_configs():
    with pytest.raises(UnknownArgument, match="did you mean 'port_number'"):
        parse_serve_kwargs("m", port_numbr=1)  # a MIIConfig field
    with pytest.raises(UnknownArgument, match="did you mean 'tensor_parallel'"):
        parse_serve_kwargs("m", tensor_paralel=1)  # a ModelConfig field


def test_key_twice_with_different_values_names_both_places():
    with pytest.raises(ConfigError) as caught:
        parse_serve_kwargs("m", mii_config={"port_number": 1}, port_number=2)
    assert str(caught.value) == ("port_number given twice with different values: 1 in "
                                 "mii_config and 2 as a keyword argument")
    with pytest.raises(ConfigError, match=r"replica_num given twice.*3 in "
                                          r"mii_config\['model_config'\] and 4"):
        parse_serve_kwargs("m", mii_config={"model_config": {"replica_num": 3}},
                           model_config={"replica_num": 4})


@pytest.mark.parametrize("argument", ["mii_config", "model_config"])
@pytest.mark.parametrize("value, kind", [([("a", 1)], "list"), ("x", "str"), (3, "int")])
def test_config_arguments_must_be_mappings(argument, value, kind):
    with pytest.raises(ConfigError) as caught:
        parse_serve_kwargs("m", **{argument: value})
    assert str(caught.value) == f"{argument} must be a dict, got {kind}"


def test_mappings_that_are_not_dicts_and_empty_ones_are_accepted():
    from types import MappingProxyType

    config = parse_serve_kwargs("m", model_config=MappingProxyType({"replica_num": 2}),
                                mii_config=MappingProxyType({"port_number": 4321}))
    assert config.model_conf.replica_num == 2 and config.port_number == 4321
    assert parse_serve_kwargs("m", model_config={}, mii_config={}).model_conf.replica_num == 1


def test_a_model_config_object_inside_mii_config_is_used():
    nested = ModelConfig(model_name_or_path="org/model", replica_num=2)
    config = parse_serve_kwargs(mii_config={"model_config": nested}, port_number=4000)
    assert config.model_conf == nested and config.port_number == 4000
    assert config.deployment_name == "org/model-mii-deployment"


def test_the_positional_model_name_is_used_and_checked():
    assert parse_serve_kwargs("org/m").model_conf.model_name_or_path == "org/m"
    assert parse_serve_kwargs("", model_config={"model_name_or_path": "x"}) \
        .model_conf.model_name_or_path == "x"
    with pytest.raises(ConfigError) as caught:
        parse_serve_kwargs("", model_config={"replica_num": 1})
    assert str(caught.value) == "model_name_or_path: a model name or path must be given"


def test_unknown_keys_are_refused_in_each_place_with_what_they_were_checked_against():
    with pytest.raises(UnknownArgument, match=r"'bogus' not recognized as a ModelConfig field$"):
        parse_serve_kwargs("m", model_config={"bogus": 1})
    with pytest.raises(UnknownArgument, match=r"'bogus' not recognized as a MIIConfig field$"):
        parse_serve_kwargs("m", mii_config={"bogus": 1})
    with pytest.raises(UnknownArgument,
                       match=r"'bogus' not recognized as a ModelConfig or MIIConfig field$"):
        parse_serve_kwargs("m", bogus=1)
    # MIIConfig keys do not belong in model_config, nor ModelConfig keys in mii_config
    with pytest.raises(UnknownArgument, match="'port_number'.*ModelConfig field"):
        parse_serve_kwargs("m", model_config={"port_number": 1})
    with pytest.raises(UnknownArgument, match="'replica_num'.*MIIConfig field"):
        parse_serve_kwargs("m", mii_config={"replica_num": 1})
    with pytest.raises(UnknownArgument, match="'model_conf' not recognized"):
        parse_serve_kwargs("m", mii_config={"model_config": {"model_name_or_path": "m"}},
                           **{"model_conf": {}})


def test_pipeline_accepts_model_config_fields_only():
    model = parse_pipeline_kwargs("m", model_config={"replica_num": 2}, dtype="bf16")
    assert isinstance(model, ModelConfig)
    assert (model.model_name_or_path, model.replica_num, model.dtype) == ("m", 2, "bf16")
    with pytest.raises(UnknownArgument) as caught:
        parse_pipeline_kwargs("m", port_number=1)
    assert str(caught.value).startswith(
        "Keyword argument 'port_number' not recognized as a ModelConfig field")


def test_generate_kwargs_are_validated_into_a_config():
    params = parse_generate_kwargs({"max_new_tokens": 5, "stop": "x", "do_sample": False})
    assert isinstance(params, GenerateParamsConfig)
    assert (params.max_new_tokens, params.stop, params.do_sample) == (5, ["x"], False)
    assert parse_generate_kwargs({}) == GenerateParamsConfig()
    with pytest.raises(UnknownArgument, match="not recognized as a generate parameter"):
        parse_generate_kwargs({"prompt_length": 1})


def test_prompts_one_string_or_a_list_or_tuple_of_strings():
    assert check_prompts("hi") == ["hi"]
    assert check_prompts(["a", "b"]) == ["a", "b"]
    got = check_prompts(("a", "b"))
    assert got == ["a", "b"] and isinstance(got, list)
    with pytest.raises(InvalidGenerateParams) as caught:
        check_prompts({"a"})
    assert str(caught.value) == "prompts: expected a string or a list of strings, got set"
    with pytest.raises(InvalidGenerateParams) as caught:
        check_prompts(())
    assert str(caught.value) == "prompts: the list of prompts is empty"
    with pytest.raises(InvalidGenerateParams) as caught:
        check_prompts(["ok", b"bytes"])
    assert str(caught.value) == "prompts[1]: expected a string, got bytes"
    with pytest.raises(InvalidGenerateParams) as caught:
        check_prompts(["ok", "fine", ""])
    assert str(caught.value) == "prompts[2]: the prompt is empty"


def test_prompts_must_be_encodable_as_utf8():
    with pytest.raises(InvalidGenerateParams) as caught:
        check_prompts(["fine", "ab\ud800"])
    assert str(caught.value) == ("prompts[1]: not encodable as UTF-8 (surrogates not allowed "
                                 "at position 2)")
    assert caught.value.__suppress_context__
