"""mii: persistent LLM deployments with DeepSpeed-MII's public API.

    client = mii.serve("path/or/hub-name", tensor_parallel=2, replica_num=2)
    client(["DeepSpeed is", "Seattle is"], max_new_tokens=128)
    mii.client("path/or/hub-name").terminate_server()
"""
# The submodules MII code reaches as attributes after a plain ``import mii``
# (``mii.config.ModelConfig``, ``mii.backend.client.MIIClient``, ``mii.constants``).
from mii import api, backend, batching, config, constants, errors
from mii_core.api.client import MIIClient
from mii_core.api.response import Response
from mii_core.api.serve import client, serve
from mii_core.config.models import GenerateParamsConfig, MIIConfig, ModelConfig
from mii_core.constants import DeploymentType, GenerationFinishReason, TaskType
from mii_core.control.pipeline import MIIPipeline, pipeline
from mii_core.plugins.discovery import hookimpl

__all__ = ["serve", "client", "pipeline", "MIIPipeline", "MIIClient", "ModelConfig",
           "MIIConfig", "GenerateParamsConfig", "TaskType", "DeploymentType",
           "GenerationFinishReason", "Response", "hookimpl", "errors", "api", "backend",
           "batching", "config", "constants"]
__version__ = "0.1.0"
