"""The work of each kind, as plain functions over typed configs (see `fmforge.stages.base`).

`STAGES` maps a kind to the `module:function` that runs its stage. A kind that is not listed
has no stage yet: the runner ends such an object as Failed with reason NotImplemented and never
pretends it succeeded. Stage modules import their heavy dependencies (ray, torch, transformers,
kserve) themselves, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Callable

#: kind → "module:function" of the stages that have landed.
STAGES: dict[str, str] = {
    "DataPile": "fmforge.stages.datapile:run",
    "TrainingRun": "fmforge.stages.train:run",
    "ModelCard": "fmforge.stages.card:run",
}


def stage_for(kind: str) -> Callable | None:
    """The stage function of `kind`, or None when it has not been built yet."""
    target = STAGES.get(kind)
    if target is None:
        return None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
