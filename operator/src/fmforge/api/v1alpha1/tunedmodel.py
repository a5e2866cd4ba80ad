"""TunedModel: stage 4, fine-tune a base model with local data turned into prompts.

Spec and status models, read by the tuning stage, the CRD generator and the local runner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import (
    CommonStatus,
    DataUri,
    ModelRef,
    ModelUri,
    RayResources,
    Rule,
    Spec,
    exactly_one,
)
from .trainingrun import ModelArtifact

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


class TuningData(Spec):
    """Local examples and how they become prompts."""

    uri: DataUri
    """A JSONL file (or directory of them) with one example per line."""
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


class TunedModelStatus(CommonStatus):
    """What the TunedModel is."""

    model: ModelArtifact | None = None
    """The tuned model."""
    base: ModelArtifact | None = None
    """The base model it started from."""
    examples: int | None = None
    """Training examples used."""
    validation_loss: float | None = None
    """Loss on the held-out examples."""
    ray_job: str | None = None
    """RayJob of the current attempt (cluster only)."""
