"""The gRPC load balancer (``mii_transport/grpc/load_balancer.py``) in front of in-process
fake replicas on loopback: what its probes report, and what becomes of the calls on a
replica that stopped answering or was lost. The test plays the health watcher (it tells
the router what probes saw), so nothing depends on timing."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import List, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii_core.routing.router import SILENT_PROBES_TO_STALL
from mii_core.routing.schedulers.round_robin import RoundRobinScheduler
from mii_transport.grpc.generated import mii_pb2, mii_pb2_grpc
from mii_transport.grpc.load_balancer import LoadBalancerServicer, ReplicaChannel
from mii_transport.grpc.status import ERROR_KEY

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeReplica(mii_pb2_grpc.MIIServiceServicer, health_pb2_grpc.HealthServicer):
    """MIIService and health of replica ``index``. ``mode``: "serve" answers at once,
    "hold" keeps each call waiting (a stream after its first piece when the prompt is
    "piece first"), "lose" fails it UNAVAILABLE; ``health``: the health answer, None for
    none at all (as a frozen process gives)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.mode = "serve"
        self.health: Optional[int] = SERVING
        self.calls = 0
        self.cancelled = 0  # held calls whose caller (the load balancer) cancelled them
        self.never = asyncio.Event()
        self.info_in_flight = False
        self.peers: List["FakeReplica"] = [self]
        self.server = grpc.aio.server()
        mii_pb2_grpc.add_MIIServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def reply(self, finish_reason: str = "length") -> mii_pb2.GenerateReply:
        return mii_pb2.GenerateReply(replica=self.index, completions=[
            mii_pb2.Completion(text="text", finish_reason=finish_reason)])

    async def _act(self, context) -> None:
        if self.mode == "hold":
            await self.never.wait()
        elif self.mode == "lose":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is shutting down")

    async def Generate(self, request, context):
        self.calls += 1
        try:
            await self._act(context)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.reply()

    async def GenerateStream(self, request, context):
        # A cancel counts wherever it lands: on a loaded machine a deadline can pass while
        # the first piece's write is still being awaited, before the hold begins.
        self.calls += 1
        try:
            if request.prompts[0] == "piece first":
                yield self.reply(finish_reason="")
            await self._act(context)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield self.reply()

    async def Info(self, request, context):
        """Answers once every replica of ``self.peers`` has an Info call in flight."""
        self.info_in_flight = True
        await _until(lambda: all(peer.info_in_flight for peer in self.peers), timeout=5.0)
        return mii_pb2.InfoReply(json=json.dumps({"replica": self.index}))

    async def Check(self, request, context):
        if self.health is None:
            await self.never.wait()
        return health_pb2.HealthCheckResponse(status=self.health)


def _request(prompt: str = "x") -> mii_pb2.GenerateRequest:
    return mii_pb2.GenerateRequest(prompts=[prompt])


async def _until(predicate, timeout: float = 10.0, state=lambda: None) -> None:
    """Poll ``predicate`` on the event loop until true (a hang guard, not a bound);
    ``state()`` says what was seen when it times out."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {state()}"
        await asyncio.sleep(0.005)


async def _failure(awaitable) -> tuple:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return (caught.value.code(), caught.value.details(),
            dict(caught.value.trailing_metadata() or ()).get(ERROR_KEY))


async def _pieces(call) -> List[int]:
    return [reply.replica async for reply in call]


async def _with_load_balancer(body) -> None:
    """Two fake replicas behind a load balancer whose router the test drives; ``body(lb,
    stub, replicas)``."""
    replicas = [FakeReplica(0), FakeReplica(1)]
    for replica in replicas:
        await replica.server.start()
    lb = LoadBalancerServicer([r.address for r in replicas], RoundRobinScheduler(2), {},
                              on_terminate=lambda: None)
    server = grpc.aio.server()
    mii_pb2_grpc.add_MIIServiceServicer_to_server(lb, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for index in (0, 1):
                lb.router.set_health(index, True)
            await body(lb, mii_pb2_grpc.MIIServiceStub(channel), replicas)
    finally:
        await server.stop(None)
        await lb.close()
        for replica in replicas:
            await replica.server.stop(None)


def test_a_probe_tells_serving_not_serving_and_no_answer():
    async def main():
        replica = FakeReplica(0)
        await replica.server.start()
        channel = ReplicaChannel(replica.address)
        try:
            assert await channel.probe(5.0) is True
            replica.health = NOT_SERVING  # a draining replica answers
            assert await channel.probe(5.0) is False
            replica.health = None  # a frozen one does not
            assert await channel.probe(0.2) is None
            await replica.server.stop(None)  # nor does one that is gone
            assert await channel.probe(2.0) is None
        finally:
            channel.close()
            await replica.server.stop(None)

    asyncio.run(main())


def test_calls_on_a_replica_that_stopped_answering_are_retried_or_failed():
    async def body(lb, stub, replicas):
        held, other = replicas
        held.mode = "hold"
        stream = stub.GenerateStream(_request("piece first"))
        assert (await stream.read()).replica == 0  # round robin: 0, 1, 0, 1, 0
        assert (await stub.Generate(_request())).replica == 1
        unary = asyncio.ensure_future(stub.Generate(_request()))
        await _until(lambda: held.calls == 2)
        assert (await stub.Generate(_request())).replica == 1
        quiet = asyncio.ensure_future(_pieces(stub.GenerateStream(_request("quiet"))))
        await _until(lambda: held.calls == 3)
        assert [r["outstanding"] for r in lb.router.describe()] == [3, 0]
        for _ in range(SILENT_PROBES_TO_STALL):
            lb.router.unanswered(0)
        # Nothing reached the client yet: sent again to the other replica, served there.
        assert (await unary).replica == 1
        assert await quiet == [1]
        # The stream had sent a piece: it cannot go on elsewhere.
        assert await _failure(stream.read()) == (
            grpc.StatusCode.UNAVAILABLE, f"replica 0 at {held.address} stopped answering in "
            "the middle of the stream; what it sent cannot be resumed on another replica: "
            "retry", "DeploymentUnavailable")
        assert [r["routed"] for r in lb.router.describe()] == [3, 4]
        assert [r["outstanding"] for r in lb.router.describe()] == [0, 0]
        # Then the other replica stops answering too: its call has nowhere left to go.
        other.mode = "hold"
        last = asyncio.ensure_future(stub.Generate(_request()))
        await _until(lambda: other.calls == 5)  # 2 of its own, 2 retried, this one
        for _ in range(SILENT_PROBES_TO_STALL):
            lb.router.unanswered(1)
        assert await _failure(last) == (
            grpc.StatusCode.UNAVAILABLE, f"replica 1 at {other.address} stopped answering "
            "while serving the request, and no other healthy replica is left to retry it on",
            "DeploymentUnavailable")
        assert (await _failure(stub.Generate(_request())))[1] == \
            "no replica of the deployment is healthy right now"

    asyncio.run(_with_load_balancer(body))


def test_a_call_whose_replica_was_lost_is_retried_once_on_each_other_replica():
    async def body(lb, stub, replicas):
        lost, other = replicas
        lost.mode = "lose"
        for _ in range(2):  # round robin: 0 (lost, then 1 for the retry), then 0 again
            assert (await stub.Generate(_request())).replica == 1
            assert not lb.router.describe()[0]["healthy"]
            lb.router.set_health(0, True)  # a probe answers again before the next call
        assert lost.calls == 2 and other.calls == 2
        other.mode = "lose"
        assert await _failure(stub.Generate(_request())) == (
            grpc.StatusCode.UNAVAILABLE, f"replica 1 at {other.address} was lost while "
            "serving the request, and no other healthy replica is left to retry it on",
            "DeploymentUnavailable")
        assert lost.calls == 3 and other.calls == 3  # each tried once
        assert not any(r["healthy"] for r in lb.router.describe())

    asyncio.run(_with_load_balancer(body))


def _forwarding_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "forward-stream"]


def test_a_call_whose_client_left_is_cancelled_at_the_replica_not_retried():
    """The replica hears the cancel of a unary call and of an abandoned stream (within the
    hang guard: nothing else would end them), and the stream's thread ends."""
    async def body(lb, stub, replicas):
        for replica in replicas:
            replica.mode = "hold"
        unary = stub.Generate(_request())
        await _until(lambda: replicas[0].calls == 1)  # round robin: 0, then 1
        stream = stub.GenerateStream(_request("piece first"))
        assert (await stream.read()).replica == 1
        assert len(_forwarding_threads()) == 1
        unary.cancel()
        stream.cancel()
        await _until(lambda: [r.cancelled for r in replicas] == [1, 1])
        await _until(lambda: [r["outstanding"] for r in lb.router.describe()] == [0, 0])
        await _until(lambda: not _forwarding_threads())
        assert [r.calls for r in replicas] == [1, 1]
        assert all(r["healthy"] for r in lb.router.describe())

    asyncio.run(_with_load_balancer(body))


def test_a_deadline_reaches_the_replica():
    """The client's deadline goes with the forwarded calls: the replica's calls end
    when it passes, the client gets DEADLINE_EXCEEDED, nothing is retried."""
    async def body(lb, stub, replicas):
        for replica in replicas:
            replica.mode = "hold"
        # Deadlines long enough that a loaded 2-core CI machine starts the replicas'
        # calls before they pass (a call the deadline beats is never the replica's).
        assert (await _failure(stub.Generate(_request(), timeout=1.5)))[0] == \
            grpc.StatusCode.DEADLINE_EXCEEDED
        stream = stub.GenerateStream(_request("piece first"), timeout=1.5)
        assert (await stream.read()).replica == 1
        assert (await _failure(stream.read()))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        seen = lambda: dict(calls=[r.calls for r in replicas],  # noqa: E731
                            cancelled=[r.cancelled for r in replicas],
                            routed=lb.router.describe(), threads=_forwarding_threads())
        await _until(lambda: [r.cancelled for r in replicas] == [1, 1], 30.0, seen)
        await _until(lambda: [r["outstanding"] for r in lb.router.describe()] == [0, 0],
                     state=seen)
        await _until(lambda: not _forwarding_threads(), state=seen)
        assert [r.calls for r in replicas] == [1, 1]

    asyncio.run(_with_load_balancer(body))


def test_info_asks_every_replica_at_once():
    """Each fake replica answers Info only once all have been asked: asked one after
    another, the first would wait out the load balancer's 2 s timeout (a frozen replica
    then cost the answer 2 s each)."""
    async def body(lb, stub, replicas):
        for replica in replicas:
            replica.peers = replicas
        info = json.loads((await stub.Info(mii_pb2.InfoRequest(), timeout=10)).json)
        assert [entry.get("replica") for entry in info["replicas"]] == [0, 1]
        assert not any("error" in entry for entry in info["replicas"])

    asyncio.run(_with_load_balancer(body))
