"""Types shared by the five kinds of fmforge.io/v1alpha1.

The base models (`Spec`, `Status`), cross-field rules that validate both here (pydantic) and in
the API server (CEL, written into the generated CRDs by `fmforge.api.crdgen`), object
references, conditions, resources, thresholds and storage URIs. Imported by every kind module,
by the CRD generator, and by the local runner and the operator through `fmforge.api`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema

GROUP = "fmforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: The longest `metadata.name` of any fmforge object. Child objects are named
#: `<name>-g<generation>-<stage>` and must fit a 63-character DNS label: 40 leaves room for a
#: six-digit generation and the longest stage suffix ("-g999999-prepare" is 16 characters).
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# -- cross-field rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, written once and enforced twice.

    `cel` goes into the CRD as an `x-kubernetes-validations` entry (evaluated by the API server
    with `self` bound to the object in wire form); `check` is the same rule over the pydantic
    model, run by `fmforge validate` and the local runner. Both report `message`.
    """

    cel: str | None
    """None where the CRD enforces the rule structurally (a list-map's unique keys)."""
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None


def unique_names(field: str) -> Rule:
    """Items of a list field have unique `name`s (the CRD makes it a list-map keyed by name)."""
    py = _snake(field)
    return Rule(
        cel=None,
        message=f"{field} must have unique names",
        check=lambda m: len({i.name for i in getattr(m, py)}) == len(getattr(m, py)),
    )


def _present(value: Any) -> bool:
    return value is not None


def exactly_one(a: str, b: str) -> Rule:
    """Exactly one of two optional fields (python names are the camelCase wire names)."""
    pa, pb = _snake(a), _snake(b)
    return Rule(
        cel=f"has(self.{a}) != has(self.{b})",
        message=f"exactly one of {a} or {b} must be set",
        check=lambda m: _present(getattr(m, pa)) != _present(getattr(m, pb)),
    )


def at_most_one(a: str, b: str) -> Rule:
    """At most one of two optional fields."""
    pa, pb = _snake(a), _snake(b)
    return Rule(
        cel=f"!(has(self.{a}) && has(self.{b}))",
        message=f"set at most one of {a} or {b}",
        check=lambda m: not (_present(getattr(m, pa)) and _present(getattr(m, pb))),
    )


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


# -- base models --------------------------------------------------------------------------------


class _Base(BaseModel):
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).__rules__:
            if not rule.check(self):
                raise PydanticCustomError("rule", rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        js = handler(schema)
        target = handler.resolve_ref_schema(js)
        if any(r.cel for r in cls.__rules__):
            target["x-kubernetes-validations"] = [
                {"rule": r.cel, "message": r.message}
                | ({"fieldPath": r.field_path} if r.field_path else {})
                for r in cls.__rules__
                if r.cel
            ]
        return js


class Spec(_Base):
    """Base of everything a user writes: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )


class Status(_Base):
    """Base of everything fmforge writes back. Unknown fields are rejected too: the schema is
    structural, so the API server would prune them anyway."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


# -- scalar types ---------------------------------------------------------------------------------

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=NAME_PATTERN)
]
"""A DNS-1035 label: lower-case letters, digits and '-', starting with a letter."""

ObjectName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
]

Tag = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
"""A pile version tag, such as `v1` or `2026-11-26`."""

SpdxId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
]
"""An SPDX licence identifier, such as `Apache-2.0` or `PSF-2.0`."""

DATA_URI_PATTERN = r"^(file|pvc|s3)://\S+$"
MODEL_URI_PATTERN = r"^(file|pvc|s3|pkg)://\S+$"

DataUri = Annotated[str, StringConstraints(max_length=2048, pattern=DATA_URI_PATTERN)]
"""Where data lives: `file://PATH` (relative to the manifest when run locally),
`pvc://CLAIM/PATH` (a PersistentVolumeClaim mounted in the pod), or `s3://BUCKET/PREFIX`."""

ModelUri = Annotated[str, StringConstraints(max_length=2048, pattern=MODEL_URI_PATTERN)]
"""Where a model lives: `file://`, `pvc://CLAIM/PATH`, `s3://BUCKET/PREFIX`, or
`pkg://PACKAGE/PATH` (inside an installed Python package): a model directory in Hugging Face
layout, or a GGUF file (`….gguf`), which the stages convert once into a directory."""

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("quantity", "a quantity must be a number or a string like 4Gi")
    if isinstance(value, (int, float)):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    StringConstraints(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity: `2`, `500m`, `4Gi`."""

BYTES_PATTERN = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[kMGTPE])?$"

Bytes = Annotated[
    str,
    BeforeValidator(_quantity),
    StringConstraints(pattern=BYTES_PATTERN, max_length=64),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": BYTES_PATTERN,
                    "x-kubernetes-int-or-string": True}),
]
"""A size in bytes, as a non-negative quantity: `0`, `500k`, `8Mi`, `2G`."""

_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_value(q: str | int | float) -> float:
    """The number a quantity stands for: `8Mi` is 8388608, `500m` is 0.5, `1e3` is 1000.

    Written here because the parser Kubernetes' Python client ships lives in a package the
    API layer must not import."""
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9.]+)?", str(q))
    if m is None:
        raise ValueError(f"not a quantity: {q!r} (expected a number with an optional suffix, like 8Mi)")
    number, suffix = float(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * 10 ** float(suffix[1:])
    return number * _SUFFIX[suffix]

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

Phase = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"]

# -- shared objects ---------------------------------------------------------------------------------


class DataPileRef(Spec):
    """A DataPile in the same namespace, and which of its versions to read."""

    __rules__ = (at_most_one("tag", "snapshotId"),)

    name: ObjectName
    """Name of the DataPile."""
    tag: Tag | None = None
    """Version tag to read (one of the pile's `publish.tags`). Unset: the latest version."""
    snapshot_id: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")] | None = None
    """Iceberg snapshot id of the version to read; pins an exact version. Unset: by tag or latest."""


class ModelRef(Spec):
    """A model produced by another object in the same namespace."""

    kind: Literal["TrainingRun", "TunedModel"] = "TrainingRun"
    """Kind of the producing object."""
    name: ObjectName
    """Name of the producing object."""


class Threshold(Spec):
    """Bounds a metric must stay within to pass."""

    __rules__ = (
        Rule(
            cel="has(self.min) || has(self.max)",
            message="a threshold needs min, max or both",
            check=lambda m: m.min is not None or m.max is not None,
        ),
        Rule(
            cel="!has(self.min) || !has(self.max) || self.min <= self.max",
            message="threshold min must be less than or equal to max",
            check=lambda m: m.min is None or m.max is None or m.min <= m.max,
        ),
    )

    min: float | None = None
    """The metric must be at least this."""
    max: float | None = None
    """The metric must be at most this."""


#: The Ray resource each worker pod of a RayJob advertises, one per pod, and that each Ray Train
#: worker asks for where the cluster has it: the head offers a CPU of its own (for the Ray Data
#: tasks that feed training), and without this a training worker could land on the head, inside
#: the head's small CPU budget and beyond the reach of a worker pod's failure.
WORKER_SLOT = "fmforge-worker"


class RayResources(Spec):
    """The Ray cluster a stage runs on (KubeRay on a cluster; ignored locally but for `workers`)."""

    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Number of Ray workers."""
    cpus_per_worker: Annotated[int, Field(ge=1, le=256)] = 1
    """CPUs per worker."""
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per worker; 0 trains on CPUs."""
    memory: Quantity = "4Gi"
    """Memory per worker, as a Kubernetes quantity."""


class Condition(Status):
    """A condition in metav1.Condition shape."""

    type: Annotated[str, StringConstraints(max_length=316)]
    """Type of the condition: Ready, Reconciling, Stalled."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition."""
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""
    """One CamelCase word saying why."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """What happened, for people; says what to fix when something is wrong."""
    last_transition_time: datetime | None = None
    """When the status last changed."""
    observed_generation: int | None = None
    """The metadata.generation the condition was computed for."""


class StageOutcome(Status):
    """How the stage itself said its last attempt ended (on a cluster: written by the stage from
    its RayJob pod, read by the operator, which mirrors it into phase and conditions)."""

    generation: int
    """The metadata.generation the stage ran for."""
    verdict: Literal["Succeeded", "Rejected", "WaitingForApproval", "Failed"]
    """Succeeded: it made what it makes; Rejected: done, and the verdict is no (a ModelCard whose
    thresholds are not met); WaitingForApproval: done, and a person must approve the model;
    Failed: the stage refused its input (no retry helps)."""
    reason: str = ""
    """One CamelCase word: the stage's error type when it failed (InvalidInput, InvalidSpec…)."""
    message: str = ""
    """The stage's own one line: what it made, why it rejected, or what to fix."""


class CommonStatus(Status):
    """Status fields every kind has."""

    phase: Phase | None = None
    """Where the object is: Pending, Waiting, Running, Succeeded or Failed."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: list[Condition] = []
    """Ready always; Reconciling and Stalled in kstatus form."""
    message: str | None = None
    """The latest thing a person should know, in one line."""
    outcome: StageOutcome | None = None
    """On a cluster, the stage's own account of its last attempt (the operator's phase follows it)."""
