"""The work of each kind, as plain functions over typed configs (see `fmforge.stages.base`).

`STAGES` maps a kind to the `module:function` that runs its stage; the module may also define
`fingerprint(spec, base_dir) -> str`, a cheap digest of the stage's inputs outside the graph
(source files), which the local runner adds to its skip check. A kind that is not listed
has no stage yet: the runner ends such an object as Failed with reason NotImplemented and never
pretends it succeeded. Stage modules import their heavy dependencies (ray, torch, transformers,
kserve) themselves, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: kind → "module:function" of the stages that have landed.
STAGES: dict[str, str] = {
    "DataPile": "fmforge.stages.datapile:run",
    "TrainingRun": "fmforge.stages.train:run",
    "TunedModel": "fmforge.stages.tune:run",
    "ModelCard": "fmforge.stages.card:run",
    "Deployment": "fmforge.stages.deploy:run",
}


@dataclass(frozen=True)
class Stage:
    """A stage as the runtimes call it."""

    run: Callable[..., Any]
    """`run(ctx: StageContext) -> StageResult`."""
    fingerprint: Callable[[Any, Path], str] | None
    """The module's `fingerprint(spec, base_dir)`, if it has one."""


def stage_for(kind: str) -> Stage | None:
    """The stage of `kind`, or None when it has not been built yet."""
    target = STAGES.get(kind)
    if target is None:
        return None
    module_name, func = target.split(":")
    module = importlib.import_module(module_name)
    return Stage(getattr(module, func), getattr(module, "fingerprint", None))
