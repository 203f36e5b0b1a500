"""Configuration models (``mii.config.ModelConfig`` etc., as in DeepSpeed-MII)."""
from mii_core.config.models import (
    DEVICE_MAP_DEFAULT,
    GenerateParamsConfig,
    MIIConfig,
    ModelConfig,
    ReplicaConfig,
    default_deployment_name,
)
from mii_core.deploy.registry import get_mii_config

__all__ = ["ModelConfig", "MIIConfig", "GenerateParamsConfig", "ReplicaConfig",
           "DEVICE_MAP_DEFAULT", "default_deployment_name", "get_mii_config"]
