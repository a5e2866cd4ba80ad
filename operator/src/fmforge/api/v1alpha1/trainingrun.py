"""TrainingRun: stage 2, train a foundation model from a pile version with Ray Train.

Spec and status models, read by the training stage, the CRD generator and the local runner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import CommonStatus, DataPileRef, ModelRef, ModelUri, RayResources, Rule, Spec, Status, exactly_one


class ModelConfig(Spec):
    """Explicit architecture sizes; each unset field takes the preset's value."""

    __rules__ = (
        Rule(
            cel="!has(self.hidden) || !has(self.heads) || self.hidden % self.heads == 0",
            message="hidden must be a multiple of heads",
            check=lambda m: m.hidden is None or m.heads is None or m.hidden % m.heads == 0,
        ),
    )

    layers: Annotated[int, Field(ge=1, le=128)] | None = None
    """Number of transformer blocks."""
    hidden: Annotated[int, Field(ge=8, le=16384)] | None = None
    """Hidden size."""
    heads: Annotated[int, Field(ge=1, le=128)] | None = None
    """Attention heads."""
    intermediate: Annotated[int, Field(ge=8, le=65536)] | None = None
    """Feed-forward size; unset: 4 × hidden (gpt2, bert) or about 8/3 × hidden (llama)."""
    context_length: Annotated[int, Field(ge=16, le=131072)] | None = None
    """Longest sequence the model reads; unset: the pile's sequence length."""


class ModelInit(Spec):
    """A pretrained model to continue training from."""

    __rules__ = (exactly_one("modelRef", "uri"),)

    model_ref: ModelRef | None = None
    """The model of a TrainingRun or TunedModel in the same namespace."""
    uri: ModelUri | None = None
    """A model by URI: a directory in Hugging Face layout or a GGUF file (file://, pvc://, s3://,
    or pkg:// for a model shipped in a package)."""


class Model(Spec):
    """Which model to train."""

    __rules__ = (
        Rule(
            cel="(self.architecture == 'encoder') == (self.family == 'bert')",
            message="architecture encoder goes with family bert; decoder with llama or gpt2",
            check=lambda m: (m.architecture == "encoder") == (m.family == "bert"),
        ),
        Rule(
            cel="!has(self.init) || (self.architecture == 'decoder' && !has(self.config.layers) && "
                "!has(self.config.hidden) && !has(self.config.heads) && !has(self.config.intermediate) && "
                "!has(self.config.contextLength))",
            message="model.init continues a pretrained decoder with its own sizes: leave config unset and "
                    "architecture decoder",
            check=lambda m: m.init is None or (m.architecture == "decoder" and not m.config.model_dump(
                exclude_none=True)),
        ),
    )

    architecture: Literal["decoder", "encoder"] = "decoder"
    """decoder (generative, causal LM) or encoder (masked LM)."""
    family: Literal["llama", "gpt2", "bert"] = "llama"
    """Model family, as in transformers."""
    preset: Literal["tiny", "small", "base"] = "tiny"
    """Starting sizes: tiny (4 layers, 256 hidden), small (8, 512), base (12, 768)."""
    config: ModelConfig = ModelConfig()
    """Sizes that override the preset."""
    init: ModelInit | None = None
    """Continue training this pretrained causal LM instead of starting from random weights
    (continued pretraining): its own family and sizes are used (family, preset and config do not
    apply). The pile must be tokenized with the model's tokenizer (DataPile tokenizer.uri naming
    the model): a pile whose vocabulary differs is refused before training."""


class Training(Spec):
    """The optimisation loop."""

    __rules__ = (
        Rule(
            cel="self.microBatchSize <= self.globalBatchSize",
            message="microBatchSize must be less than or equal to globalBatchSize",
            check=lambda m: m.micro_batch_size <= m.global_batch_size,
            field_path=".microBatchSize",
        ),
        Rule(
            cel="self.globalBatchSize % self.microBatchSize == 0",
            message="globalBatchSize must be a multiple of microBatchSize",
            check=lambda m: m.global_batch_size % m.micro_batch_size == 0,
            field_path=".globalBatchSize",
        ),
        Rule(
            cel="self.warmupSteps <= self.maxSteps",
            message="warmupSteps must be less than or equal to maxSteps",
            check=lambda m: m.warmup_steps <= m.max_steps,
            field_path=".warmupSteps",
        ),
    )

    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 300
    """Optimizer steps to take."""
    global_batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    """Sequences per optimizer step, over all workers (gradient accumulation makes up the rest)."""
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    """Sequences per forward pass on one worker."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 3.0e-4
    """Peak learning rate."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Steps of linear warm-up."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """AdamW weight decay."""
    gradient_clip: Annotated[float, Field(ge=0.0)] = 1.0
    """Gradient norm clipping; 0 disables it."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision; falls back to fp32 where the hardware lacks it, and says so."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Random seed."""
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    """Save a checkpoint every N steps; unset: at the end only."""
    mask_probability: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Share of tokens masked, for encoders."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model (the default); fsdp: parameters, gradients and
    optimizer state sharded over the workers, for models that do not fit one GPU (GPUs only)."""


class FaultTolerance(Spec):
    """Retries of failed workers."""

    max_failures: Annotated[int, Field(ge=0, le=100)] = 2
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""


class RayOptions(Spec):
    """Options of the RayJob on a cluster."""

    queue: Annotated[str, StringConstraints(max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")] = ""
    """Kueue LocalQueue name; empty: no queue label."""


class TrainingRunSpec(Spec):
    """What to train, on what, how."""

    data_pile_ref: DataPileRef
    """The pile version to train on."""
    model: Model = Model()
    """Architecture and sizes."""
    training: Training = Training()
    """The optimisation loop."""
    resources: RayResources = RayResources()
    """Ray Train workers."""
    fault_tolerance: FaultTolerance = FaultTolerance()
    """Failure handling."""
    ray: RayOptions = RayOptions()
    """RayJob options."""


class TrainingProgress(Status):
    """How far training is."""

    step: int = 0
    """Optimizer steps done."""
    max_steps: int | None = None
    """Optimizer steps in all."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float | None = None
    """Throughput over all workers."""
    eta: str | None = None
    """Estimated time left."""
    resumed_from_step: int | None = None
    """Step of the checkpoint the latest attempt resumed from; unset: it started at step 0."""


class ModelArtifact(Status):
    """A model in Hugging Face layout."""

    uri: str
    """Where the model directory is."""
    digest: str | None = None
    """sha256 over the model directory's files."""
    parameters: int | None = None
    """Number of parameters."""
    trainable_parameters: int | None = None
    """Parameters that were trained (LoRA: the adapters only)."""
    generation: int | None = None
    """metadata.generation of the object whose attempt made the model."""
    spec_digest: str | None = None
    """sha256 of the spec that made the model."""


class PileLineage(Status):
    """The pile version a model was trained on."""

    name: str
    """DataPile name."""
    snapshot_id: str | None = None
    """Iceberg snapshot id."""
    tag: str | None = None
    """Tag it was read by."""
    digest: str | None = None
    """Digest of the version."""
    sequences_snapshot_id: str | None = None
    """Snapshot id of the pile's sequences table that was read."""
    data_card: str | None = None
    """URI of the version's data card."""


class TrainingRunStatus(CommonStatus):
    """What the TrainingRun is."""

    progress: TrainingProgress | None = None
    """Training progress."""
    model: ModelArtifact | None = None
    """The trained model."""
    data_pile: PileLineage | None = None
    """The pile version it was trained on."""
    base: ModelArtifact | None = None
    """The pretrained model training continued from (model.init): uri and digest."""
    ray_job: str | None = None
    """RayJob of the current attempt (cluster only)."""
    precision: str | None = None
    """Precision training ran in; fp32 where the hardware lacks the one asked for (the message
    says so)."""
    validation_loss: float | None = None
    """Mean loss on the pile's validation split after training; unset when the split is empty."""
