"""Calls from the load balancer to a replica, made with grpc's synchronous client API and
awaited on the load balancer's event loop.

Why not ``grpc.aio``: in grpcio up to 1.85.3 (grpc/grpc#43360, fixes #43361 / #43409 not
released), ``grpc.aio`` frees a batch's ``grpc_op`` array, and the message it received,
only when the coroutine awaiting the batch consumes its completion. A batch that fails
(the read pending on a stream the load balancer cancels) or whose awaiting task is
cancelled (the handler of a call whose client left) leaks it. Forwarding an abandoned
stream does both, and it must cancel: the replica would generate on for nobody. The
synchronous API's completion queue is drained by grpc's own thread, which consumes
every event, failed or not, so nothing is left behind (``bench/lb_memory.py``).

A unary call completes through ``future()`` and a done callback; a stream's replies are
pulled by a thread of its own (it ends with the stream) into an asyncio queue, the
loop woken once per burst of replies (``_Handoff``). Either is
cancelled, and the replica told at once, by ``cancel()`` or by cancelling the task that
awaits it.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from typing import AsyncIterator, Generic, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from mii_core.errors import RequestCancelled

Reply = TypeVar("Reply")
Metadata = Sequence[Tuple[str, str]]


class UpstreamCancelled(RequestCancelled):
    """The forwarded call was cancelled by the load balancer itself (``cancel()``), not
    by the replica nor by the client."""


def _settle(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future,
            result: object) -> None:
    """Hand ``result`` to ``waiter`` on ``loop`` (from any thread); dropped if the loop
    is closed (the load balancer is shutting down) or nobody waits any more."""
    def settle() -> None:
        if not waiter.done():
            waiter.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed
        pass


class ForwardedUnary(Generic[Reply]):
    """A unary call to a replica: ``await reply()``; ``cancel()`` from the loop at any
    time. ``reply()`` raises ``grpc.RpcError`` when the call failed and
    ``UpstreamCancelled`` after ``cancel()``; cancelling its task cancels the call."""

    def __init__(self, method: grpc.UnaryUnaryMultiCallable, request: object,
                 timeout: Optional[float], metadata: Metadata = ()) -> None:
        self._call = method.future(request, timeout=timeout, metadata=metadata)

    def cancel(self) -> None:
        """Cancel the call at the replica."""
        self._call.cancel()

    async def reply(self) -> Reply:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # Run by grpc's thread when the call ends (at once, here, if it has ended).
        self._call.add_done_callback(lambda call: _settle(loop, done, None))
        try:
            await done
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if self._call.cancelled():
            raise UpstreamCancelled("the load balancer cancelled the call to the replica")
        return self._call.result()  # raises the call's RpcError if it failed


_END = object()  # the queue's last item when a stream ended normally


class _Handoff:
    """Replies from the streams' threads to their queues on one event loop, with one
    wake-up of the loop per burst: every stream of a decode step gets its reply at about
    the same time, and a wake-up (a write to the loop's self-pipe, then its epoll
    return) per reply was a share of the load balancer's CPU per message."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: object) -> bool:
        """Queue ``item`` for ``queue`` (from any thread); False if the loop is closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the load balancer is shutting down
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_HANDOFFS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Handoff]" = \
    weakref.WeakKeyDictionary()


def _handoff(loop: asyncio.AbstractEventLoop) -> _Handoff:
    """The loop's one ``_Handoff`` (created on the loop's own thread)."""
    handoff = _HANDOFFS.get(loop)
    if handoff is None:
        handoff = _HANDOFFS[loop] = _Handoff(loop)
    return handoff


class ForwardedStream(Generic[Reply]):
    """A server-streaming call to a replica, iterated with ``async for``; ``cancel()``
    from the loop at any time. Iterating raises ``grpc.RpcError`` when the call failed
    and ``UpstreamCancelled`` after ``cancel()``; cancelling the iterating task cancels
    the call. Its thread ends when the call does."""

    def __init__(self, method: grpc.UnaryStreamMultiCallable, request: object,
                 timeout: Optional[float], metadata: Metadata = ()) -> None:
        self._handoff = _handoff(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Union[Reply, grpc.RpcError, object]] = asyncio.Queue()
        self._call = method(request, timeout=timeout, metadata=metadata)
        self._thread = threading.Thread(target=self._pull, name="forward-stream", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        """On the stream's thread: every reply, then the end or the error, to the queue."""
        try:
            for reply in self._call:
                self._put(reply)
        except grpc.RpcError as error:
            self._put(error)
        else:
            self._put(_END)

    def _put(self, item: object) -> None:
        if not self._handoff.put(self._queue, item):  # the load balancer is shutting down
            self._call.cancel()

    def cancel(self) -> None:
        """Cancel the call at the replica (its thread then ends)."""
        self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Reply]:
        return self

    async def __anext__(self) -> Reply:
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, grpc.RpcError):
            if self._call.cancelled():
                raise UpstreamCancelled("the load balancer cancelled the stream from the "
                                        "replica")
            raise item
        return item

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the stream's thread to end (tests); whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
