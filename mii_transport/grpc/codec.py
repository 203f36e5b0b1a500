"""Conversions between mii's Python objects and the protobuf messages."""
from __future__ import annotations

from typing import Iterable, List

from mii_core.api.response import Response
from mii_core.config.kwargs import parse_generate_kwargs
from mii_core.config.models import GenerateParamsConfig
from mii_transport.grpc.generated import mii_pb2

_SCALARS = ("max_length", "max_new_tokens", "min_new_tokens", "ignore_eos", "return_full_text",
            "do_sample", "top_p", "top_k", "temperature", "stream", "seed")


def params_to_proto(params: GenerateParamsConfig) -> mii_pb2.GenerateParams:
    """Only fields the caller set travel, so server-side defaults stay authoritative."""
    message = mii_pb2.GenerateParams()
    for name in params.model_fields_set:
        if name in _SCALARS and getattr(params, name) is not None:
            setattr(message, name, getattr(params, name))
    message.stop.extend(params.stop)
    return message


def params_from_proto(message: mii_pb2.GenerateParams) -> GenerateParamsConfig:
    """Validate received parameters exactly as the client did (raises InvalidGenerateParams)."""
    fields = {name: getattr(message, name) for name in _SCALARS if message.HasField(name)}
    if message.stop:
        fields["stop"] = list(message.stop)
    return parse_generate_kwargs(fields)


def request_to_proto(prompts: List[str], params: GenerateParamsConfig) -> mii_pb2.GenerateRequest:
    """Build a GenerateRequest."""
    return mii_pb2.GenerateRequest(prompts=prompts, params=params_to_proto(params))


def responses_from_reply(reply: mii_pb2.GenerateReply) -> List[Response]:
    """Unary reply -> one Response per prompt, in prompt order."""
    ordered = sorted(reply.completions, key=lambda c: c.index)
    return [completion_to_response(c, reply.replica) for c in ordered]


def completion_to_response(completion: mii_pb2.Completion, replica: int) -> Response:
    """One Completion message -> Response."""
    return Response(
        generated_text=completion.text, prompt_length=completion.prompt_tokens,
        generated_length=completion.generated_tokens,
        finish_reason=completion.finish_reason or "none", index=completion.index,
        replica=replica,
        time_to_first_token_s=completion.time_to_first_token_s or None,
        total_time_s=completion.total_time_s or None)


def completions(items: Iterable[dict]) -> List[mii_pb2.Completion]:
    """Completion messages from plain dicts with the message's field names."""
    return [mii_pb2.Completion(**item) for item in items]
