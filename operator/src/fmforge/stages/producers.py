"""The model a producer (a TrainingRun or TunedModel) recorded, as its consumers read it.

`producer_model` turns a `ModelRef` into the model directory its producer's status names,
checked to be there and to hold the bytes the recorded digest says. Called by the ModelCard
stage (`spec.modelRef`) and the TunedModel stage (`spec.baseModelRef`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import InputError, StageContext
from .datapile.sources import resolve as resolve_uri
from .train import model_digest


def producer_model(ctx: StageContext, ref, field: str) -> tuple[Path, dict[str, Any]]:
    """The model directory a producer (`ref`: a ModelRef to a TrainingRun or TunedModel) recorded
    in its status, and that record ({uri, digest, ...}), checked to be there and unchanged;
    `field` is the reference's path in the spec, for the error messages."""
    key = f"{ref.kind}/{ref.name}"
    model = ((ctx.inputs.get(key) or {}).get("status") or {}).get("model") or {}
    if not model.get("uri") or not model.get("digest"):
        raise InputError(f"{field}: {key} has no model in its status; run it first")
    # A producer's artifact URI, written by fmforge: not confined to the manifest's folder.
    _, path = resolve_uri(model["uri"], ctx.base_dir, confine=False)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{field}: the model of {key} is not at {model['uri']} (no config.json); run {key} again")
    # What is recorded downstream (an approval, a tuned model's lineage) must be the digest of
    # the bytes actually read.
    actual = model_digest(path)
    if actual != model["digest"]:
        raise InputError(f"{field}: the model directory of {key} changed after it was made (digest {actual}, "
                         f"recorded {model['digest']}); run {key} again")
    return path, model
