"""The configuration models (``mii_core/config/models.py``): every default, every bound at
its edge, the validators and the derived values (written from mutation testing:
tools/mutation.py)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mii_core.config.models import (
    DTYPES,
    GenerateParamsConfig,
    MIIConfig,
    ModelConfig,
    ReplicaConfig,
    default_deployment_name,
)
from mii_core.constants import DeploymentType, TaskType

GENERATE_DEFAULTS = {
    "prompt_length": 0, "max_length": None, "max_new_tokens": None, "min_new_tokens": 0,
    "stream": False, "ignore_eos": False, "return_full_text": False, "do_sample": True,
    "top_p": 0.9, "top_k": None, "temperature": None, "stop": [],
}
MODEL_DEFAULTS = {
    "tokenizer": "m", "task": TaskType.TEXT_GENERATION, "tensor_parallel": 1,
    "quantization_mode": None, "inference_engine_config": {}, "torch_dist_port": 29500,
    "zmq_port_number": 25555, "replica_num": 1, "replica_configs": [], "device_map": "auto",
    "max_length": None, "dtype": "auto", "sync_debug": False, "profile_model_time": False,
    "engine": "auto", "kv_cache": "auto", "cuda_graphs": True, "torch_compile": None,
    "gpu_memory_utilization": 0.9, "kv_block_size": 16, "kv_blocks": None,
    "prefix_caching": True, "max_batch_size": None, "prefill_chunk_tokens": None,
}
MII_DEFAULTS = {
    "deployment_name": "m-mii-deployment", "deployment_type": DeploymentType.LOCAL,
    "port_number": 50050, "enable_restful_api": False, "restful_api_host": "localhost",
    "restful_api_port": 51080, "restful_processes": 32, "hostfile": "/job/hostfile",
    "scheduler": "round_robin", "transport": "grpc", "host": "127.0.0.1",
    "startup_timeout": 600.0, "max_queue_size": 1024, "auth_token": None,
    "tls_cert_file": None, "tls_key_file": None, "version": 1,
    "instance_type": "Standard_NC12s_v3", "max_restarts": 3,
    "max_request_bytes": 8 * 2 ** 20, "max_prompts_per_request": 1024,
}
REPLICA_DEFAULTS = {"hostname": "", "tensor_parallel_ports": [], "torch_dist_port": None,
                    "gpu_indices": [], "zmq_port": None}


def subset(dump, expected):
    return {key: dump[key] for key in expected}


def test_every_default():
    assert subset(GenerateParamsConfig().model_dump(), GENERATE_DEFAULTS) == GENERATE_DEFAULTS
    model = ModelConfig(model_name_or_path="m")
    assert subset(model.model_dump(), MODEL_DEFAULTS) == MODEL_DEFAULTS
    mii = MIIConfig(model_config=model)
    assert subset(mii.model_dump(), MII_DEFAULTS) == MII_DEFAULTS
    assert subset(ReplicaConfig().model_dump(), REPLICA_DEFAULTS) == REPLICA_DEFAULTS


# (model, field, the last accepted value, the first refused value) on each side of a bound
EDGES = [
    (GenerateParamsConfig, "prompt_length", 0, -1),
    (GenerateParamsConfig, "max_length", 1, 0),
    (GenerateParamsConfig, "max_new_tokens", 1, 0),
    (GenerateParamsConfig, "min_new_tokens", 0, -1),
    (GenerateParamsConfig, "top_p", 1.0, 1.0001),
    (GenerateParamsConfig, "top_p", 1e-6, 0.0),
    (GenerateParamsConfig, "top_k", 1, 0),
    (GenerateParamsConfig, "temperature", 1e-6, 0.0),
    (GenerateParamsConfig, "max_length", 2 ** 63 - 1, 2 ** 63),
    (GenerateParamsConfig, "max_new_tokens", 2 ** 63 - 1, 2 ** 63),
    (GenerateParamsConfig, "min_new_tokens", 2 ** 63 - 1, 2 ** 63),
    (GenerateParamsConfig, "top_k", 2 ** 63 - 1, 2 ** 63),
    (GenerateParamsConfig, "seed", 2 ** 63 - 1, 2 ** 63),
    (GenerateParamsConfig, "seed", 0, -1),
    (GenerateParamsConfig, "temperature", 1e300, float("inf")),
    (ModelConfig, "tensor_parallel", 1, 0),
    (ModelConfig, "torch_dist_port", 1, 0),
    (ModelConfig, "torch_dist_port", 65535, 65536),
    (ModelConfig, "zmq_port_number", 1, 0),
    (ModelConfig, "zmq_port_number", 65535, 65536),
    (ModelConfig, "replica_num", 1, 0),
    (ModelConfig, "max_length", 1, 0),
    (ModelConfig, "gpu_memory_utilization", 1.0, 1.0001),
    (ModelConfig, "gpu_memory_utilization", 1e-6, 0.0),
    (ModelConfig, "kv_blocks", 4, 3),
    (ModelConfig, "max_batch_size", 1, 0),
    (ModelConfig, "prefill_chunk_tokens", 16, 15),
    (ModelConfig, "prefill_chunk_tokens", 65536, 65537),
    (MIIConfig, "port_number", 1, 0),
    (MIIConfig, "port_number", 65535, 65536),
    (MIIConfig, "restful_api_port", 1, 0),
    (MIIConfig, "restful_api_port", 65535, 65536),
    (MIIConfig, "restful_processes", 1, 0),
    (MIIConfig, "startup_timeout", 1e-6, 0.0),
    (MIIConfig, "max_queue_size", 1, 0),
    (MIIConfig, "max_request_bytes", 1, 0),
    (MIIConfig, "max_request_bytes", 2 ** 30, 2 ** 30 + 1),
    (MIIConfig, "max_prompts_per_request", 1, 0),
    (MIIConfig, "max_prompts_per_request", 2 ** 20, 2 ** 20 + 1),
    (MIIConfig, "max_restarts", 0, -1),
]


def build(model, **fields):
    if model is ModelConfig:
        return ModelConfig(model_name_or_path="m", **fields)
    if model is MIIConfig:
        return MIIConfig(model_config={"model_name_or_path": "m"}, **fields)
    return model(**fields)


@pytest.mark.parametrize("model, field, accepted, refused", EDGES,
                         ids=[f"{m.__name__}.{f}={r}" for m, f, _, r in EDGES])
def test_bounds_at_their_edges(model, field, accepted, refused):
    assert getattr(build(model, **{field: accepted}), field) == accepted
    with pytest.raises(ValidationError) as caught:
        build(model, **{field: refused})
    assert caught.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_kv_block_sizes(size):
    assert ModelConfig(model_name_or_path="m", kv_block_size=size).kv_block_size == size


@pytest.mark.parametrize("size", [4, 9, 12, 15, 17, 33, 63, 65, 128])
def test_other_kv_block_sizes_are_refused(size):
    with pytest.raises(ValidationError, match="kv_block_size"):
        ModelConfig(model_name_or_path="m", kv_block_size=size)


def test_assignment_is_validated_and_unknown_fields_refused():
    params = GenerateParamsConfig()
    with pytest.raises(ValidationError):
        params.top_p = 3
    with pytest.raises(ValidationError, match="extra"):
        GenerateParamsConfig(bogus=1)
    with pytest.raises(ValidationError, match="extra"):
        ModelConfig(model_name_or_path="m", bogus=1)


def test_stop_strings_one_or_many_sorted_none_empty():
    assert GenerateParamsConfig(stop="x").stop == ["x"]
    assert GenerateParamsConfig(stop=["b", "a", "c"]).stop == ["a", "b", "c"]
    assert GenerateParamsConfig(stop=[]).stop == []
    with pytest.raises(ValidationError, match="stop strings must not be empty"):
        GenerateParamsConfig(stop=["a", ""])
    with pytest.raises(ValidationError, match="stop strings must not be empty"):
        GenerateParamsConfig(stop="")


def test_min_new_tokens_may_equal_but_not_exceed_max_new_tokens():
    assert GenerateParamsConfig(min_new_tokens=3, max_new_tokens=3).min_new_tokens == 3
    assert GenerateParamsConfig(min_new_tokens=50).max_new_tokens is None
    with pytest.raises(ValidationError,
                       match=r"min_new_tokens \(4\) must not exceed max_new_tokens \(3\)"):
        GenerateParamsConfig(min_new_tokens=4, max_new_tokens=3)


def test_max_length_must_exceed_the_prompt_length():
    assert GenerateParamsConfig(prompt_length=9, max_length=10).max_length == 10
    assert GenerateParamsConfig(prompt_length=9).max_length is None
    assert GenerateParamsConfig(prompt_length=0, max_length=1).max_length == 1
    for max_length in (9, 5):
        with pytest.raises(ValidationError, match=rf"max_length \({max_length}\) must be "
                                                  r"greater than prompt_length \(9\)"):
            GenerateParamsConfig(prompt_length=9, max_length=max_length)


@pytest.mark.parametrize("fields, prompt, context, budget", [
    ({}, 10, 100, 90),  # the context less the prompt
    ({"max_length": 50}, 10, 100, 40),  # max_length counts the prompt too
    ({"max_length": 500}, 10, 100, 90),  # never beyond the context
    ({"max_new_tokens": 7}, 10, 100, 7),
    ({"max_new_tokens": 95}, 10, 100, 90),
    ({"max_length": 30, "max_new_tokens": 25}, 10, 100, 20),
    ({"max_length": 30, "max_new_tokens": 15}, 10, 100, 15),
])
def test_new_token_budget(fields, prompt, context, budget):
    assert GenerateParamsConfig(**fields).new_token_budget(prompt, context) == budget


def test_device_map_shorthands_and_refusals():
    def device_map(value):
        return ModelConfig(model_name_or_path="m", device_map=value).device_map

    assert device_map(0) == {"localhost": [[0]]}
    assert device_map(3) == {"localhost": [[3]]}
    assert device_map([2, 3]) == {"localhost": [[2, 3]]}
    assert device_map([[0, 1], [2]]) == {"localhost": [[0, 1], [2]]}
    assert device_map({"h": [[0]]}) == {"h": [[0]]}
    assert device_map({}) == {}  # a mapping is taken as it is
    assert device_map("auto") == "auto"
    for bad in (True, False, [], [0, [1]], [[0], 1], "gpu0"):
        with pytest.raises(ValidationError, match="device_map"):
            device_map(bad)


def test_bool_device_map_names_the_accepted_forms():
    with pytest.raises(ValidationError, match=r"device_map must be 'auto', a device id, a "
                                              r"list of ids, or \{host: \[\[ids of replica"):
        ModelConfig(model_name_or_path="m", device_map=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_known_dtypes(dtype):
    assert ModelConfig(model_name_or_path="m", dtype=dtype).dtype == dtype


def test_unknown_dtype_lists_the_known_ones():
    assert DTYPES == ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
    with pytest.raises(ValidationError, match="dtype must be one of auto, float32, fp32, "
                                              "float16, fp16, bfloat16, bf16"):
        ModelConfig(model_name_or_path="m", dtype="int8")


def test_model_name_must_be_given():
    with pytest.raises(ValidationError, match="model_name_or_path must be provided"):
        ModelConfig(model_name_or_path="")


def test_tokenizer_defaults_to_the_model_unless_given():
    assert ModelConfig(model_name_or_path="org/m").tokenizer == "org/m"
    assert ModelConfig(model_name_or_path="org/m", tokenizer="").tokenizer == "org/m"
    assert ModelConfig(model_name_or_path="org/m", tokenizer="org/t").tokenizer == "org/t"


def test_replica_configs_must_match_replica_num():
    two = [ReplicaConfig(hostname="a"), ReplicaConfig(hostname="b")]
    assert len(ModelConfig(model_name_or_path="m", replica_num=2,
                           replica_configs=two).replica_configs) == 2
    with pytest.raises(ValidationError, match="replica_configs has 2 entries but "
                                              "replica_num is 3; they must match"):
        ModelConfig(model_name_or_path="m", replica_num=3, replica_configs=two)
    with pytest.raises(ValidationError, match="replica_configs has 2 entries but replica_num is 1"):
        ModelConfig(model_name_or_path="m", replica_configs=two)


def test_default_deployment_name(tmp_path):
    assert default_deployment_name("org/model") == "org/model-mii-deployment"
    assert default_deployment_name("org/model/") == "org/model-mii-deployment"
    local = tmp_path / "my-model"
    local.mkdir()
    assert default_deployment_name(str(local)) == "my-model-mii-deployment"
    assert default_deployment_name(f"{local}/") == "my-model-mii-deployment"


def test_deployment_name_given_or_derived():
    derived = MIIConfig(model_config={"model_name_or_path": "org/x"})
    assert derived.deployment_name == "org/x-mii-deployment"
    given = MIIConfig(model_config={"model_name_or_path": "org/x"}, deployment_name="mine")
    assert given.deployment_name == "mine"


def test_tls_files_go_together():
    both = MIIConfig(model_config={"model_name_or_path": "m"}, tls_cert_file="c",
                     tls_key_file="k")
    assert (both.tls_cert_file, both.tls_key_file) == ("c", "k")
    for one in ({"tls_cert_file": "c"}, {"tls_key_file": "k"}):
        with pytest.raises(ValidationError, match="must be given together"):
            MIIConfig(model_config={"model_name_or_path": "m"}, **one)


@pytest.mark.parametrize("kind", ["aml", "non-persistent"])
def test_only_local_deployments(kind):
    with pytest.raises(ValidationError, match=rf"deployment_type '{kind}' is not supported; "
                                              "use 'local'"):
        MIIConfig(model_config={"model_name_or_path": "m"}, deployment_type=kind)
    assert MIIConfig(model_config={"model_name_or_path": "m"},
                     deployment_type="local").deployment_type == DeploymentType.LOCAL


def test_to_json_uses_the_alias_and_round_trips():
    config = MIIConfig(model_config={"model_name_or_path": "m", "replica_num": 2},
                       port_number=1234, auth_token="t")
    data = json.loads(config.to_json())
    assert "model_config" in data and "model_conf" not in data
    assert data["model_config"]["replica_num"] == 2 and data["port_number"] == 1234
    assert MIIConfig.model_validate_json(config.to_json()) == config
    assert MIIConfig(model_conf={"model_name_or_path": "m"}).model_conf.model_name_or_path == "m"


def test_generate_replica_configs_from_a_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=4\n")
    config = MIIConfig(model_config={"model_name_or_path": "m", "tensor_parallel": 2,
                                     "replica_num": 2}, hostfile=str(hostfile),
                       port_number=50050)
    config.generate_replica_configs()
    replicas = [r.model_dump() for r in config.model_conf.replica_configs]
    assert replicas == [
        {"hostname": "localhost", "tensor_parallel_ports": [50051, 50052],
         "torch_dist_port": 29500, "gpu_indices": [0, 1], "zmq_port": 25555},
        {"hostname": "localhost", "tensor_parallel_ports": [50053, 50054],
         "torch_dist_port": 29600, "gpu_indices": [2, 3], "zmq_port": 25556},
    ]


def test_generate_replica_configs_three_single_device_replicas(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=3\n")
    config = MIIConfig(model_config={"model_name_or_path": "m", "replica_num": 3,
                                     "torch_dist_port": 30000, "zmq_port_number": 40000},
                       hostfile=str(hostfile), port_number=6000)
    config.generate_replica_configs()
    replicas = config.model_conf.replica_configs
    assert [r.tensor_parallel_ports for r in replicas] == [[6001], [6002], [6003]]
    assert [r.torch_dist_port for r in replicas] == [30000, 30100, 30200]
    assert [r.zmq_port for r in replicas] == [40000, 40001, 40002]
    assert [r.gpu_indices for r in replicas] == [[0], [1], [2]]


def test_generate_replica_configs_keeps_given_ones(tmp_path):
    given = [ReplicaConfig(hostname="h", tensor_parallel_ports=[1])]
    config = MIIConfig(model_config={"model_name_or_path": "m", "replica_configs": given},
                       hostfile=str(tmp_path / "none"))
    config.generate_replica_configs()
    assert config.model_conf.replica_configs == given
