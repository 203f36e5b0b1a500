"""Configuration models (``mii.config.ModelConfig`` etc., as in DeepSpeed-MII)."""
from mii_core.config.models import (
                             GenerateParamsConfig,
                             MIIConfig,
                             ModelConfig,
                             ReplicaConfig,
                             default_deployment_name,
)

__all__ = ["ModelConfig", "MIIConfig", "GenerateParamsConfig", "ReplicaConfig",
           "default_deployment_name"]
