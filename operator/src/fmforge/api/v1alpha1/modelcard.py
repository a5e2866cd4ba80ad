"""ModelCard: stage 3, benchmark a model against thresholds, render its card, approve or reject.

Spec and status models, read by the evaluation stage, the CRD generator and the local runner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from ..status import Phase, is_done
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
    max_documents: Annotated[int, Field(ge=1, le=100_000)] = 200
    """For a model whose tokenizer is not the pile's: documents of the split read at most (the
    first ones, in the version's stored order), each tokenized with the model's tokenizer and
    scored in windows of the pile's sequence length. A model with the pile's tokenizer reads the
    packed sequences instead (bounded by maxSamples)."""


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
            cel="!has(self.format) || self.format == 'text' || self.type == 'prompts'",
            message="format chat applies to prompts benchmarks only",
            check=lambda m: m.format == "text" or m.type == "prompts",
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
    format: Literal["text", "chat"] = "text"
    """How each prompt reaches the model (prompts): text, as written; chat, as the user's turn
    of the model's chat template, the answer being the assistant's turn (as a Deployment's chat
    completions ask it). A model without a chat template is refused."""
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
    compare_base: bool = False
    """Also measure the model's base on every benchmark (the model a TunedModel was tuned from,
    or the one a TrainingRun's model.init started from; checked against its recorded digest) and
    show both in the card and in status.results[].baseValue. The thresholds judge the model
    only."""
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
    """Sequences, documents or prompts evaluated."""
    base_value: float | None = None
    """The same measurement of the model's base (compareBase)."""


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


#: Ready's reason while a ModelCard waits for a person, and that of a rejected model.
WAITING_FOR_APPROVAL = "WaitingForApproval"
REJECTED = "Rejected"
APPROVED = "Approved"


@dataclass(frozen=True)
class Verdict:
    """What a ModelCard's evaluation comes to: the phase and reason it ends in, and the approval."""

    phase: Phase
    """Succeeded (approved), Waiting (a manual approval is missing) or Failed (rejected)."""
    reason: str
    """Approved, WaitingForApproval or Rejected."""
    message: str
    """One line for people: the scores, why it was rejected, or how to approve it."""
    approved: bool
    """Whether the evaluated model may be deployed."""
    approved_by: str | None = None
    """`automatic`, or who approved it."""


def _bounds(th: Mapping[str, float] | None) -> str:
    th = th or {}
    return " and ".join(x for x in (f">= {th['min']}" if th.get("min") is not None else "",
                                    f"<= {th['max']}" if th.get("max") is not None else "") if x)


def card_verdict(kind_name: str, approval: str, results: Iterable[Mapping[str, Any]], model_digest: str,
                 annotations: Mapping[str, str]) -> Verdict:
    """The verdict on a ModelCard's `results` (status.results, wire form) for the model of
    `model_digest`: rejected when a threshold is missed, else approved or waiting as
    `decide_approval` says. One function for the stage (locally and in its pod) and the operator,
    which decides again from the annotations as they are now (an approval comes after the job)."""
    results = list(results)
    summary = ", ".join(f"{r['name']} {r['value']:.4g}" for r in results)
    failed = [f"{r['name']} {r['metric']} {r['value']:.4g} (needs {_bounds(r.get('threshold'))})"
              for r in results if not r.get("passed")]
    if failed:
        return Verdict(Phase.FAILED, REJECTED, f"model {model_digest} rejected: {'; '.join(failed)}", False)
    decision = decide_approval(kind_name, approval, True, model_digest, annotations)
    if not decision.approved:
        return Verdict(Phase.WAITING, WAITING_FOR_APPROVAL, decision.waiting, False)
    return Verdict(Phase.SUCCEEDED, APPROVED, f"approved ({decision.by}): {summary}", True, decision.by)


@dataclass(frozen=True)
class Gate:
    """Whether a model may be served: the ModelCard that approved exactly its digest, or why not."""

    card: str | None
    """Name of the ModelCard that approved the model; None when none did."""
    reason: str = ""
    """While closed: WaitingForApproval (a card evaluated this model and waits for a person) or
    WaitingForApprovedModelCard (no card approved it yet)."""
    message: str = ""
    """While closed: what is missing and what to do, naming the cards."""


def approval_gate(model: str, digest: str | None, cards: Mapping[str, Mapping[str, Any]]) -> Gate:
    """The governance gate of a Deployment, for the model `model` (`Kind/name`) of `digest`.

    `cards` maps each ModelCard name that evaluates the model to the card (an object or a local
    record: `status`, and `metadata` when known). The gate opens only for a card that is done for
    its current generation, approved, and evaluated exactly `digest`: one rule for the local
    Deployment stage and the operator. Pure."""
    kind, _, name = model.partition("/")
    for card_name, card in sorted(cards.items()):
        st = card.get("status") or {}
        generation = (card.get("metadata") or {}).get("generation")
        if is_done(st, generation) and st.get("approved") is True and digest and st.get("modelDigest") == digest:
            return Gate(card_name)
    if not cards:
        return Gate(None, "WaitingForApprovedModelCard",
                    f"no ModelCard evaluates {model}; create one with modelRef {{kind: {kind}, name: {name}}}, or "
                    f"set requireApprovedModelCard: false")
    seen, reason = [], "WaitingForApprovedModelCard"
    for card_name, card in sorted(cards.items()):
        st = card.get("status") or {}
        evaluated = st.get("modelDigest")
        if evaluated and evaluated != digest:
            seen.append(f"ModelCard/{card_name} evaluated model {evaluated}, not {digest}")
        elif _waiting_for_approval(st):
            reason = WAITING_FOR_APPROVAL
            seen.append(f"ModelCard/{card_name} waits for a person: {st.get('message') or 'approve it'}")
        elif not is_done(st, (card.get("metadata") or {}).get("generation")):
            seen.append(f"ModelCard/{card_name} is {st.get('phase') or 'Pending'}"
                        + (f" ({st['message']})" if st.get("message") else ""))
        else:
            seen.append(f"ModelCard/{card_name} did not approve it")
    return Gate(None, reason, f"waiting for an approved ModelCard of {model} at digest {digest or '(none)'}: "
                              + "; ".join(seen))


def _waiting_for_approval(status: Mapping[str, Any]) -> bool:
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return status.get("phase") == Phase.WAITING and ready.get("reason") == WAITING_FOR_APPROVAL
