"""Enumerations and defaults shared by every process of a deployment."""
from enum import Enum


class DeploymentType(str, Enum):
    """Where a deployment runs (names and values as in DeepSpeed-MII)."""

    LOCAL = "local"
    AML = "aml"
    NON_PERSISTENT = "non-persistent"


class TaskType(str, Enum):
    """The task a deployment serves."""

    TEXT_GENERATION = "text-generation"


class GenerationFinishReason(str, Enum):
    """Why generation of one prompt ended."""

    STOP = "stop"  # an EOS token or a stop string
    LENGTH = "length"  # max_new_tokens or max_length reached
    CANCELLED = "cancelled"  # the client went away or cancelled
    NONE = "none"  # still generating (streamed chunks)


DEFAULT_PORT = 50050
DEFAULT_TORCH_DIST_PORT = 29500
DEFAULT_ZMQ_PORT = 25555  # MII's; accepted and recorded, unused here (no ZMQ)
DEFAULT_RESTFUL_API_PORT = 51080
DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_ENGINE = "auto"
DEFAULT_SCHEDULER = "round_robin"
DEFAULT_TRANSPORT = "grpc"

# The largest gRPC message a client or the load balancer receives (replies: a unary reply
# of many prompts with return_full_text carries them all back). What a server receives is
# bounded by the deployment's request limits instead (mii_transport/grpc/server.py).
GRPC_MAX_MSG_SIZE = 2**27
# proto/mii.proto carries max_length, max_new_tokens, min_new_tokens, top_k and seed as
# int64: a larger value cannot be encoded (protobuf raises "Value out of range").
WIRE_INT_MAX = 2**63 - 1
# The longest per-call timeout (seconds) a client accepts: longer than any generate runs
# (a 128k-token output at 2 tokens/s takes 18 h). grpc hands the core the absolute
# deadline as int64 nanoseconds since the epoch, so a timeout beyond about 7.4e9 s
# (2**63 ns from the epoch, in the year 2262) wraps into the past and the call fails at
# once with DEADLINE_EXCEEDED; this bound keeps far inside that.
MAX_TIMEOUT_S = 86400.0
ENGINE_GROUP = "mii.engines"
SCHEDULER_GROUP = "mii.schedulers"
TRANSPORT_GROUP = "mii.transports"
PLUGIN_GROUP = "mii.plugins"
