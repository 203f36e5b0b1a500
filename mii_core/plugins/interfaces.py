"""The roles that plugins fill, as typed protocols, and the objects passed between them.

- ``Engine`` loads a (possibly sharded) causal LM and its tokenizer on one rank.
- ``Scheduler`` picks the replica for each request in the load balancer.
- ``Transport`` serves a replica and the load balancer, and connects clients.
- ``GenerationService`` is what an engine side offers a transport: the transport
  never touches the model, the engine never touches the wire format.
- ``Connection`` is what a transport gives a client: the only calls ``MIIClient``
  makes on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import (Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Protocol,
                    Sequence, runtime_checkable)

from mii_core.api.response import Response
from mii_core.config.models import GenerateParamsConfig, MIIConfig, ModelConfig
from mii_core.routing.stats import ReplicaStats


@dataclass(frozen=True)
class RankInfo:
    """Who this process is inside its replica."""

    replica: int
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local index>"
    dist_port: int
    master_addr: str = "127.0.0.1"


@dataclass
class LoadedModel:
    """A model ready for forward passes, as an engine returns it."""

    model: Any  # torch.nn.Module with the Hugging Face causal-LM forward signature
    tokenizer: Any  # a Hugging Face tokenizer
    device: Any  # torch.device
    context_length: int  # longest prompt + generation the model accepts
    description: str = ""  # one line for the log


@runtime_checkable
class Engine(Protocol):
    """Loads a model on one rank. Registered in the ``mii.engines`` group."""

    name: str

    def setup_distributed(self, rank: RankInfo) -> None:
        """Join the replica's process group (only called when world_size > 1)."""

    def load(self, model_config: ModelConfig, rank: RankInfo) -> LoadedModel:
        """Load model and tokenizer for ``rank``; sharded if world_size > 1."""


@runtime_checkable
class Scheduler(Protocol):
    """Chooses a replica per request. Registered in ``mii.schedulers``; built as ``cls(replica_count)``."""

    name: str

    def pick(self, candidates: Sequence[int]) -> int:
        """Return one of ``candidates`` (healthy replica indices, never empty)."""

    def started(self, replica: int) -> None:
        """A request was sent to ``replica``."""

    def finished(self, replica: int) -> None:
        """A request on ``replica`` ended (any outcome)."""


@dataclass
class TokenEvent:
    """Progress of one prompt of a request, delivered to the request's sink."""

    index: int  # which prompt of the request
    text: str  # newly decoded text since the last event
    token_count: int  # tokens generated so far
    prompt_length: int
    finish_reason: Optional[str] = None  # set on the last event of the prompt
    time_to_first_token_s: Optional[float] = None
    total_time_s: Optional[float] = None
    error: Optional[BaseException] = None  # the prompt failed; finish_reason is "error"


@dataclass
class RequestInfo:
    """What hooks and metrics see of a request."""

    request_id: int
    prompt_count: int
    params: GenerateParamsConfig
    replica: int
    arrived_at: float
    prompt_tokens: List[int] = field(default_factory=list)  # token count of each prompt


class RequestHandle(Protocol):
    """Returned by ``GenerationService.submit``."""

    def cancel(self) -> None:
        """Stop generating for this request and free its batch slots."""


class GenerationService(Protocol):
    """The engine side of a replica, as seen by the transport on rank 0."""

    def submit(self, prompts: List[str], params: GenerateParamsConfig,
               sink: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue a request; raises InvalidGenerateParams / ServerOverloaded synchronously."""

    def stats(self) -> ReplicaStats:
        """Counters, queue depth, KV cache figures and serving metrics."""


@runtime_checkable
class Connection(Protocol):
    """A client's connection to a deployment (``Transport.connect``). Errors arrive as
    mii's exceptions (``mii_core.errors``), whatever the wire's own."""

    address: str

    def generate(self, prompts: List[str], params: GenerateParamsConfig,
                 timeout: Optional[float] = None) -> List[Response]:
        """One Response per prompt, in order."""

    def stream(self, prompts: List[str], params: GenerateParamsConfig,
               timeout: Optional[float] = None) -> Iterator[Response]:
        """Incremental Responses; ``.index`` says which prompt, the last of each has its
        ``finish_reason`` set."""

    async def agenerate(self, prompts: List[str], params: GenerateParamsConfig,
                        timeout: Optional[float] = None) -> List[Response]:
        """``generate`` for asyncio code."""

    def astream(self, prompts: List[str], params: GenerateParamsConfig,
                timeout: Optional[float] = None) -> AsyncIterator[Response]:
        """``stream`` for asyncio code."""

    def info(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The deployment's description and per-replica counters."""

    def terminate(self, timeout: float = 10.0) -> None:
        """Ask the deployment to stop."""

    def is_serving(self, timeout: float = 1.0) -> bool:
        """True if the deployment answers its health check as serving."""

    def close(self) -> None:
        """Release the connection."""


class Transport(Protocol):
    """Serves replicas and the load balancer and connects clients. Group ``mii.transports``."""

    name: str

    def serve_replica(self, service: GenerationService, config: MIIConfig, replica: int,
                      port: int, on_terminate: Callable[[], None],
                      host: str = "127.0.0.1") -> None:
        """Serve ``service`` on ``host``:``port`` until terminated (blocks)."""

    def serve_load_balancer(self, config: MIIConfig, replica_addresses: List[str],
                            scheduler: Scheduler, on_terminate: Callable[[], None]) -> None:
        """Serve the client-facing port, forwarding to replicas (blocks)."""

    def is_serving(self, address: str, timeout: float,
                   tls_root_cert: Optional[str] = None) -> bool:
        """True if the server at ``host:port`` answers its health check as serving."""

    def connect(self, host: str, port: int, token: Optional[str] = None,
                tls_root_cert: Optional[str] = None) -> Connection:
        """A client connection to the deployment at ``host:port``."""
