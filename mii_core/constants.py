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

GRPC_MAX_MSG_SIZE = 2**27
ENGINE_GROUP = "mii.engines"
SCHEDULER_GROUP = "mii.schedulers"
TRANSPORT_GROUP = "mii.transports"
PLUGIN_GROUP = "mii.plugins"
