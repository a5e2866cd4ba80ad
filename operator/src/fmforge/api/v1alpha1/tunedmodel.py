"""TunedModel: stage 4, fine-tune a base model with local data turned into prompts.

Spec and status models, read by the tuning stage, the CRD generator and the local runner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import (
    CommonStatus,
    DataPileRef,
    DataUri,
    ModelRef,
    ModelUri,
    RayResources,
    Name,
    Rule,
    Spec,
    Status,
    exactly_one,
)
from .trainingrun import FaultTolerance, ModelArtifact, PileLineage, TrainingProgress

Template = Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class BaseModelUri(Spec):
    """A base model given by location."""

    uri: ModelUri
    """Model directory in Hugging Face layout."""


class Lora(Spec):
    """Low-rank adapters (peft)."""

    rank: Annotated[int, Field(ge=1, le=1024)] = 8
    """Rank of the adapter matrices."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    """Scaling numerator (scale = alpha / rank)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapter input."""
    target_modules: Annotated[list[Annotated[str, StringConstraints(max_length=128)]], Field(max_length=64)] = []
    """Module names to adapt; empty: the attention projections of the family."""
    merge: bool = True
    """Merge the adapters into the weights of the published model (so it serves as a plain model)."""


class TuningPileRef(DataPileRef):
    """A DataPile version whose documents are the examples: each document is a record whose
    fields are the documents table's columns (`text`, `path`, `lang`, `prog_lang`, `source`, `id`…)."""

    max_documents: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    """Documents read at most (the first ones of the version, in its stored order): a tuning set
    is read whole on the driver, so a large pile is sampled, not loaded."""


class ConfigMapData(Spec):
    """A ConfigMap in the same namespace holding JSONL examples (on a cluster only)."""

    name: Name
    """Name of the ConfigMap."""
    key: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = \
        "examples.jsonl"
    """Key whose value is the JSONL examples (one JSON object per line)."""


class TuningData(Spec):
    """Where the examples come from, and how they become prompts."""

    __rules__ = (
        Rule(
            cel="[has(self.uri), has(self.dataPileRef), has(self.configMap)].filter(x, x).size() == 1",
            message="data needs exactly one of uri, dataPileRef or configMap",
            check=lambda m: sum(x is not None for x in (m.uri, m.data_pile_ref, m.config_map)) == 1,
        ),
    )

    uri: DataUri | None = None
    """A JSONL file (or directory of them) with one example per line."""
    data_pile_ref: TuningPileRef | None = None
    """A DataPile version whose documents are the examples; placeholders name its columns."""
    config_map: ConfigMapData | None = None
    """A ConfigMap key holding JSONL examples; the operator mounts it into the tuning pods
    (on a cluster only: `fmforge run` refuses it)."""
    prompt_template: Template = "{prompt}"
    """Python format string over an example's fields that makes the prompt."""
    completion_template: Template = " {completion}"
    """Format string that makes the completion (causal-lm); only it is trained on."""
    label_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "label"
    """Field with the class label (sequence-classification)."""
    validation_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    """Share of examples held out for validation."""


class TuningLoop(Spec):
    """The fine-tuning loop."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 3
    """Passes over the examples."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0e-3
    """Peak learning rate."""
    micro_batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    """Examples per forward pass."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Random seed."""


class TunedModelSpec(Spec):
    """What to tune, on what, how."""

    __rules__ = (
        exactly_one("baseModelRef", "baseModel"),
        Rule(
            cel="self.method == 'lora' || !has(self.lora)",
            message="lora settings apply to method lora only",
            check=lambda m: m.method == "lora" or m.lora is None,
        ),
    )

    base_model_ref: ModelRef | None = None
    """The model of a TrainingRun or TunedModel in the same namespace."""
    base_model: BaseModelUri | None = None
    """A model by URI (pvc://, s3://, file://, or pkg:// for a model shipped in a package)."""
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    """causal-lm (prompt and completion) or sequence-classification (text and label)."""
    method: Literal["lora", "full"] = "lora"
    """lora (adapters, peft) or full (every weight)."""
    lora: Lora | None = None
    """LoRA settings (method lora); unset: the defaults."""
    data: TuningData
    """The examples."""
    training: TuningLoop = TuningLoop()
    """The loop."""
    resources: RayResources = RayResources()
    """Ray workers."""
    fault_tolerance: FaultTolerance = FaultTolerance()
    """Worker failures Ray Train recovers from (resuming from the last epoch's checkpoint)."""


class Metrics(Status):
    """Held-out measurements of a model."""

    loss: float | None = None
    """Mean loss per scored token (causal-lm: completion tokens) or per example (classification)."""
    accuracy: float | None = None
    """Share of held-out examples classified right (sequence-classification)."""


class Validation(Status):
    """The held-out examples measured before and after tuning: whether the tuning helped."""

    examples: int = 0
    """Held-out examples measured."""
    before: Metrics | None = None
    """The starting point (the base model; for classification with its new, untrained head)."""
    after: Metrics | None = None
    """The tuned model."""


class TuningDataLineage(Status):
    """The examples a model was tuned on."""

    uri: str | None = None
    """Where they were read: the data.uri, or `configmap://NAME/KEY`; unset for a pile."""
    data_pile: PileLineage | None = None
    """The pile version they were read from (data.dataPileRef)."""
    digest: str
    """sha256 over the files' relative names and bytes; for a pile, the version's digest."""
    examples: int
    """Examples in all (training and validation)."""


class TunedModelStatus(CommonStatus):
    """What the TunedModel is."""

    progress: TrainingProgress | None = None
    """Tuning progress (optimizer steps over all epochs)."""
    model: ModelArtifact | None = None
    """The tuned model: a full Hugging Face model directory (for lora with merge: the merged
    weights), what a ModelCard evaluates and a Deployment serves; for lora without merge, the
    adapter directory."""
    adapter: ModelArtifact | None = None
    """The LoRA adapter directory (peft layout), method lora only."""
    base: ModelArtifact | None = None
    """The base model it started from (uri, digest)."""
    data: TuningDataLineage | None = None
    """The examples it was tuned on."""
    examples: int | None = None
    """Training examples used."""
    validation: Validation | None = None
    """Held-out loss and accuracy before and after tuning."""
    validation_loss: float | None = None
    """Loss on the held-out examples after tuning (validation.after.loss)."""
    ray_job: str | None = None
    """RayJob of the current attempt (cluster only)."""
