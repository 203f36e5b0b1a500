"""Enumerations (``mii.constants.TaskType`` etc., as in DeepSpeed-MII)."""
from mii_core.constants import DeploymentType, GenerationFinishReason, TaskType

__all__ = ["DeploymentType", "GenerationFinishReason", "TaskType"]
