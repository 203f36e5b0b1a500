"""Hostile input, table-driven: every case gets a precise error and the deployment keeps serving."""
from __future__ import annotations

import grpc
import pytest
from conftest import GREEDY, refused_port

import mii
from mii.errors import (
    ConfigError,
    DeploymentNotFoundError,
    DeploymentUnavailable,
    InvalidGenerateParams,
    PluginError,
    UnknownArgument,
)
from mii_core.config.models import GenerateParamsConfig
from mii_core.deploy import registry
from mii_transport.grpc.codec import request_to_proto

LONG_PROMPT = " ".join(["word"] * 700)  # beyond the tiny model's 512 positions
CONTEXT = 512  # the tiny model's max_position_embeddings


def fills_the_context(replies, deployment):
    (reply,) = replies
    assert reply.finish_reason == "length"
    assert reply.prompt_length + reply.generated_length == CONTEXT


def three_tokens(replies, deployment):
    (reply,) = replies
    assert (reply.generated_length, reply.finish_reason) == (3, "length")
    assert reply.prompt_length >= 1  # whitespace is tokens too


def one_token_each_in_order(replies, deployment):
    expected = deployment("hi", max_new_tokens=1, **GREEDY)[0]
    assert [r.index for r in replies] == list(range(500))
    assert {(r.generated_text, r.generated_length, r.prompt_length) for r in replies} == \
        {(expected.generated_text, 1, expected.prompt_length)}


# (id, generate kwargs, prompts, expected error, message must contain); a case that is
# served has no error, and a check of its replies instead of the message.
GENERATE_CASES = [
    ("max_new_tokens negative", {"max_new_tokens": -1}, "hi", InvalidGenerateParams, "max_new_tokens"),
    ("max_new_tokens zero", {"max_new_tokens": 0}, "hi", InvalidGenerateParams, "max_new_tokens"),
    ("max_new_tokens text", {"max_new_tokens": "ten"}, "hi", InvalidGenerateParams, "max_new_tokens"),
    ("max_new_tokens float", {"max_new_tokens": 1.5}, "hi", InvalidGenerateParams, "max_new_tokens"),
    ("max_new_tokens huge", {"max_new_tokens": 10**12, "max_length": 10**12, **GREEDY},
     LONG_PROMPT[:40], None, fills_the_context),
    ("max_new_tokens beyond int64", {"max_new_tokens": 2**70}, "hi", InvalidGenerateParams,
     "max_new_tokens: Input should be less than or equal to 9223372036854775807"),
    ("temperature infinite", {"temperature": float("inf")}, "hi", InvalidGenerateParams,
     "temperature: Input should be a finite number"),
    ("timeout infinite", {"timeout": float("inf")}, "hi", InvalidGenerateParams, "timeout: "),
    ("timeout 1e10", {"timeout": 1e10}, "hi", InvalidGenerateParams, "timeout: "),
    ("max_length zero", {"max_length": 0}, "hi", InvalidGenerateParams, "max_length"),
    ("max_length negative", {"max_length": -3}, "hi", InvalidGenerateParams, "max_length"),
    ("max_length below prompt", {"max_length": 2}, "a prompt of several tokens",
     InvalidGenerateParams, "max_length=2"),
    ("top_p zero", {"top_p": 0}, "hi", InvalidGenerateParams, "top_p"),
    ("top_p above one", {"top_p": 1.5}, "hi", InvalidGenerateParams, "top_p"),
    ("top_p text", {"top_p": "x"}, "hi", InvalidGenerateParams, "top_p"),
    ("top_k zero", {"top_k": 0}, "hi", InvalidGenerateParams, "top_k"),
    ("top_k negative", {"top_k": -1}, "hi", InvalidGenerateParams, "top_k"),
    ("temperature zero", {"temperature": 0}, "hi", InvalidGenerateParams, "temperature"),
    ("temperature negative", {"temperature": -0.5}, "hi", InvalidGenerateParams, "temperature"),
    ("min_new_tokens negative", {"min_new_tokens": -1}, "hi", InvalidGenerateParams, "min_new_tokens"),
    ("min above max", {"min_new_tokens": 9, "max_new_tokens": 3}, "hi", InvalidGenerateParams,
     "min_new_tokens"),
    ("do_sample not bool", {"do_sample": "maybe"}, "hi", InvalidGenerateParams, "do_sample"),
    ("stop empty string", {"stop": [""]}, "hi", InvalidGenerateParams, "stop"),
    ("stop not a string", {"stop": 5}, "hi", InvalidGenerateParams, "stop"),
    ("stop list of ints", {"stop": [1]}, "hi", InvalidGenerateParams, "stop"),
    ("unknown kwarg", {"bogus": 1}, "hi", UnknownArgument, "bogus"),
    ("misspelled kwarg", {"max_tokens": 5}, "hi", UnknownArgument, "max_new_tokens"),
    ("server-filled kwarg", {"prompt_length": 3}, "hi", UnknownArgument, "prompt_length"),
    ("empty prompt list", {}, [], InvalidGenerateParams, "empty"),
    ("non-string prompt", {}, [1], InvalidGenerateParams, "prompts[0]"),
    ("None prompt", {}, None, InvalidGenerateParams, "prompts"),
    ("empty prompt", {}, [""], InvalidGenerateParams, "prompts[0]: the prompt is empty"),
    ("bytes prompt", {}, [b"bytes"], InvalidGenerateParams, "prompts[0]"),
    ("nested list prompt", {}, [["nested"]], InvalidGenerateParams, "prompts[0]"),
    ("dict prompts", {}, {"a": 1}, InvalidGenerateParams, "prompts"),
    ("second prompt bad", {}, ["ok", 3.5], InvalidGenerateParams, "prompts[1]"),
    ("lone surrogate", {}, ["bad \ud800 text"], InvalidGenerateParams, "UTF-8"),
    ("prompt beyond context", {"max_new_tokens": 4}, LONG_PROMPT, InvalidGenerateParams,
     "the model accepts 512 tokens"),
    ("whitespace prompt (served)", {"max_new_tokens": 3, **GREEDY}, "   ", None, three_tokens),
    ("huge batch (served)", {"max_new_tokens": 1, **GREEDY}, ["hi"] * 500, None,
     one_token_each_in_order),
    ("more prompts than a request may carry", {}, ["hi"] * 1025, InvalidGenerateParams,
     "max_prompts_per_request=1024"),
    ("10 MiB prompt", {}, "x" * (10 * 2**20), InvalidGenerateParams,
     "max_request_bytes=8388608"),
]


@pytest.mark.parametrize("kwargs, prompts, error, match", [c[1:] for c in GENERATE_CASES],
                         ids=[c[0] for c in GENERATE_CASES])
def test_generate_inputs(deployment, kwargs, prompts, error, match):
    if error is None:
        replies = deployment(prompts, **kwargs)
        assert len(replies) == (len(prompts) if isinstance(prompts, list) else 1)
        match(replies, deployment)
    else:
        with pytest.raises(error) as caught:
            deployment(prompts, **kwargs)
        assert match in str(caught.value)
    assert deployment.is_serving()
    assert deployment("DeepSpeed is", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_streaming_fn_with_two_prompts(deployment):
    with pytest.raises(InvalidGenerateParams, match="single prompt"):
        deployment(["a", "b"], streaming_fn=print)


def raw_generate(deployment, body: bytes) -> grpc.RpcError:
    """Send ``body`` as a Generate request to the load balancer, skipping the client's
    checks; the error it answers."""
    with grpc.insecure_channel(f"127.0.0.1:{deployment.port}") as channel:
        call = channel.unary_unary("/mii.MIIService/Generate")
        with pytest.raises(grpc.RpcError) as caught:
            call(body, timeout=30)
    return caught.value


def test_undecodable_bytes_on_the_wire_are_invalid_argument(deployment):
    error = raw_generate(deployment, bytes([0x0A, 0x02, 0xC3, 0x28]))  # prompts[0]: bad UTF-8
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in error.details()
    assert deployment("DeepSpeed is", max_new_tokens=2, **GREEDY)[0].generated_length == 2


def test_the_load_balancer_refuses_too_many_prompts_itself(deployment):
    """A client that skips mii's checks: refused by the load balancer, before a replica
    sees (and would tokenize) the request."""
    body = request_to_proto(["hi"] * 100_000, GenerateParamsConfig()).SerializeToString()

    def outcomes():  # of each replica: requests ok, cancelled, rejected (refused), error
        return [r["stats"]["metrics"]["requests_total"] for r in deployment.info()["replicas"]]

    before = outcomes()
    error = raw_generate(deployment, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000 prompts in one request" in error.details()
    assert "max_prompts_per_request=1024" in error.details()
    assert outcomes() == before


SERVE_CASES = [
    ("missing model path", {"model_name_or_path": "/nonexistent/model"}, ConfigError, "does not exist"),
    ("replica_num zero", {"replica_num": 0}, ConfigError, "replica_num"),
    ("tensor_parallel zero", {"tensor_parallel": 0}, ConfigError, "tensor_parallel"),
    ("tensor_parallel text", {"tensor_parallel": "two"}, ConfigError, "tensor_parallel"),
    ("tp not dividing heads", {"tensor_parallel": 3, "engine": "deepspeed"}, ConfigError,
     "tensor_parallel (3) does not divide"),
    ("device_map nonsense", {"device_map": "gpu0"}, ConfigError, "device_map"),
    ("device_map without GPUs", {"device_map": {"localhost": [[0]]}}, ConfigError,
     "no GPU is visible"),
    ("port zero", {"port_number": 0}, ConfigError, "port_number"),
    ("port too large", {"port_number": 70000}, ConfigError, "port_number"),
    ("unknown engine", {"engine": "nope"}, PluginError, "installed engines"),
    ("unknown scheduler", {"scheduler": "nope"}, PluginError, "round_robin"),
    ("bad dtype", {"dtype": "float8"}, ConfigError, "dtype"),
    ("unknown serve kwarg", {"replicas": 2}, UnknownArgument, "replica_num"),
    ("reserved engine option", {"engine": "deepspeed",
                                "inference_engine_config": {"dtype": "fp16"}}, ConfigError, "dtype"),
    ("tokenizer path missing", {"tokenizer": "/nonexistent/tokenizer"}, ConfigError,
     "tokenizer: /nonexistent/tokenizer does not exist", None),
    ("quantization_mode", {"quantization_mode": "wf6af16", "engine": "transformers"}, ConfigError,
     "quantization_mode 'wf6af16' is not supported by the transformers engine", None),
    ("quantization_mode deepspeed", {"quantization_mode": "wf6af16", "engine": "deepspeed"},
     ConfigError, "quantization_mode 'wf6af16' is not supported", None),
    ("max_length above the model's", {"max_length": 4096, "engine": "transformers"},
     ConfigError, "max_length (4096) exceeds the model's max_position_embeddings", None),
]


def serve_case(case):
    """A SERVE_CASES entry as a pytest param; a fifth item names a source bug (strict xfail)."""
    name, kwargs, error, match, *bug = case
    marks = [pytest.mark.xfail(strict=True, reason=bug[0])] if bug and bug[0] else []
    return pytest.param(kwargs, error, match, id=name, marks=marks)


@pytest.mark.parametrize("kwargs, error, match", [serve_case(c) for c in SERVE_CASES])
def test_serve_inputs(tiny_model, kwargs, error, match, no_process_started):
    """Refused before any process starts (``no_process_started`` fails the test if one does)."""
    kwargs = {"model_name_or_path": tiny_model, "deployment_name": "bad-serve", **kwargs}
    with pytest.raises(error) as caught:
        mii.serve(**kwargs)
    assert match in str(caught.value)
    assert registry.load("bad-serve") is None


def test_model_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="not a model directory"):
        mii.serve(str(tmp_path))


def test_unknown_deployment_name():
    with pytest.raises(DeploymentNotFoundError, match="no running deployment named 'nobody'"):
        mii.client("nobody")


def test_wrong_port():
    with refused_port() as port:
        with pytest.raises(DeploymentUnavailable, match="not reachable"):
            mii.client(f"127.0.0.1:{port}")


def test_corrupted_registry_file():
    registry.record_path("corrupt").write_text("{not json")
    try:
        with pytest.raises(DeploymentNotFoundError, match="unreadable"):
            mii.client("corrupt")
    finally:
        registry.remove("corrupt")
