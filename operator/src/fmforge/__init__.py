"""fmforge: a Kubernetes operator for the foundation-model workflow.

Five custom resources (DataPile, TrainingRun, ModelCard, TunedModel, Deployment) carry a model
from raw data to a served endpoint. This package holds the API models (`fmforge.api`), the
stages that do the work (`fmforge.stages`), where they run (`fmforge.runtime`), the Kubernetes
side (`fmforge.kube`) and the command line (`fmforge.cli`).
"""

__version__ = "0.1.0"
