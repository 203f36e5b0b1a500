"""Bounded work before validation: request limits checked by the client and by both gRPC
servers before anything is tokenized, tokenizing off the servers' event loop, the queue
counted in prompts (room reserved before tokenizing), parameters beyond the wire's
int64 / non-finite floats and bad timeouts refused naming the field, and an undecodable
request body answered INVALID_ARGUMENT. Servers here are real (``run_server`` on a
free port) in front of fake engines, so each test costs milliseconds."""
from __future__ import annotations

import asyncio
import math
import threading
from typing import Callable, List

import grpc
import httpx
import pytest
from conftest import refused_port, wait_until

from mii_core.api.client import MIIClient
from mii_core.api.serve import client as connect
from mii_core.config.kwargs import (
    check_prompts,
    check_timeout,
    parse_generate_kwargs,
    request_limits,
)
from mii_core.config.models import GenerateParamsConfig, MIIConfig
from mii_core.constants import MAX_TIMEOUT_S, WIRE_INT_MAX
from mii_core.deploy.ports import free_port
from mii_core.errors import DeploymentUnavailable, InvalidGenerateParams, ServerOverloaded
from mii_core.gateway import create_app
from mii_core.plugins.interfaces import TokenEvent
from mii_core.routing.stats import ReplicaStats, ServingMetrics
from mii_engines.runtime.inbox import Inbox
from mii_engines.runtime.intake import Intake
from mii_transport.grpc import codec
from mii_transport.grpc.client import is_serving
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc
from mii_transport.grpc.plugin import describe
from mii_transport.grpc.server import ReplicaServicer, receive_limit, run_server
from mii_transport.grpc.status import ERROR_KEY


def config(**fields) -> MIIConfig:
    return MIIConfig(model_config={"model_name_or_path": "m"}, **fields)


# -- parameters beyond the wire format ---------------------------------------------------
_PARAMS = mii_pb2.GenerateParams.DESCRIPTOR.fields
INT64_PARAMS = [f.name for f in _PARAMS if f.type == f.TYPE_INT64]
DOUBLE_PARAMS = [f.name for f in _PARAMS if f.type == f.TYPE_DOUBLE]


def test_the_wire_parameters_are_the_ones_checked_here():
    """A new numeric field in proto/mii.proto joins the checks below by itself."""
    assert set(INT64_PARAMS) == {"max_length", "max_new_tokens", "min_new_tokens", "top_k",
                                 "seed"}
    assert set(DOUBLE_PARAMS) == {"top_p", "temperature"}


@pytest.mark.parametrize("field", INT64_PARAMS)
def test_int64_parameters_end_at_the_wire_range(field):
    at_edge = parse_generate_kwargs({field: WIRE_INT_MAX})
    assert getattr(codec.params_to_proto(at_edge), field) == WIRE_INT_MAX  # it encodes
    for beyond in (WIRE_INT_MAX + 1, 2 ** 64, 2 ** 70):
        with pytest.raises(InvalidGenerateParams,
                           match=rf"^{field}: Input should be less than or equal to "
                                 rf"{WIRE_INT_MAX} \(got {beyond}\)"):
            parse_generate_kwargs({field: beyond})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", DOUBLE_PARAMS)
def test_non_finite_floats_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidGenerateParams, match=rf"^{field}: "):
        parse_generate_kwargs({field: value})


# -- the client: timeouts and request limits, before anything is sent --------------------
@pytest.fixture(scope="module")
def unreachable() -> Callable[..., MIIClient]:
    """Clients of a port that refuses connections: a call that got past the client's own
    checks fails DeploymentUnavailable."""
    with refused_port() as port:
        made: List[MIIClient] = []

        def make(**fields) -> MIIClient:
            made.append(MIIClient(config(**fields), host="127.0.0.1", port=port))
            return made[-1]

        yield make
        for client in made:
            client._conn.close()


BAD_TIMEOUTS = [math.inf, math.nan, -1, 0, 0.0, 1e10, MAX_TIMEOUT_S + 1, 10 ** 400, True, "5"]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_refused_before_any_call(unreachable, timeout):
    client = unreachable()
    with pytest.raises(InvalidGenerateParams, match=r"^timeout: "):
        client.generate("hi", timeout=timeout)
    with pytest.raises(InvalidGenerateParams, match=r"^timeout: "):
        client.stream("hi", timeout=timeout)
    with pytest.raises(InvalidGenerateParams, match=r"^timeout: "):
        asyncio.run(client.agenerate("hi", timeout=timeout))
    with pytest.raises(InvalidGenerateParams, match=r"^timeout: "):
        MIIClient(config(), port=1, timeout=timeout)


def test_the_longest_timeout_is_accepted_and_sent(unreachable):
    assert check_timeout(MAX_TIMEOUT_S) == MAX_TIMEOUT_S
    with pytest.raises(DeploymentUnavailable):  # got past the checks: the port refuses
        unreachable().generate("hi", timeout=MAX_TIMEOUT_S)


def test_the_client_refuses_more_prompts_than_a_request_may_carry(unreachable):
    client = unreachable(max_prompts_per_request=3)
    with pytest.raises(InvalidGenerateParams,
                       match=r"^prompts: 4 prompts in one request; the deployment accepts at "
                             r"most 3 \(max_prompts_per_request=3\)"):
        client.generate(["a"] * 4)
    with pytest.raises(DeploymentUnavailable):
        client.generate(["a"] * 3)


def test_a_request_larger_than_the_queue_is_refused_naming_max_queue_size(unreachable):
    with pytest.raises(InvalidGenerateParams, match=r"at most 2 \(max_queue_size=2\)"):
        unreachable(max_queue_size=2).generate(["a"] * 3)


def test_the_client_counts_prompt_bytes_in_utf8(unreachable):
    client = unreachable(max_request_bytes=10)
    with pytest.raises(DeploymentUnavailable):
        client.generate(["é" * 2, "é" * 3])  # 10 bytes in all
    with pytest.raises(InvalidGenerateParams,
                       match=r"^prompts: .*more than 10 bytes .* by prompts\[1\]; .*"
                             r"max_request_bytes=10 per request"):
        client.generate(["é" * 2, "é" * 4])  # 6 characters, 12 bytes


def test_the_default_limits_refuse_what_the_issue_sent(unreachable):
    client = unreachable()
    with pytest.raises(InvalidGenerateParams, match="max_prompts_per_request=1024"):
        client.generate(["hi"] * 100_000)
    with pytest.raises(InvalidGenerateParams, match="max_request_bytes=8388608"):
        client.generate("x" * (10 * 2 ** 20))


def test_the_gateway_answers_400_naming_the_field(unreachable):
    """The REST gateway validates through the client: wire-range values and a timeout
    JSON can still carry (``Infinity``, ``1e10``) are 400s naming the field."""
    client = unreachable()
    app = create_app(client.mii_config, client)
    path = f"/mii/{client.deployment_name}"

    async def post(body: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            return await http.post(path, content=body,
                                   headers={"content-type": "application/json"})

    for body, field in [('{"prompts": "hi", "max_new_tokens": %d}' % 2 ** 70, "max_new_tokens"),
                        ('{"prompts": "hi", "max_length": %d}' % 2 ** 64, "max_length"),
                        ('{"prompts": "hi", "top_k": %d}' % 2 ** 64, "top_k"),
                        ('{"prompts": "hi", "temperature": Infinity}', "temperature"),
                        ('{"prompts": "hi", "timeout": Infinity}', "timeout"),
                        ('{"prompts": "hi", "timeout": NaN}', "timeout"),
                        ('{"prompts": "hi", "timeout": 1e10}', "timeout")]:
        reply = asyncio.run(post(body))
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == field, (body, reply.text)


# -- the queue, counted in prompts and reserved before tokenizing ----------------------
class GatedTokenizer:
    """A tokenizer whose first call waits until ``release`` is set; counts its calls."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.calls = 0
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, prompt: str, add_special_tokens: bool = True) -> dict:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(30)
        return {"input_ids": [1] * len(prompt)}


def test_queue_room_is_reserved_before_tokenizing():
    tokenizer = GatedTokenizer()
    inbox = Inbox(Intake(tokenizer, 64, 64, 0), ServingMetrics(), max_queue_size=3)

    def submit(prompts: List[str]):
        return inbox.submit(prompts, GenerateParamsConfig(), lambda event: None, lambda: 0)

    first = threading.Thread(target=submit, args=(["ab", "cd"],))
    first.start()
    try:
        assert tokenizer.entered.wait(10)
        assert inbox.pending_prompts() == 2  # being tokenized counts
        with pytest.raises(ServerOverloaded, match=r"queue is full \(2 prompts waiting, "
                                                   r"max_queue_size=3\) for the request's 2"):
            submit(["ef", "gh"])
        with pytest.raises(ServerOverloaded):
            submit(["a"] * 100_000)
        assert tokenizer.calls == 1  # the refused requests were never tokenized
    finally:
        tokenizer.release.set()
        first.join(30)
    assert inbox.pending_prompts() == 2  # now queued
    submit(["ij"])
    assert inbox.pending_prompts() == 3
    assert inbox.metrics.requests["rejected"] == 2


# -- the servers: a gate before the servicer, tokenizing off the event loop --------------
class Handle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class SlowService:
    """A GenerationService whose ``submit`` (a replica's tokenizing) waits for ``release``;
    with ``finish`` every prompt then ends at once with the text "ok"."""

    def __init__(self, finish: bool = True, released: bool = False) -> None:
        self.finish = finish
        self.entered, self.release = threading.Event(), threading.Event()
        if released:
            self.release.set()
        self.submitted: List[List[str]] = []
        self.handles: List[Handle] = []

    def submit(self, prompts, params, sink) -> Handle:
        self.submitted.append(list(prompts))
        self.entered.set()
        assert self.release.wait(30)
        self.handles.append(Handle())
        for index in range(len(prompts) if self.finish else 0):
            sink(TokenEvent(index, "ok", 1, 1, finish_reason="length"))
        return self.handles[-1]

    def stats(self) -> ReplicaStats:
        return ReplicaStats(replica=0)


def serve_and_run(service: SlowService, scenario: Callable[[str], object],
                  limits: MIIConfig | None = None, describe: dict | None = None):
    """Serve a ReplicaServicer of ``service`` with ``run_server`` on this thread's event
    loop and run ``scenario(address)`` on another thread (so that a blocked loop shows as
    calls that time out); stop the server when it returns and give back its result."""
    outcome: dict = {}
    address = f"127.0.0.1:{free_port()}"
    servicer = ReplicaServicer(service, 0, describe or {"role": "replica"}, lambda: None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                outcome["result"] = scenario(address)
            except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
                outcome["error"] = error
            finally:
                loop.call_soon_threadsafe(stop.set)

        await run_server(servicer, address, stop, limits=limits,
                         on_started=lambda: threading.Thread(target=run, daemon=True).start())

    try:
        asyncio.run(main())
    finally:
        servicer.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def generate_request(prompts: List[str]) -> mii_pb2.GenerateRequest:
    return codec.request_to_proto(prompts, GenerateParamsConfig(max_new_tokens=1))


def test_a_request_the_client_accepts_fits_the_servers_message_limit():
    limits = config()
    count = limits.max_prompts_per_request
    prompts = ["é" * (limits.max_request_bytes // count // 2)] * count  # 2 bytes a character
    assert check_prompts(prompts, limits) == prompts
    params = parse_generate_kwargs({**{name: WIRE_INT_MAX for name in INT64_PARAMS},
                                    "min_new_tokens": 1, "top_p": 0.5, "temperature": 0.5,
                                    "stop": [f"stop string {i}" for i in range(1000)]})
    assert codec.request_to_proto(prompts, params).ByteSize() <= receive_limit(limits)


def test_health_answers_while_a_request_is_tokenized():
    service = SlowService()

    def scenario(address: str):
        with grpc.insecure_channel(address) as channel:
            call = mii_pb2_grpc.MIIServiceStub(channel).Generate.future(
                generate_request(["a long prompt"]), timeout=30)
            assert service.entered.wait(10)
            healthy = is_serving(address, timeout=2.0)  # while submit still tokenizes
            service.release.set()
            return healthy, call.result()

    healthy, reply = serve_and_run(service, scenario)
    assert healthy
    assert [c.text for c in reply.completions] == ["ok"]


def test_a_caller_leaving_during_tokenizing_leaves_no_request_behind():
    service = SlowService(finish=False)  # a request left behind would never end

    def scenario(address: str):
        with grpc.insecure_channel(address) as channel:
            call = mii_pb2_grpc.MIIServiceStub(channel).GenerateStream(
                generate_request(["a"]), timeout=30)
            assert service.entered.wait(10)
            call.cancel()
            service.release.set()
            return wait_until(lambda: bool(service.handles)
                              and service.handles[0].cancelled.is_set(), 10)

    assert serve_and_run(service, scenario)


def test_submit_cancelled_while_tokenizing_cancels_the_request_once_queued():
    """The servicer's own path, without grpc's timing: the awaiting coroutine is cancelled
    first, the tokenizing ends afterwards."""
    service = SlowService(finish=False)
    servicer = ReplicaServicer(service, 0, {}, lambda: None)

    async def scenario() -> None:
        task = asyncio.create_task(servicer._submit(["a"], GenerateParamsConfig(),
                                                    lambda event: None))
        assert await asyncio.to_thread(service.entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not service.handles  # still tokenizing
        service.release.set()

    try:
        asyncio.run(scenario())
        assert wait_until(lambda: bool(service.handles) and service.handles[0].cancelled.is_set(),
                          10)
    finally:
        servicer.close()


def raw_call(address: str, method: str, payload: bytes):
    """Send ``payload`` as the body of ``method``: grpc's error (or None if it succeeded)."""
    with grpc.insecure_channel(address) as channel:
        if method == "GenerateStream":
            call = channel.unary_stream(f"/mii.MIIService/{method}")
            try:
                list(call(payload, timeout=10))
            except grpc.RpcError as error:
                return error
        else:
            try:
                channel.unary_unary(f"/mii.MIIService/{method}")(payload, timeout=10)
            except grpc.RpcError as error:
                return error
    return None


UNDECODABLE = [bytes([0x0A, 0x02, 0xC3, 0x28]),  # prompts[0] holding invalid UTF-8
               b"\xff\xff\xff\xff",  # not a protobuf field at all
               bytes([0x0A, 0x7F]) + b"short"]  # a length beyond the body


def test_an_undecodable_body_is_invalid_argument():
    service = SlowService(released=True)

    def scenario(address: str):
        return [(method, raw_call(address, method, body))
                for method in ("Generate", "GenerateStream") for body in UNDECODABLE]

    for method, error in serve_and_run(service, scenario):
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert f"the request to /mii.MIIService/{method} could not be decoded" in error.details()
        assert (ERROR_KEY, "InvalidGenerateParams") in error.trailing_metadata()
    assert service.submitted == []


def test_the_gate_refuses_a_request_beyond_the_limits_before_the_servicer():
    """What a client that skips mii's own checks sends is refused by the server itself,
    and a message beyond ``receive_limit`` by grpc before it is decoded."""
    limits = config(max_prompts_per_request=4, max_request_bytes=64)
    service = SlowService(released=True)
    cases = [(["a"] * 5, "max_prompts_per_request=4"),
             (["x" * 40, "y" * 25], "max_request_bytes=64"),
             (["ok", ""], "prompts[1]: the prompt is empty")]

    def scenario(address: str):
        errors = []
        for prompts, _ in cases:
            body = generate_request(prompts).SerializeToString()
            errors += [raw_call(address, method, body)
                       for method in ("Generate", "GenerateStream")]
        huge = generate_request(["z" * (receive_limit(limits) + 1)]).SerializeToString()
        served = raw_call(address, "Generate", generate_request(["a"] * 4).SerializeToString())
        return errors, raw_call(address, "Generate", huge), served

    errors, too_big, served = serve_and_run(service, scenario, limits)
    for error, (_, match) in zip(errors, [c for c in cases for _ in range(2)]):
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert match in error.details()
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served is None
    assert service.submitted == [["a"] * 4]  # only the request within the limits


def test_a_client_by_address_checks_the_limits_the_servers_report():
    """``mii.client("host:port")`` has no registry record: it takes the limits from Info,
    so that it refuses neither less nor more than the servers do."""
    served = config(deployment_name="far", max_request_bytes=123, max_prompts_per_request=7,
                    max_queue_size=9)

    def scenario(address: str):
        remote = connect(address)
        try:
            return remote.deployment_name, request_limits(remote.mii_config)
        finally:
            remote._conn.close()

    name, limits = serve_and_run(SlowService(), scenario, describe=describe(served))
    assert (name, limits) == ("far", {"max_request_bytes": 123, "max_prompts_per_request": 7,
                                      "max_queue_size": 9})
