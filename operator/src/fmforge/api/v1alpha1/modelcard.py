"""ModelCard: stage 3, benchmark a model against thresholds, render its card, approve or reject.

Spec and status models, read by the evaluation stage, the CRD generator and the local runner.
"""

from __future__ import annotations

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
            cel="self.type != 'prompts' || (has(self.uri) && !has(self.dataPileRef))",
            message="a prompts benchmark reads a JSONL file of {prompt, expected}: set uri, not dataPileRef",
            check=lambda m: m.type != "prompts" or (m.uri is not None and m.data_pile_ref is None),
        ),
    )

    name: Name
    """Name of the benchmark, unique in the card."""
    type: Literal["perplexity", "prompts"]
    """perplexity on a pile split, or prompts scored against expected answers."""
    data_pile_ref: BenchmarkPileRef | None = None
    """The pile split (perplexity)."""
    uri: DataUri | None = None
    """JSONL file with {prompt, expected} per line (prompts)."""
    metric: Literal["perplexity", "exact", "contains", "rougeL"] | None = None
    """prompts: exact, contains or rougeL; perplexity: perplexity (the default for it)."""
    threshold: Threshold
    """Bounds the metric must meet to pass."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Evaluate at most this many sequences or prompts; unset: all."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    """Tokens generated per prompt (prompts)."""


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
    """automatic: approved when every threshold passes; manual: also needs the annotation
    `fmforge.io/approved-by` on the ModelCard."""


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
