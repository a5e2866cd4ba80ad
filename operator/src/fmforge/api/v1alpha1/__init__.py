"""fmforge.io/v1alpha1: the API of fmforge as pydantic v2 models.

Specs and statuses of the five kinds, the shared types, and the kind table. Everything that
reads or writes an fmforge object imports from here.
"""

from .common import (
    API_VERSION,
    GROUP,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    VERSION,
    Condition,
    DataPileRef,
    ModelRef,
    RayResources,
    Rule,
    Threshold,
)
from .datapile import DataPileSpec, DataPileStatus
from .deployment import DeploymentSpec, DeploymentStatus
from .kinds import KIND_ORDER, KINDS, Column, KindInfo, Reference, kind_info
from .modelcard import ModelCardSpec, ModelCardStatus
from .trainingrun import TrainingRunSpec, TrainingRunStatus
from .tunedmodel import TunedModelSpec, TunedModelStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "MAX_NAME_LENGTH",
    "NAME_PATTERN",
    "Condition",
    "DataPileRef",
    "ModelRef",
    "RayResources",
    "Rule",
    "Threshold",
    "DataPileSpec",
    "DataPileStatus",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "ModelCardSpec",
    "ModelCardStatus",
    "TunedModelSpec",
    "TunedModelStatus",
    "DeploymentSpec",
    "DeploymentStatus",
    "KINDS",
    "KIND_ORDER",
    "KindInfo",
    "Column",
    "Reference",
    "kind_info",
]
