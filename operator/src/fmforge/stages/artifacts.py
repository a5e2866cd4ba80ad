"""Model artifacts as every stage reads and records them.

`model_digest` is the content digest of a model directory (what a ModelCard approves and a
Deployment serves), `file_digest` that of one file, `TRAINING_LOG` the file in every model
directory that says how it was made, and `producer_model` the model a producer (a TrainingRun
or TunedModel) recorded, as its consumers (the ModelCard, TunedModel and Deployment stages) read
it: checked to be there and to hold the bytes the recorded digest says.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .base import InputError, StageContext
from .uris import locate

#: Written into every model directory: how the model was made (hyperparameters, lineage, the
#: loss curve). The ModelCard stage reads it for the card.
TRAINING_LOG = "fmforge_training.json"


def _feed(h, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def model_digest(path: Path) -> str:
    """sha256 over a model directory: each file's relative path and content, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        _feed(h, f)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def file_digest(path: Path) -> str:
    """`sha256:…` of one file's bytes (a GGUF file, an edge package's files)."""
    h = hashlib.sha256()
    _feed(h, path)
    return "sha256:" + h.hexdigest()



def producer_model(ctx: StageContext, ref, field: str) -> tuple[Path, dict[str, Any]]:
    """The model directory a producer (`ref`: a ModelRef to a TrainingRun or TunedModel) recorded
    in its status, and that record ({uri, digest, ...}), checked to be there and unchanged;
    `field` is the reference's path in the spec, for the error messages."""
    key = f"{ref.kind}/{ref.name}"
    model = ((ctx.inputs.get(key) or {}).get("status") or {}).get("model") or {}
    if not model.get("uri") or not model.get("digest"):
        raise InputError(f"{field}: {key} has no model in its status; run it first")
    # A producer's artifact URI, written by fmforge: not confined to the manifest's folder.
    _, path = locate(model["uri"], ctx.base_dir, confine=False)
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
