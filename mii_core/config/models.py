"""Configuration models with DeepSpeed-MII 0.3's field names, defaults and constraints.

``ModelConfig`` and ``MIIConfig`` describe a deployment; ``GenerateParamsConfig``
describes one generate call. All reject unknown fields. Fields that are ours and
not MII's are marked "(mii extension)".
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mii_core.constants import (
    DEFAULT_ENGINE,
    DEFAULT_HOSTFILE,
    DEFAULT_PORT,
    DEFAULT_RESTFUL_API_PORT,
    DEFAULT_SCHEDULER,
    DEFAULT_TORCH_DIST_PORT,
    DEFAULT_ZMQ_PORT,
    DEFAULT_TRANSPORT,
    DeploymentType,
    TaskType,
    WIRE_INT_MAX,
)

DEVICE_MAP_DEFAULT = "auto"
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


def _port(default: int) -> Any:
    return Field(default, ge=1, le=65535)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              protected_namespaces=(), populate_by_name=True)


class GenerateParamsConfig(_Strict):
    """Options of one generate call (per request)."""

    prompt_length: int = Field(0, ge=0)
    """Tokens in the prompt; filled in by the server (the client refuses it as an argument)."""
    max_length: Optional[int] = Field(None, gt=0, le=WIRE_INT_MAX)
    """Maximum of prompt tokens + generated tokens; None: the served context
    (``ModelConfig.max_length``, else the model's), as DeepSpeed-MII's server fills it.
    At most 2**63 - 1, as every integer parameter (the wire carries them as int64)."""
    max_new_tokens: Optional[int] = Field(None, gt=0, le=WIRE_INT_MAX)
    """Maximum number of generated tokens; the smaller of this and what ``max_length`` leaves applies."""
    min_new_tokens: int = Field(0, ge=0, le=WIRE_INT_MAX)
    """Minimum number of generated tokens before EOS or a stop string may end generation."""
    stream: bool = False
    """Stream output (set by the client's streaming calls)."""
    ignore_eos: bool = False
    """Keep generating past EOS until a length limit is reached."""
    return_full_text: bool = False
    """Prepend the prompt to the generated text."""
    do_sample: bool = True
    """Sample; ``False`` means greedy decoding."""
    top_p: float = Field(0.9, gt=0, le=1, allow_inf_nan=False)
    """Nucleus sampling probability mass."""
    top_k: Optional[int] = Field(None, gt=0, le=WIRE_INT_MAX)
    """Sample among the k most likely tokens."""
    temperature: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    """Softmax temperature (finite)."""
    seed: Optional[int] = Field(None, ge=0, le=WIRE_INT_MAX)
    """Seed of this request's sampling (a mii extension): the same seed draws the same
    random numbers at the same token index, so a request served alone reproduces its
    tokens on the same hardware. None: unseeded."""
    stop: List[str] = []
    """Strings that end generation; the text is cut before the first one found."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: List[str]) -> List[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return sorted(value)

    @model_validator(mode="after")
    def _check_lengths(self) -> "GenerateParamsConfig":
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        if (self.prompt_length and self.max_length is not None
                and self.max_length <= self.prompt_length):
            raise ValueError(f"max_length ({self.max_length}) must be greater than "
                             f"prompt_length ({self.prompt_length})")
        return self

    def new_token_budget(self, prompt_length: int, context_length: int) -> int:
        """Tokens that may be generated for a prompt of ``prompt_length`` tokens."""
        budget = min(self.max_length or context_length, context_length) - prompt_length
        if self.max_new_tokens is not None:
            budget = min(budget, self.max_new_tokens)
        return budget


class ReplicaConfig(_Strict):
    """Placement and ports of one replica (generated unless given)."""

    hostname: str = ""
    tensor_parallel_ports: List[int] = []
    torch_dist_port: Optional[int] = None
    gpu_indices: List[int] = []
    zmq_port: Optional[int] = None
    """MII's ZMQ port of the replica; accepted, unused (mii's ranks talk over torch.distributed)."""


class ModelConfig(_Strict):
    """What model to serve and how to place it."""

    model_name_or_path: str
    """Hugging Face hub name or local directory of the model."""
    tokenizer: Optional[str] = None
    """Tokenizer name or path; defaults to ``model_name_or_path``."""
    task: Optional[TaskType] = TaskType.TEXT_GENERATION
    """Task served; only text generation exists."""
    tensor_parallel: int = Field(1, gt=0)
    """Devices (processes) one replica is sharded over."""
    quantization_mode: Optional[str] = None
    """Quantization mode; engines that do not support it reject it at load."""
    inference_engine_config: Dict[str, Any] = {}
    """Engine-specific options, passed to the engine unchanged."""
    torch_dist_port: int = _port(DEFAULT_TORCH_DIST_PORT)
    """Base torch.distributed port; replica i uses ``torch_dist_port + 100 * i``."""
    zmq_port_number: int = _port(DEFAULT_ZMQ_PORT)
    """MII's base ZMQ port; accepted so that MII configurations load, unused here."""
    replica_num: int = Field(1, gt=0)
    """Number of model replicas behind the load balancer."""
    replica_configs: List[ReplicaConfig] = []
    """Per-replica placement; generated when empty."""
    device_map: Union[Literal["auto"], Dict[str, List[List[int]]]] = DEVICE_MAP_DEFAULT
    """``"auto"`` or ``{host: [[device ids of replica 0], [of replica 1], ...]}``."""
    max_length: Optional[int] = Field(None, gt=0)
    """Longest sequence (prompt + generated) the engine accepts; default: the model's."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16. (mii extension)"""
    sync_debug: bool = False
    """Synchronize the device after every step, so errors surface at the step that caused them."""
    profile_model_time: bool = False
    """Log the mean model time per step every 100 steps (synchronizes the device each step)."""
    engine: str = DEFAULT_ENGINE
    """Engine plugin name from the ``mii.engines`` group; auto = deepspeed (if it imports) for tensor_parallel > 1 or inference_engine_config, else transformers. (mii extension)"""
    kv_cache: Literal["auto", "dynamic", "static", "paged"] = "auto"
    """``auto``: ``paged`` on a GPU, ``dynamic`` on CPU (and on a GPU for a model the paged
    cache cannot serve, with the reason logged). ``paged``: one pool of fixed-size blocks
    (``gpu_memory_utilization``), chunked prefill, prefix caching, CUDA graphs and a
    compiled decoder layer on a GPU. ``dynamic``: transformers' cache, growing per step.
    ``static``: one preallocated slot of ``max_length`` tokens per batch row (without
    ``max_length`` on one GPU: as long as half the free memory allows), CUDA graphs for
    decode and prefill. (mii extension)"""
    cuda_graphs: bool = True
    """Replay steps from CUDA graphs (``paged``/``static`` on a GPU, tensor_parallel=1). (mii extension)"""
    torch_compile: Optional[bool] = None
    """``torch.compile`` one decoder layer for all layers (fused kernels; compiled before the
    deployment is ready). None: on for the paged cache on a GPU, off otherwise. Applies to
    ``paged`` and ``static`` with tensor_parallel=1. (mii extension)"""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of the GPU's memory the replica may use in all (weights, activations, KV cache);
    the paged cache takes what is left of it. (mii extension)"""
    kv_block_size: Literal[8, 16, 32, 64] = 16
    """Tokens per block of the paged KV cache. (mii extension)"""
    kv_blocks: Optional[int] = Field(None, ge=4)
    """Blocks in the paged KV cache; default: from ``gpu_memory_utilization`` on a GPU,
    ``max_batch_size`` x min(context, 4096) tokens on CPU. (mii extension)"""
    prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes that earlier requests computed (paged cache). (mii extension)"""
    max_batch_size: Optional[int] = Field(None, gt=0)
    """Most sequences generated together; None: 256 with the paged cache, 64 otherwise. (mii extension)"""
    prefill_chunk_tokens: Optional[int] = Field(None, ge=16, le=65536)
    """Tokens one step feeds while other sequences decode, their own one token each
    included: the paged cache feeds a longer prompt in chunks across steps, the row caches
    take whole prompts within it. Larger prefills long prompts faster, smaller delays the
    decoding sequences' next token less. None: 8192. (mii extension)"""

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map_as_dict(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("device_map must be 'auto', a device id, a list of ids, or "
                             "{host: [[ids of replica 0], ...]}")
        if isinstance(value, int):
            return {"localhost": [[value]]}
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return {"localhost": [value]}
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return {"localhost": value}
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        return value

    @field_validator("model_name_or_path")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value:
            raise ValueError("model_name_or_path must be provided")
        return value

    @model_validator(mode="after")
    def _fill_and_check(self) -> "ModelConfig":
        if not self.tokenizer:
            object.__setattr__(self, "tokenizer", self.model_name_or_path)
        if self.replica_configs and len(self.replica_configs) != self.replica_num:
            raise ValueError(f"replica_configs has {len(self.replica_configs)} entries but "
                             f"replica_num is {self.replica_num}; they must match")
        return self


DEPLOYMENT_NAME_MAX = 200
_NAME_PART = "[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(f"{_NAME_PART}(?:/{_NAME_PART})*")
_DEFAULT_SUFFIX = "-mii-deployment"


def check_deployment_name(name: str) -> str:
    """``name`` if it is a deployment name, else ValueError stating the rule. Names are
    parts of letters, digits, '.', '_' and '-' separated by '/' (a hub name's default),
    each starting with a letter or digit: so a name is never taken for ``host:port``,
    never hides its files (a leading '.') or climbs out of ``$MII_HOME`` ('..'), and
    cannot forge a log line or a row of ``mii list`` (no newline, NUL or control
    character)."""
    if len(name) <= DEPLOYMENT_NAME_MAX and _NAME.fullmatch(name):
        return name
    raise ValueError(f"must be 1-{DEPLOYMENT_NAME_MAX} characters: letters, "
                     "digits, '.', '_' and '-', in parts separated by '/' (as in "
                     "'org/model-mii-deployment'), each part starting with a letter or digit "
                     "(':' is reserved for host:port addresses)")


def default_deployment_name(model_name_or_path: str) -> str:
    """MII's rule: the model directory's base name (or the hub name) + ``-mii-deployment``;
    characters that ``check_deployment_name`` refuses become '-' (hub names have none)."""
    path = model_name_or_path.rstrip("/")
    name = os.path.basename(path) if os.path.exists(path) else path
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", part).lstrip("._-") for part in name.split("/")]
    name = "/".join(part for part in parts if part) or "model"
    return name[:DEPLOYMENT_NAME_MAX - len(_DEFAULT_SUFFIX)].rstrip("/") + _DEFAULT_SUFFIX


class MIIConfig(_Strict):
    """How the deployment is served."""

    deployment_name: str = ""
    """Name clients reconnect by; defaults from the model name (``<model>-mii-deployment``).
    At most 200 characters: letters, digits, '.', '_' and '-', in parts separated by '/',
    each part starting with a letter or digit (so never ``host:port``)."""
    deployment_type: DeploymentType = DeploymentType.LOCAL
    """Only LOCAL (a persistent local deployment) is served."""
    model_conf: ModelConfig = Field(alias="model_config")
    """The model configuration (key ``model_config``)."""
    port_number: int = _port(DEFAULT_PORT)
    """Client-facing port of the load balancer; a free one is picked if the default is busy."""
    enable_restful_api: bool = False
    """Start the REST gateway."""
    restful_api_host: str = "localhost"
    """Host the REST gateway binds."""
    restful_api_port: int = _port(DEFAULT_RESTFUL_API_PORT)
    """Port of the REST gateway."""
    restful_processes: int = Field(32, ge=1)
    """Generate requests the REST gateway forwards at a time (more wait); the gateway is one asyncio process."""
    hostfile: str = DEFAULT_HOSTFILE
    """DeepSpeed hostfile for multi-node placement; without it, this host only."""
    scheduler: str = DEFAULT_SCHEDULER
    """Scheduler plugin name from ``mii.schedulers``. (mii extension)"""
    transport: str = DEFAULT_TRANSPORT
    """Transport plugin name from ``mii.transports``. (mii extension)"""
    host: str = "127.0.0.1"
    """Address the client-facing server binds. (mii extension)"""
    startup_timeout: float = Field(600.0, gt=0)
    """Seconds serve() waits for the deployment to answer. (mii extension)"""
    max_queue_size: int = Field(1024, gt=0)
    """Prompts a replica holds waiting (being tokenized, queued, or waiting for a batch
    slot) before it answers RESOURCE_EXHAUSTED; prompts count, not requests, so one request
    of many prompts takes as much room as as many requests. A request of more prompts than
    this could never be queued and is refused at once (INVALID_ARGUMENT). (mii extension)"""
    # A 128k-token context holds about 0.5 MiB of English text (~4 bytes a token) and a
    # 1M-token one about 4 MiB: 8 MiB is twice the longest context served today, or 8 KiB a
    # prompt for a full batch of max_prompts_per_request. A replica tokenizes what it is
    # sent before it knows the token count (with the tiny test model's tokenizer ~1.8 s of
    # one core and ~0.2 GiB of peak memory a MiB), so this bounds what one request can cost
    # before it is refused. The upper bounds keep the servers' gRPC message limit (this +
    # 16 bytes a prompt + 1 MiB) inside grpc's int32 option.
    max_request_bytes: int = Field(8 * 2 ** 20, gt=0, le=2 ** 30)
    """Bytes of prompt text (UTF-8, all prompts together) one request may carry; checked
    by the client, the load balancer and the replica before anything is tokenized, and
    sets the servers' gRPC message limit (this plus room for parameters). (mii extension)"""
    max_prompts_per_request: int = Field(1024, gt=0, le=2 ** 20)
    """Prompts one request may carry (the smaller of this and ``max_queue_size`` applies);
    checked by the client, the load balancer and the replica before anything is
    tokenized. (mii extension)"""
    auth_token: Optional[str] = None
    """Shared secret every call must carry (gRPC metadata / HTTP bearer); None: no check.
    Kept in the registry record (mode 0600) so ``mii.client(name)`` reconnects. (mii extension)"""
    tls_cert_file: Optional[str] = None
    """PEM certificate of the client-facing server; with ``tls_key_file`` enables TLS. (mii extension)"""
    tls_key_file: Optional[str] = None
    """PEM private key matching ``tls_cert_file``. (mii extension)"""
    version: int = 1
    """MII's configuration version; accepted so that MII configurations load."""
    instance_type: str = "Standard_NC12s_v3"
    """MII's AzureML instance type (its AML deployments); accepted, unused."""
    max_restarts: int = Field(3, ge=0)
    """Restarts of a crashed child (replica or load balancer) before the deployment stops. (mii extension)"""

    @field_validator("deployment_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_deployment_name(value) if value else value  # "": the default, below

    @model_validator(mode="after")
    def _fill_name(self) -> "MIIConfig":
        if not self.deployment_name:
            object.__setattr__(self, "deployment_name",
                               default_deployment_name(self.model_conf.model_name_or_path))
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.deployment_type != DeploymentType.LOCAL:
            raise ValueError(f"deployment_type {self.deployment_type.value!r} is not supported; "
                             "use 'local'")
        return self

    def generate_replica_configs(self) -> None:
        """Fill ``model_config.replica_configs`` from ``device_map`` and the hostfile (this
        host alone without one), as DeepSpeed-MII's method does: replica i gets ports
        ``port_number + i * tensor_parallel + 1 ...``, ``torch_dist_port + 100 * i`` and
        its devices. Nothing changes if they are given; ValueError when the map does not
        fit the hosts' devices."""
        model = self.model_conf
        if model.replica_configs:
            return
        # The placement rule lives with the deployment's resources; imported here because
        # they import this module.
        from mii_core.deploy.devices import allocate, count_local_gpus, local_pool, read_hostfile

        pool = read_hostfile(self.hostfile) or local_pool(count_local_gpus())
        placements = allocate(pool, model.tensor_parallel, model.replica_num, model.device_map)
        tp = model.tensor_parallel
        model.replica_configs = [
            ReplicaConfig(hostname=placement.hostname,
                          tensor_parallel_ports=list(range(self.port_number + i * tp + 1,
                                                           self.port_number + i * tp + 1 + tp)),
                          torch_dist_port=model.torch_dist_port + 100 * i,
                          gpu_indices=list(placement.gpu_indices),
                          zmq_port=model.zmq_port_number + i)
            for i, placement in enumerate(placements)]

    def to_json(self) -> str:
        """Serialize for the registry and child processes (by alias, so it round-trips)."""
        return self.model_dump_json(by_alias=True)
