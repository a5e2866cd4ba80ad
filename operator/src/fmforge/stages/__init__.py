"""The work of each kind, as plain functions over typed configs (see `fmforge.stages.base`).

`STAGES` maps every kind to the `module:function` that runs its stage (checked at import: a kind
without a stage is a bug, not a state a user can meet). Stage modules import their heavy
dependencies (ray, torch, transformers, kserve) themselves, so importing this package stays cheap.
The inputs a spec names outside the graph (file://, pvc://, s3:// URIs) are fingerprinted by the
runner (`fmforge.runtime.fingerprint`), not by each stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..api.v1alpha1 import KINDS

#: kind → "module:function" of its stage.
STAGES: dict[str, str] = {
    "DataPile": "fmforge.stages.datapile:run",
    "TrainingRun": "fmforge.stages.train:run",
    "TunedModel": "fmforge.stages.tune:run",
    "ModelCard": "fmforge.stages.card:run",
    "Deployment": "fmforge.stages.deploy:run",
}

if set(STAGES) != set(KINDS):  # pragma: no cover - a kind added to the API without its stage
    raise ImportError(f"fmforge.stages.STAGES must name a stage for every kind; it has {sorted(STAGES)}, the API "
                      f"has {sorted(KINDS)}")


def stage_for(kind: str) -> Callable[..., Any]:
    """The stage function of `kind`: `run(ctx: StageContext) -> StageResult`. ImportError when the
    stage's packages are not installed (the runner names the extra to install)."""
    module_name, func = STAGES[kind].split(":")
    return getattr(importlib.import_module(module_name), func)
