"""The REST gateway: a FastAPI app in front of a deployment's client API.

Routes:

- ``POST /mii/{deployment_name}``: DeepSpeed-MII's RESTful API. Body
  ``{"prompts": str | [str], <generate params>}``; answers a JSON list with one
  ``Response.to_msg_dict()`` per prompt.
- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
  ``GET /v1/models/{model}``: the OpenAI-compatible API (``stream=true`` as
  server-sent events), errors in OpenAI's shape.
- ``GET /health`` (and MII's ``/healthz``): 200 when the deployment answers its health
  check, 503 otherwise. ``GET /metrics``: Prometheus text (docs/metrics.md).

There is deliberately no terminate route: the gateway stops with the deployment
(``terminate_server()`` from a client, ``mii stop``). With ``auth_token`` set, every
route except the health checks requires ``Authorization: Bearer <token>``.

The gateway never touches the model: every generate goes through ``MIIClient``'s
async methods, so it is just another client of the load balancer. At most
``restful_processes`` generate requests are forwarded at a time; more wait (in
arrival order) for a free slot. It is one asyncio process (uvicorn, one worker).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.responses import Response as HTTPResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mii_core import errors
from mii_core.api.client import MIIClient
from mii_core.config.kwargs import check_timeout, parse_generate_kwargs
from mii_core.config.models import MIIConfig
from mii_core.gateway import guard
from mii_core.gateway import openai_api as oa
from mii_core.gateway.limits import GatewayLimits
from mii_core.gateway.prom import GatewayMetrics, render

log = logging.getLogger(__name__)

_HTTP_STATUS = (
    (errors.InvalidGenerateParams, 400, "invalid_request_error", None),
    (errors.UnknownArgument, 400, "invalid_request_error", "unknown_parameter"),
    (errors.ConfigError, 400, "invalid_request_error", None),
    (errors.AuthenticationError, 502, "server_error", "deployment_auth_failed"),
    (errors.ServerOverloaded, 429, "rate_limit_error", "server_overloaded"),
    (errors.DeploymentUnavailable, 503, "service_unavailable", "deployment_unavailable"),
    (errors.RequestCancelled, 503, "service_unavailable", "request_cancelled"),
    (errors.DeadlineExceeded, 504, "timeout", "deadline_exceeded"),
)


def error_for(error: BaseException, openai: bool, chat: bool = False) -> oa.RequestError:
    """The HTTP error that a mii exception raised by the client stands for."""
    message = str(error) or type(error).__name__
    for cls, status, type_, code in _HTTP_STATUS:
        if isinstance(error, cls):
            break
    else:
        status, type_, code = 500, "server_error", None
        log.error("generate failed: %s: %s", type(error).__name__, message)
    if not openai:
        type_ = type(error).__name__ if isinstance(error, errors.MIIError) else "ServerError"
        param = oa.param_of(message, chat=False) if status == 400 else None
        if param == "prompt":
            param = "prompts"
        return oa.RequestError(status, message, type_, param, code)
    if status == 400:
        message = oa.rename_params(message)
    return oa.RequestError(status, message, type_, oa.param_of(message, chat) if status == 400
                           else None, code)


def _json_error(error: oa.RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


_INTERNAL = oa.RequestError(500, "internal error in the REST gateway (the deployment log "
                            "has the details)", "server_error")


def _is_mii_route(path: str) -> bool:
    return path.startswith("/mii/")


def _check_generate_kwargs(kwargs: Dict[str, Any]) -> None:
    """Validate generate parameters taken from a body before they become keyword arguments
    of a client call (and before a slot is taken): afterwards each key is a parameter's
    name, so none (``"self"``, say) can collide with the method's own parameters."""
    parse_generate_kwargs(kwargs)


def _timeout(value: Any) -> Optional[float]:
    """The ``timeout`` of a ``/mii`` request, checked as every client checks it."""
    try:
        return check_timeout(value)
    except errors.InvalidGenerateParams as error:
        raise oa.RequestError(400, str(error), "InvalidGenerateParams", "timeout") from None


class Slots:
    """At most ``limit`` generate requests in flight; the rest wait in arrival order."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._metrics = metrics

    async def acquire(self) -> None:
        self._metrics.waiting.inc()
        try:
            await self._semaphore.acquire()
        finally:
            self._metrics.waiting.dec()
        self._metrics.in_flight.inc()

    def release(self) -> None:
        self._metrics.in_flight.dec()
        self._semaphore.release()


class _Stream(StreamingResponse):
    """A streaming response that always runs ``on_close`` once it is done or abandoned."""

    def __init__(self, body: AsyncIterator[str], on_close) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _MetricsMiddleware:
    """Counts every HTTP request by route template and status; times it to its last byte."""

    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.observe(route, status[0], time.perf_counter() - started)


class _ErrorsAsJSON:
    """No request gets uvicorn's plain-text 500: an exception that escapes a route is
    logged with its traceback and answered with a JSON 500 that says nothing more (or, if
    the response had started, the connection is closed)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_wrapper(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:  # it left while sending its body: nobody to answer
            log.info("%s %s: the client disconnected", scope["method"], scope["path"])
        except Exception:  # noqa: BLE001 - the point of this middleware
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                error = _INTERNAL
                if _is_mii_route(scope["path"]):
                    error = oa.RequestError(500, error.message, "ServerError")
                await _json_error(error)(scope, receive, send)


class _AuthMiddleware:
    """With ``auth_token`` set, every route but the health checks needs the bearer token."""

    OPEN_PATHS = ("/health", "/healthz")

    def __init__(self, app, gateway: "Gateway") -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS and not \
                self.gateway.authorized(Request(scope)):
            response = _json_error(oa.RequestError(
                401, "missing or wrong bearer token (Authorization: Bearer <auth_token>)",
                "authentication_error", None, "invalid_api_key"))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _context_length(config: MIIConfig) -> Optional[int]:
    model = config.model_conf
    if model.max_length:
        return model.max_length
    try:
        from mii_core.deploy.model_source import model_dir_config

        data = model_dir_config(model) or {}
    except Exception:  # unknown: let the replica cap generation
        return None
    data = data.get("text_config", data) if "max_position_embeddings" not in data else data
    value = data.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


class Gateway:
    """State shared by the routes: the client, slots, metrics, the chat tokenizer."""

    def __init__(self, config: MIIConfig, client: MIIClient, limits: GatewayLimits) -> None:
        self.config = config
        self.client = client
        self.limits = limits
        self.name = config.deployment_name
        self.model_ids = {config.deployment_name, config.model_conf.model_name_or_path}
        self.metrics = GatewayMetrics(config.restful_processes)
        self.slots = Slots(config.restful_processes, self.metrics)
        self.token = getattr(config, "auth_token", None) or None
        self.context_length = _context_length(config)
        self.created = int(time.time())
        self._tokenizer: Any = None
        self._tokenizer_lock = asyncio.Lock()

    # -- helpers -----------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  self.token.encode())

    async def tokenizer(self) -> Any:
        """The model's tokenizer (for its chat template), loaded on first use."""
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = await asyncio.to_thread(self._load_tokenizer)
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        model = self.config.model_conf
        return AutoTokenizer.from_pretrained(model.tokenizer or model.model_name_or_path)

    async def chat_prompt(self, messages: List[Dict[str, str]]) -> str:
        try:
            tokenizer = await self.tokenizer()
        except Exception as error:  # noqa: BLE001 - reported to the caller
            raise oa.RequestError(500, f"cannot load the tokenizer for the chat template: "
                                  f"{type(error).__name__}: {error}", "server_error") from None
        if not getattr(tokenizer, "chat_template", None):
            raise oa.bad("the model's tokenizer has no chat template; use /v1/completions",
                         "messages", code="no_chat_template")
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - template errors (e.g. role order)
            raise oa.bad(f"the chat template rejected the conversation: {error}",
                         "messages") from None
        if not isinstance(prompt, str) or not prompt:
            raise oa.bad("the chat template produced an empty prompt", "messages")
        return prompt

    async def info(self) -> Optional[Dict[str, Any]]:
        try:
            return await asyncio.to_thread(self.client.info)
        except errors.MIIError as error:
            log.warning("Info failed: %s", error)
            return None

    async def healthy(self) -> bool:
        return await asyncio.to_thread(self.client.is_serving)

    async def generate(self, prompts: List[str], kwargs: Dict[str, Any],
                       timeout: Optional[float] = None) -> List[Any]:
        """Generate through the client; ``kwargs`` are generate parameters from a body."""
        _check_generate_kwargs(kwargs)
        await self.slots.acquire()
        try:
            return await self.client.agenerate(prompts, timeout=timeout, **kwargs)
        finally:
            self.slots.release()

    async def open_stream(self, prompts: List[str], kwargs: Dict[str, Any]
                          ) -> Tuple[AsyncIterator[Any], Any, Any]:
        """Start a stream and wait for its first chunk, so that errors still get a status code.

        Returns (iterator, first chunk, close); ``close`` must be awaited exactly once.
        """
        _check_generate_kwargs(kwargs)
        await self.slots.acquire()
        chunks = self.client.astream(prompts, **kwargs)
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                try:
                    await chunks.aclose()  # cancels the call if the client went away
                finally:
                    self.slots.release()

        try:
            first = await chunks.__anext__()
        except BaseException:
            await close()
            raise
        return chunks, first, close


def create_app(config: MIIConfig, client: MIIClient,
               limits: GatewayLimits = GatewayLimits()) -> FastAPI:
    """The gateway's ASGI app for the deployment ``config`` reached through ``client``,
    refusing requests beyond ``limits`` (the header deadline is the server's:
    ``server.uvicorn_server``)."""
    gateway = Gateway(config, client, limits)
    app = FastAPI(title=f"mii gateway: {config.deployment_name}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gateway
    app.add_middleware(_AuthMiddleware, gateway=gateway)
    app.add_middleware(_ErrorsAsJSON)
    app.add_middleware(guard.CloseUnreadBody)  # sees the JSON 500s and 401s too
    app.add_middleware(_MetricsMiddleware, metrics=gateway.metrics)  # outermost: counts all

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(
                       error.status_code, str(error.detail))
        return _json_error(oa.RequestError(error.status_code, message, "invalid_request_error",
                                           None, "not_found" if error.status_code == 404
                                           else None))

    async def read_json(request: Request, mii: bool) -> Any:
        try:
            return await guard.read_json(request, gateway.limits)
        except guard.RequestRefused as refused:
            raise refused.as_error(mii) from None

    # -- health and metrics ------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await gateway.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "deployment": gateway.name}, status_code=200 if ok else 503)

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        # DeepSpeed-MII's route answers the text "ok"; here also only while the
        # deployment answers (503 "unavailable" otherwise, as /health).
        ok = await gateway.healthy()
        return PlainTextResponse("ok" if ok else "unavailable", status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> HTTPResponse:
        info = await gateway.info()
        body = await asyncio.to_thread(render, info, gateway.name, gateway.metrics)
        return HTTPResponse(body, media_type=CONTENT_TYPE_LATEST)

    # -- DeepSpeed-MII's RESTful API -----------------------------------------------------
    @app.post("/mii/{deployment_name:path}")
    async def mii_generate(deployment_name: str, request: Request) -> JSONResponse:
        if deployment_name != gateway.name:
            return _json_error(oa.RequestError(
                404, f"no deployment named {deployment_name!r} here; this gateway serves "
                f"{gateway.name!r}", "DeploymentNotFoundError", "deployment_name",
                "deployment_not_found"))
        try:
            body = await read_json(request, mii=True)
            if not isinstance(body, dict):
                raise oa.RequestError(400, "the request body must be a JSON object like "
                                      '{"prompts": [...], "max_new_tokens": 64}',
                                      "InvalidGenerateParams")
            if "prompts" not in body:
                raise oa.RequestError(400, "prompts: missing; send a string or a list of "
                                      "strings", "InvalidGenerateParams", "prompts")
            kwargs = dict(body)
            prompts = kwargs.pop("prompts")
            timeout = _timeout(kwargs.pop("timeout", None))
            if kwargs.get("stream"):
                raise oa.RequestError(400, "stream: this route answers whole responses; "
                                      "stream with /v1/completions", "InvalidGenerateParams",
                                      "stream")
            responses = await gateway.generate(prompts, kwargs, timeout)
        except oa.RequestError as error:
            return _json_error(error)
        except errors.MIIError as error:
            return _json_error(error_for(error, openai=False))
        return JSONResponse([r.to_msg_dict() for r in responses])

    # -- OpenAI-compatible API -----------------------------------------------------------
    def model_entry(model_id: str) -> Dict[str, Any]:
        return {"id": model_id, "object": "model", "created": gateway.created,
                "owned_by": "mii", "root": config.model_conf.model_name_or_path}

    def check_model(model: str) -> None:
        if model not in gateway.model_ids:
            raise oa.RequestError(404, f"The model `{model}` does not exist; this gateway serves "
                                  f"`{gateway.name}`", "invalid_request_error", "model",
                                  "model_not_found")

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_entry(gateway.name)]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        try:
            check_model(model)
        except oa.RequestError as error:
            return _json_error(error)
        return JSONResponse(model_entry(model))

    async def openai_generate(request: Request, chat: bool):
        try:
            body = oa.check_fields(await read_json(request, mii=False),
                                   oa.CHAT_FIELDS if chat else oa.COMPLETION_FIELDS,
                                   "chat completions" if chat else "completions")
            check_model(body["model"])
            stream, include_usage = oa.stream_options(body)
            echo = False if chat else oa.flag(body, "echo")
            if chat:
                messages = oa.chat_messages(body)
                kwargs = oa.generate_kwargs(body, True, gateway.context_length)
                prompts = [await gateway.chat_prompt(messages)]
            else:
                prompts = oa.completion_prompts(body)
                kwargs = oa.generate_kwargs(body, False, gateway.context_length)
            model = body["model"]
            if not stream:
                responses = await gateway.generate(prompts, kwargs)
                return JSONResponse(oa.chat_body(responses[0], model) if chat
                                    else oa.completion_body(responses, model, prompts, echo))
            chunks, first, close = await gateway.open_stream(prompts, kwargs)
        except oa.RequestError as error:
            return _json_error(error)
        except errors.MIIError as error:
            return _json_error(error_for(error, openai=True, chat=chat))
        formatter = oa.StreamFormatter(model, chat, prompts, echo)

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in formatter.chunks(first):
                    yield f"data: {json.dumps(chunk)}\n\n"
                async for response in chunks:
                    for chunk in formatter.chunks(response):
                        yield f"data: {json.dumps(chunk)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(formatter.usage_chunk())}\n\n"
            except errors.MIIError as error:  # after the 200 went out: an error event
                yield f"data: {json.dumps(error_for(error, True, chat).body())}\n\n"
            except Exception:  # noqa: BLE001 - as _ErrorsAsJSON, but the 200 went out
                log.exception("stream of %s failed", request.url.path)
                yield f"data: {json.dumps(_INTERNAL.body())}\n\n"
            yield "data: [DONE]\n\n"

        return _Stream(events(), close)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai_generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await openai_generate(request, chat=True)

    return app
