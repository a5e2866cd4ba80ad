"""The five kinds: names, short names, printer columns, child-name suffixes and references.

One table that the CRD generator, the manifest loader, the local runner's graph and `fmforge get`
read, so that a kind is described in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .common import CommonStatus, Spec
from .datapile import DataPileSpec, DataPileStatus
from .deployment import DeploymentSpec, DeploymentStatus
from .modelcard import ModelCardSpec, ModelCardStatus
from .trainingrun import TrainingRunSpec, TrainingRunStatus
from .tunedmodel import TunedModelSpec, TunedModelStatus


@dataclass(frozen=True)
class Column:
    """A printer column: kubectl's and `fmforge get`'s table."""

    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Reference:
    """An edge of the pipeline graph: this object reads `kind/name`."""

    kind: str
    name: str
    field: str
    """Field path of the reference in the spec, for error messages."""
    tag: str | None = None
    snapshot_id: str | None = None


@dataclass(frozen=True)
class KindInfo:
    """Everything fmforge knows about one kind."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[Spec]
    status: type[CommonStatus]
    stage: str
    """Suffix of child object names: `<name>-g<generation>-<stage>`."""
    description: str
    columns: tuple[Column, ...]
    references: Callable[[Spec], list[Reference]] = field(default=lambda spec: [])

    @property
    def singular(self) -> str:
        return self.kind.lower()


_PHASE = Column("Phase", ".status.phase", description="Where the object is.")
_AGE = Column("Age", ".metadata.creationTimestamp", type="date")
_MESSAGE = Column("Message", ".status.message", description="Latest message.", priority=1)


def _datapile_refs(spec: DataPileSpec) -> list[Reference]:
    return []


def _trainingrun_refs(spec: TrainingRunSpec) -> list[Reference]:
    r = spec.data_pile_ref
    refs = [Reference("DataPile", r.name, "spec.dataPileRef", r.tag, r.snapshot_id)]
    init = spec.model.init
    if init is not None and init.model_ref is not None:
        refs.append(Reference(init.model_ref.kind, init.model_ref.name, "spec.model.init.modelRef"))
    return refs


def _tunedmodel_refs(spec: TunedModelSpec) -> list[Reference]:
    refs = []
    if spec.base_model_ref is not None:
        refs.append(Reference(spec.base_model_ref.kind, spec.base_model_ref.name, "spec.baseModelRef"))
    p = spec.data.data_pile_ref
    if p is not None:
        refs.append(Reference("DataPile", p.name, "spec.data.dataPileRef", p.tag, p.snapshot_id))
    return refs


def _modelcard_refs(spec: ModelCardSpec) -> list[Reference]:
    refs = [Reference(spec.model_ref.kind, spec.model_ref.name, "spec.modelRef")]
    for i, b in enumerate(spec.benchmarks):
        if b.data_pile_ref is not None:
            p = b.data_pile_ref
            refs.append(
                Reference("DataPile", p.name, f"spec.benchmarks[{i}].dataPileRef", p.tag, p.snapshot_id)
            )
    return refs


def _deployment_refs(spec: DeploymentSpec) -> list[Reference]:
    return [Reference(spec.model_ref.kind, spec.model_ref.name, "spec.modelRef")]


KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo(
            kind="DataPile",
            plural="datapiles",
            short_names=("pile", "piles"),
            spec=DataPileSpec,
            status=DataPileStatus,
            stage="prepare",
            description="A versioned, tagged data pile: sources categorized, filtered, deduplicated, "
            "tokenized and published as an Iceberg snapshot with a data card.",
            columns=(
                _PHASE,
                Column("Version", ".status.version.snapshotId", description="Iceberg snapshot id."),
                Column("Tags", ".status.tags", description="Tags on the version."),
                Column("Docs", ".status.stats.documents.kept", type="integer", description="Documents kept."),
                Column("Tokens", ".status.stats.tokens", type="integer", description="Tokens packed."),
                _AGE,
                _MESSAGE,
            ),
            references=_datapile_refs,
        ),
        KindInfo(
            kind="TrainingRun",
            plural="trainingruns",
            short_names=("train", "tr"),
            spec=TrainingRunSpec,
            status=TrainingRunStatus,
            stage="train",
            description="A foundation model trained from a pile version with Ray Train.",
            columns=(
                _PHASE,
                Column("Step", ".status.progress.step", type="integer", description="Optimizer steps done."),
                Column("Max", ".status.progress.maxSteps", type="integer", description="Optimizer steps in all."),
                Column("Loss", ".status.progress.loss", type="number", description="Latest training loss."),
                Column("Pile", ".spec.dataPileRef.name", description="The pile trained on."),
                _AGE,
                _MESSAGE,
            ),
            references=_trainingrun_refs,
        ),
        KindInfo(
            kind="ModelCard",
            plural="modelcards",
            short_names=("card", "mc"),
            spec=ModelCardSpec,
            status=ModelCardStatus,
            stage="eval",
            description="A model benchmarked against thresholds, its card rendered, approved or rejected.",
            columns=(
                _PHASE,
                Column("Model", ".spec.modelRef.name", description="The model evaluated."),
                Column("Approved", ".status.approved", type="boolean", description="Approved for deployment."),
                Column("Digest", ".status.modelDigest", description="Digest of the model evaluated.", priority=1),
                _AGE,
                _MESSAGE,
            ),
            references=_modelcard_refs,
        ),
        KindInfo(
            kind="TunedModel",
            plural="tunedmodels",
            short_names=("tuned", "tm"),
            spec=TunedModelSpec,
            status=TunedModelStatus,
            stage="tune",
            description="A base model fine-tuned (LoRA or full) on local examples turned into prompts.",
            columns=(
                _PHASE,
                Column("Method", ".spec.method", description="lora or full."),
                Column("Base", ".spec.baseModelRef.name", description="The base model."),
                Column("ValLoss", ".status.validationLoss", type="number", description="Held-out loss."),
                _AGE,
                _MESSAGE,
            ),
            references=_tunedmodel_refs,
        ),
        KindInfo(
            kind="Deployment",
            plural="deployments",
            short_names=("fmdeploy", "fmd"),
            spec=DeploymentSpec,
            status=DeploymentStatus,
            stage="serve",
            description="A model served as a KServe endpoint, or packaged for the edge. In kubectl use "
            "`deployments.fmforge.io` or `fmdeploy`: `deployment` alone means apps/v1.",
            columns=(
                _PHASE,
                Column("Target", ".spec.target", description="kserve or edge."),
                Column("Model", ".spec.modelRef.name", description="The model served."),
                Column("URL", ".status.url", description="Endpoint URL."),
                _AGE,
                _MESSAGE,
            ),
            references=_deployment_refs,
        ),
    )
}

#: Kinds in pipeline order, for stable listings.
KIND_ORDER = ("DataPile", "TrainingRun", "TunedModel", "ModelCard", "Deployment")


def kind_info(kind: str) -> KindInfo:
    """The KindInfo of `kind`, accepting the kind, plural, singular or a short name."""
    k = kind.strip()
    for info in KINDS.values():
        if k in (info.kind, info.plural, info.singular, *info.short_names) or k.lower() in (
            info.kind.lower(),
            f"{info.plural}.fmforge.io",
        ):
            return info
    allowed = ", ".join(KIND_ORDER)
    raise KeyError(f"unknown kind {kind!r}; fmforge kinds are {allowed}")
