"""Turning ``serve(...)`` and ``generate(...)`` keyword arguments into validated configs.

Every error names the offending key: unknown keys suggest close matches, a key
given twice with different values is refused, and pydantic's validation errors
are rewritten as one readable line per field.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Optional

from pydantic import BaseModel, ValidationError

from mii_core.config.models import GenerateParamsConfig, MIIConfig, ModelConfig
from mii_core.constants import MAX_TIMEOUT_S
from mii_core.errors import ConfigError, InvalidGenerateParams, UnknownArgument

# Fields the server fills in; accepting them from users would only mislead.
_SERVER_FILLED = {"prompt_length"}


def _fields(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
    return names


def unknown_argument(key: str, known: Iterable[str], what: str) -> UnknownArgument:
    """Build the error for an unknown key, suggesting the closest known names."""
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownArgument(f"Keyword argument {key!r} not recognized as a {what}{hint}")


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per failing field: ``field: message (got value)``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item.get("loc", ())) or "(config)"
        got = item.get("input")
        shown = f" (got {got!r})" if not isinstance(got, (dict, BaseModel)) else ""
        message = item.get("msg", "invalid").removeprefix("Value error, ")
        lines.append(f"{prefix}{field}: {message}{shown}")
    return "; ".join(lines)


def _merge(target: dict, key: str, value: Any, where: str) -> None:
    if key in target and target[key] != value:
        raise ConfigError(f"{key} given twice with different values: {target[key]!r} in "
                          f"{where} and {value!r} as a keyword argument")
    target[key] = value


def parse_serve_kwargs(model_name_or_path: str = "", model_config: Optional[Mapping] = None,
                       mii_config: Optional[Mapping] = None, **kwargs: Any) -> MIIConfig:
    """Build the ``MIIConfig`` of ``serve()`` from its arguments, as DeepSpeed-MII does."""
    if mii_config is not None and not isinstance(mii_config, Mapping):
        raise ConfigError(f"mii_config must be a dict, got {type(mii_config).__name__}")
    mii = dict(mii_config or {})
    nested = mii.pop("model_config", None)
    if model_config is not None and not isinstance(model_config, Mapping):
        raise ConfigError(f"model_config must be a dict, got {type(model_config).__name__}")
    if isinstance(nested, ModelConfig):
        nested = nested.model_dump()
    model = dict(nested or {})
    for key, value in dict(model_config or {}).items():
        _merge(model, key, value, "mii_config['model_config']")
    if model_name_or_path:
        _merge(model, "model_name_or_path", model_name_or_path, "model_config")

    model_keys, mii_keys = _fields(ModelConfig), _fields(MIIConfig) - {"model_config"}
    for key in model:
        if key not in model_keys:
            raise unknown_argument(key, model_keys, "ModelConfig field")
    for key in mii:
        if key not in mii_keys:
            raise unknown_argument(key, mii_keys, "MIIConfig field")
    for key, value in kwargs.items():
        if key in model_keys:
            _merge(model, key, value, "model_config")
        elif key in mii_keys:
            _merge(mii, key, value, "mii_config")
        else:
            # model_config / mii_config are serve()'s own parameters: a typo of them gets
            # them suggested too
            raise unknown_argument(key, model_keys | mii_keys | {"model_config", "mii_config"},
                                   "ModelConfig or MIIConfig field")
    if not model.get("model_name_or_path"):
        raise ConfigError("model_name_or_path: a model name or path must be given")
    try:
        mii["model_config"] = ModelConfig(**model)
        return MIIConfig(**mii)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def parse_pipeline_kwargs(model_name_or_path: str = "", model_config: Optional[Mapping] = None,
                          **kwargs: Any) -> ModelConfig:
    """The ``ModelConfig`` of ``mii.pipeline()``: as DeepSpeed-MII's, its keywords are
    ``ModelConfig`` fields only (there is no server to configure)."""
    model_keys = _fields(ModelConfig)
    for key in kwargs:
        if key not in model_keys:
            raise unknown_argument(key, model_keys, "ModelConfig field")
    return parse_serve_kwargs(model_name_or_path, model_config, **kwargs).model_conf


def parse_generate_kwargs(kwargs: Mapping[str, Any]) -> GenerateParamsConfig:
    """Validate per-call generate parameters before anything is sent."""
    known = _fields(GenerateParamsConfig) - _SERVER_FILLED
    for key in kwargs:
        if key not in known:
            raise unknown_argument(key, known, "generate parameter")
    try:
        return GenerateParamsConfig(**kwargs)
    except ValidationError as error:
        raise InvalidGenerateParams(describe_validation_error(error)) from None


# The MIIConfig fields that bound one request; servers report them in Info so that a
# client that knows a deployment only by address checks what the servers check.
REQUEST_LIMITS = ("max_request_bytes", "max_prompts_per_request", "max_queue_size")


def request_limits(config: MIIConfig) -> dict[str, int]:
    """``config``'s REQUEST_LIMITS fields by name."""
    return {name: getattr(config, name) for name in REQUEST_LIMITS}


def check_prompt_count(count: int, limits: MIIConfig) -> None:
    """Refuse a request of more prompts than ``limits`` (a deployment's MIIConfig) accept:
    ``max_prompts_per_request``, or ``max_queue_size`` when that is smaller (such a
    request could never be queued)."""
    field, limit = min(("max_prompts_per_request", limits.max_prompts_per_request),
                       ("max_queue_size", limits.max_queue_size), key=lambda item: item[1])
    if count > limit:
        raise InvalidGenerateParams(
            f"prompts: {count} prompts in one request; the deployment accepts at most "
            f"{limit} ({field}={limit}); send them in several requests")


def check_prompts(prompts: Any, limits: Optional[MIIConfig] = None) -> list[str]:
    """Accept one string or a non-empty list of strings; name the bad item otherwise.

    With ``limits`` (the deployment's MIIConfig) also refuse more prompts than it
    accepts (counted before any prompt is looked at) or more than ``max_request_bytes``
    of UTF-8 text in all (refused at the prompt that crosses it)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidGenerateParams(
            f"prompts: expected a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidGenerateParams("prompts: the list of prompts is empty")
    if limits is not None:
        check_prompt_count(len(prompts), limits)
    size = 0
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InvalidGenerateParams(
                f"prompts[{index}]: expected a string, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidGenerateParams(f"prompts[{index}]: the prompt is empty")
        try:
            size += len(prompt.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise InvalidGenerateParams(f"prompts[{index}]: not encodable as UTF-8 ({error.reason} "
                                        f"at position {error.start})") from None
        if limits is not None and size > limits.max_request_bytes:
            raise InvalidGenerateParams(
                f"prompts: the request holds more than {limits.max_request_bytes} bytes of "
                f"prompt text (UTF-8) by prompts[{index}]; the deployment accepts at most "
                f"max_request_bytes={limits.max_request_bytes} per request; send the prompts "
                "in several requests or shorten them")
    return list(prompts)


def check_timeout(timeout: Any, field: str = "timeout") -> Optional[float]:
    """``timeout`` (seconds) if it is None or a finite number in (0, MAX_TIMEOUT_S];
    InvalidGenerateParams naming ``field`` otherwise (grpc would fail an infinite, NaN,
    negative or overflowing deadline at once as DEADLINE_EXCEEDED)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidGenerateParams(f"{field}: expected a number of seconds, "
                                    f"got {type(timeout).__name__}")
    if not 0 < timeout <= MAX_TIMEOUT_S:  # false for NaN too; no float() of a huge int
        raise InvalidGenerateParams(f"{field}: expected seconds > 0 and at most "
                                    f"{MAX_TIMEOUT_S:g}, got {timeout!r}; pass None for no "
                                    "deadline")
    return float(timeout)
