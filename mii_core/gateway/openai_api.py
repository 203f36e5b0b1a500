"""Translation between OpenAI's completions / chat completions wire format and mii's
generate parameters and Responses. Pure functions: no I/O, no model.

Parameter mapping (OpenAI -> mii): ``max_tokens`` / ``max_completion_tokens`` ->
``max_new_tokens``; ``temperature`` 0 -> ``do_sample=False`` (greedy), otherwise
``temperature``; ``top_p`` (default 1.0, as OpenAI); ``stop``; ``seed``; extensions
``top_k``, ``min_tokens`` -> ``min_new_tokens``, ``ignore_eos``. ``max_length`` is
set to the model's context length so that only ``max_tokens`` limits generation.
Fields OpenAI defines that have no mii equivalent are accepted only with their no-op
value (``n=1``, penalties 0, no logprobs, ...); anything else is a 400 naming it.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from mii_core.api.response import Response

# mii parameter name -> the OpenAI name a user wrote, for error messages.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# Unbounded by default: the replica caps generation at the model's context length.
NO_LENGTH_LIMIT = 2 ** 62


class RequestError(Exception):
    """A request the gateway refuses: HTTP status, message, OpenAI error type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> RequestError:
    """A 400 naming ``param``."""
    return RequestError(400, f"{param}: {message}" if param else message, param=param, code=code)


def _is_noop_logprobs(value: Any) -> bool:
    return value is None or value is False or value == 0


_NOOP: Dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "best_of": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "logit_bias": lambda v: v is None or v == {},
    "logprobs": _is_noop_logprobs,
    "top_logprobs": lambda v: v is None or v == 0,
    "suffix": lambda v: v is None or v == "",
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v is None or v is False,
    "user": lambda v: v is None or isinstance(v, str),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "service_tier": lambda v: v is None or v in ("auto", "default"),
}
_WHY = {"n": "only n=1 is supported", "best_of": "only best_of=1 is supported",
        "logprobs": "logprobs are not supported",
        "top_logprobs": "logprobs are not supported", "suffix": "suffix is not supported",
        "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
        "functions": "function calling is not supported",
        "function_call": "function calling is not supported",
        "response_format": "only response_format {'type': 'text'} is supported"}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop",
           "top_k", "min_tokens", "ignore_eos", "seed"} | set(_NOOP)
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}


def _number(body: Dict[str, Any], name: str, low: float, high: float) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"expected a number, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise bad(f"must be between {low:g} and {high:g} (got {value!r})", name)
    return float(value)


def _integer(body: Dict[str, Any], name: str, low: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"expected an integer, got {type(value).__name__}", name)
    if value < low:
        raise bad(f"must be at least {low} (got {value!r})", name)
    return value


def flag(body: Dict[str, Any], name: str) -> bool:
    """A boolean field (absent or null: False)."""
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"expected a boolean, got {type(value).__name__}", name)
    return value


def check_fields(body: Any, allowed: set, what: str) -> Dict[str, Any]:
    """The body as a dict with only known fields, each no-op-only field at a no-op value."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for key in body:
        if key not in allowed:
            raise bad(f"unknown parameter for {what}", key, code="unknown_parameter")
    for key, is_noop in _NOOP.items():
        if key in body and not is_noop(body[key]):
            raise bad(f"{_WHY.get(key, 'only its default value is supported')} "
                      f"(got {body[key]!r})", key, code="unsupported_parameter")
    if not isinstance(body.get("model"), str) or not body.get("model"):
        raise bad("a model name is required (see GET /v1/models)", "model")
    return body


def generate_kwargs(body: Dict[str, Any], chat: bool, max_length: Optional[int]) -> Dict[str, Any]:
    """mii generate keyword arguments for an OpenAI request body (already field-checked)."""
    kwargs: Dict[str, Any] = {"max_length": max_length or NO_LENGTH_LIMIT}
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        max_tokens = max_tokens or _integer(body, name, 1)
    if max_tokens is None and not chat:
        max_tokens = 16  # OpenAI's default for completions; chat has none
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if temperature == 0.0:
        kwargs["do_sample"] = False
    else:
        kwargs["do_sample"] = True
        if temperature is not None:
            kwargs["temperature"] = temperature
        kwargs["top_p"] = 1.0 if top_p is None else top_p
    top_k = _integer(body, "top_k", 0)
    if top_k:  # 0 (and -1 in some clients' conventions is refused above) means no top-k
        kwargs["top_k"] = top_k
    seed = _integer(body, "seed", 0)
    if seed is not None:
        kwargs["seed"] = seed
    min_tokens = _integer(body, "min_tokens", 0)
    if min_tokens:
        kwargs["min_new_tokens"] = min_tokens
    if flag(body, "ignore_eos"):
        kwargs["ignore_eos"] = True
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("expected a string or a list of strings", "stop")
        if len(stop) > 4:
            raise bad(f"at most 4 stop sequences are allowed (got {len(stop)})", "stop")
        if stop:
            kwargs["stop"] = stop
    return kwargs


def stream_options(body: Dict[str, Any]) -> Tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("only {'include_usage': bool} is supported", "stream_options")
    return stream, bool(options.get("include_usage", False))


def completion_prompts(body: Dict[str, Any]) -> List[str]:
    """The prompts of a completions request (text only)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("a prompt is required", "prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise bad("expected a string or a non-empty list of strings", "prompt")
    for index, item in enumerate(prompts):
        where = "prompt" if isinstance(prompt, str) else f"prompt[{index}]"
        if not isinstance(item, str):
            raise bad("token-id prompts are not supported; send text" if isinstance(
                item, (int, list)) else f"expected a string, got {type(item).__name__}", where)
        if not item:
            raise bad("the prompt is empty", where)
    return prompts


def chat_messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    """The conversation as [{'role', 'content'}] with text content (parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("expected a non-empty list of messages", "messages")
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad(f"expected an object, got {type(message).__name__}", where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"unknown role {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise bad("only text content parts are supported",
                              f"{where}.content[{part_index}]")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"expected a string, got {type(content).__name__}", f"{where}.content")
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return result


def rename_params(message: str) -> str:
    """Rewrite mii parameter names in an error message to the OpenAI names."""
    for mii_name, openai_name in OPENAI_NAMES.items():
        message = re.sub(rf"\b{mii_name}\b", openai_name, message)
    return message


def param_of(message: str, chat: bool) -> Optional[str]:
    """The OpenAI parameter an (already renamed) mii error message names, if any."""
    match = re.match(r"([A-Za-z_][\w.]*)(\[\d+\])?:", message)
    if match is None:
        match = re.match(r"Keyword argument '([^']+)'", message)
        return match.group(1) if match else None
    name = match.group(1)
    if name == "prompts":
        return "messages" if chat else "prompt"
    return None if name.startswith("(") else name


def new_id(chat: bool) -> str:
    """A fresh completion id."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> Optional[str]:
    """mii finish reason -> OpenAI's (None while streaming)."""
    return None if reason in ("", "none") else reason


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(responses: List[Response], model: str, prompts: List[str],
                    echo: bool) -> Dict[str, Any]:
    """A whole ``text_completion`` object."""
    choices = [{"index": i, "text": (prompts[i] if echo else "") + r.generated_text,
                "logprobs": None, "finish_reason": finish_reason(r.finish_reason)}
               for i, r in enumerate(responses)]
    return {"id": new_id(False), "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None, "choices": choices,
            "usage": usage(sum(r.prompt_length for r in responses),
                           sum(r.generated_length for r in responses))}


def chat_body(response: Response, model: str) -> Dict[str, Any]:
    """A whole ``chat.completion`` object."""
    return {"id": new_id(True), "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": response.generated_text},
                         "logprobs": None, "finish_reason": finish_reason(response.finish_reason)}],
            "usage": usage(response.prompt_length, response.generated_length)}


class StreamFormatter:
    """Turns mii stream chunks into OpenAI stream chunk objects."""

    def __init__(self, model: str, chat: bool, prompts: List[str], echo: bool = False) -> None:
        self.model = model
        self.chat = chat
        self.prompts = prompts
        self.echo = echo
        self.id = new_id(chat)
        self.created = int(time.time())
        self.started: set = set()
        self.prompt_tokens: Dict[int, int] = {}
        self.completion_tokens: Dict[int, int] = {}

    def _chunk(self, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else
                "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunks(self, response: Response) -> List[Dict[str, Any]]:
        """The chunk objects to send for one mii stream chunk."""
        index = response.index
        reason = finish_reason(response.finish_reason)
        self.prompt_tokens[index] = response.prompt_length
        self.completion_tokens[index] = response.generated_length
        out = []
        if index not in self.started:
            self.started.add(index)
            if self.chat:
                out.append(self._chunk([{"index": index, "delta": {"role": "assistant",
                                                                   "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            elif self.echo:
                out.append(self._chunk([{"index": index, "text": self.prompts[index],
                                         "logprobs": None, "finish_reason": None}]))
        if response.generated_text or reason is not None:
            if self.chat:
                delta = {"content": response.generated_text} if response.generated_text else {}
                choice = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": response.generated_text}
            choice.update(logprobs=None, finish_reason=reason)
            out.append(self._chunk([choice]))
        return out

    def usage_chunk(self) -> Dict[str, Any]:
        """The final chunk of ``stream_options.include_usage``."""
        chunk = self._chunk([])
        chunk["usage"] = usage(sum(self.prompt_tokens.values()),
                               sum(self.completion_tokens.values()))
        return chunk
