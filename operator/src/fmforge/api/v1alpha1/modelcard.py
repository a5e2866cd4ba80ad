"""ModelCard: stage 3, benchmark a model against thresholds, render its card, approve or reject.

Spec and status models, read by the evaluation stage, the CRD generator and the local runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import (
    CommonStatus,
    DataPileRef,
    DataUri,
    ModelRef,
    Name,
    Rule,
    Spec,
    Status,
    Threshold,
    unique_names,
)

Text = Annotated[str, StringConstraints(max_length=8192)]


class BenchmarkPileRef(DataPileRef):
    """A DataPile version and which of its splits to evaluate on."""

    split: Literal["train", "validation"] = "validation"
    """Which split of the pile."""


class Benchmark(Spec):
    """One measurement of the model and the bounds it must meet."""

    __rules__ = (
        Rule(
            cel="self.type != 'perplexity' || (has(self.dataPileRef) && !has(self.uri))",
            message="a perplexity benchmark reads a pile: set dataPileRef, not uri",
            check=lambda m: m.type != "perplexity" or (m.data_pile_ref is not None and m.uri is None),
        ),
        Rule(
            cel="self.type != 'maskedTokens' || (has(self.dataPileRef) && !has(self.uri))",
            message="a maskedTokens benchmark reads a pile: set dataPileRef, not uri",
            check=lambda m: m.type != "maskedTokens" or (m.data_pile_ref is not None and m.uri is None),
        ),
        Rule(
            cel="!has(self.metric) || (self.type == 'perplexity' ? self.metric == 'perplexity' : "
                "self.type == 'maskedTokens' ? self.metric == 'accuracy' : "
                "self.metric in ['exact', 'contains', 'rougeL'])",
            message="metric must fit the type: perplexity for perplexity, accuracy for maskedTokens, "
                    "exact, contains or rougeL for prompts",
            check=lambda m: m.metric is None or m.metric == {"perplexity": "perplexity", "maskedTokens": "accuracy"}
            .get(m.type, m.metric if m.metric in ("exact", "contains", "rougeL") else None),
        ),
        Rule(
            cel="self.type != 'prompts' || (has(self.uri) && !has(self.dataPileRef))",
            message="a prompts benchmark reads a JSONL file of {prompt, expected}: set uri, not dataPileRef",
            check=lambda m: m.type != "prompts" or (m.uri is not None and m.data_pile_ref is None),
        ),
    )

    name: Name
    """Name of the benchmark, unique in the card."""
    type: Literal["perplexity", "prompts", "maskedTokens"]
    """perplexity on a pile split; prompts scored against expected answers (decoders); or
    maskedTokens, the share of masked tokens of a pile split an encoder predicts right."""
    data_pile_ref: BenchmarkPileRef | None = None
    """The pile split (perplexity)."""
    uri: DataUri | None = None
    """JSONL file with {prompt, expected} per line (prompts)."""
    metric: Literal["perplexity", "accuracy", "exact", "contains", "rougeL"] | None = None
    """prompts: exact, contains (the default) or rougeL; perplexity: perplexity; maskedTokens:
    accuracy."""
    threshold: Threshold
    """Bounds the metric must meet to pass."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Evaluate at most this many sequences or prompts; unset: all."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    """Tokens generated per prompt (prompts)."""
    mask_probability: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Share of tokens masked (maskedTokens; perplexity of an encoder)."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the masking, so that two evaluations of a model mask the same tokens."""


class Card(Spec):
    """What the rendered card says beyond the measurements."""

    description: Text = ""
    """What the model is."""
    intended_use: Text = ""
    """What it is for."""
    limitations: Text = ""
    """What it is not for, and known weaknesses."""
    license: Annotated[str, StringConstraints(max_length=64)] = ""
    """Licence of the model (SPDX id or a Hugging Face licence name)."""
    owners: Annotated[list[Annotated[str, StringConstraints(max_length=256)]], Field(max_length=32)] = []
    """People or teams responsible for it."""


class ModelCardSpec(Spec):
    """Which model to validate, how, and how it is approved."""

    __rules__ = (unique_names("benchmarks"),)

    model_ref: ModelRef
    """The model to validate."""
    benchmarks: Annotated[
        list[Benchmark],
        Field(
            min_length=1,
            max_length=32,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        ),
    ]
    """Benchmarks; at least one, names unique."""
    card: Card = Card()
    """Text of the card."""
    approval: Literal["automatic", "manual"] = "automatic"
    """automatic: approved when every threshold passes; manual: also needs a person's approval of
    exactly the evaluated model: the annotations `fmforge.io/approved-by` (who) and
    `fmforge.io/approved-digest` (status.modelDigest) on a cluster, `fmforge approve` locally."""


class BenchmarkResult(Status):
    """The outcome of one benchmark."""

    name: str
    """Benchmark name."""
    metric: str
    """Metric measured."""
    value: float
    """Measured value."""
    threshold: Threshold | None = None
    """Bounds it was held to."""
    passed: bool
    """Whether the value is within the bounds."""
    samples: int | None = None
    """Sequences or prompts evaluated."""


class CardRef(Status):
    """Where the rendered card is."""

    uri: str | None = None
    """Markdown card in the artifact store."""
    config_map: str | None = None
    """ConfigMap holding the card (cluster only)."""


class ModelCardStatus(CommonStatus):
    """What the ModelCard found."""

    results: list[BenchmarkResult] = []
    """One result per benchmark."""
    approved: bool | None = None
    """Whether the model is approved for deployment."""
    approved_by: str | None = None
    """Who approved it: `automatic`, or the value of the fmforge.io/approved-by annotation."""
    model_digest: str | None = None
    """Digest of exactly the model that was evaluated; a Deployment serves only this digest."""
    card: CardRef | None = None
    """The rendered card."""


#: Annotations of a manual approval: who approved, and the digest of the model they approved.
APPROVED_BY = "fmforge.io/approved-by"
APPROVED_DIGEST = "fmforge.io/approved-digest"


@dataclass(frozen=True)
class Approval:
    """Whether an evaluated model is approved, by whom, or what it waits for."""

    approved: bool
    by: str | None = None
    waiting: str = ""
    """Non-empty while a manual approval is missing: what a person must do."""


def decide_approval(kind_name: str, approval: str, passed: bool, model_digest: str,
                    annotations: Mapping[str, str]) -> Approval:
    """The approval of a ModelCard whose benchmarks `passed` (all of them) or not.

    One function for the stage, the local `fmforge approve` and the operator, so that all three
    bind an approval to the same thing: the digest of the evaluated model. An approval of an
    earlier model (another digest) does not carry over to a new one."""
    if not passed:
        return Approval(False)
    if approval == "automatic":
        return Approval(True, "automatic")
    who, digest = annotations.get(APPROVED_BY), annotations.get(APPROVED_DIGEST)
    if who and digest == model_digest:
        return Approval(True, who)
    name = kind_name.split("/", 1)[-1]
    stale = f" (the approval by {who} was for {digest or 'no digest'}, not this model)" if who else ""
    return Approval(False, waiting=(
        f"every threshold passed; waiting for a manual approval of model {model_digest}{stale}: run "
        f"`fmforge approve {kind_name} --by NAME` locally, or on a cluster `kubectl annotate modelcard {name} "
        f"{APPROVED_BY}=NAME {APPROVED_DIGEST}={model_digest}`"))
