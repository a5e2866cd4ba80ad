"""A stage in a RayJob reports progress into its own object's status, `kubectl get` shows it.

The writes themselves are `fmforge.kube.stagestatus` (server-side apply as the namespace's
`fmforge-stage` ServiceAccount); this module turns a stage's progress into them, at most every
few seconds, and never fails the stage over a write that did not go through.
"""

from __future__ import annotations

import time
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from ..api.v1alpha1 import kind_info
from ..kube.stagestatus import StatusWriter
from .progress import ConsoleReporter


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


#: A figure's console name whose status field is named otherwise.
_STATUS_NAMES = {"tokensS": "tokensPerSecond"}


def _progress_model(kind: str) -> type[BaseModel] | None:
    """The model of `status.progress` of `kind`; None where its status has no progress."""
    field = kind_info(kind).status.model_fields.get("progress")
    if field is None:
        return None
    return next(a for a in (typing.get_args(field.annotation) or (field.annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel))


def progress_status(model: type[BaseModel], progress: dict[str, Any]) -> dict[str, Any]:
    """`status.progress` as the CRD's schema takes it: the fields the progress model declares,
    numbers as numbers. The figures a stage shows are text for the console (`loss="4.528"`,
    `tokens_s=...`, `lr=...`); sent as they are, the API server refused the whole write."""
    declared = {f.alias or n for n, f in model.model_fields.items()}
    fields = {_STATUS_NAMES.get(k, k): v for k, v in progress.items()}
    try:
        return model.model_validate({k: v for k, v in fields.items() if k in declared}).model_dump(
            mode="json", by_alias=True, exclude_none=True)
    except ValidationError:
        return {k: v for k, v in fields.items() if k in ("step", "maxSteps")}


class StatusReporter(ConsoleReporter):
    """The console reporter of a RayJob's stage that also writes `status.progress` (for kinds
    whose status has it), at most every `every` seconds."""

    def __init__(self, obj: str, writer: StatusWriter, every: float = 5.0):
        super().__init__(obj, rich=False)
        self.writer = writer
        # Kinds without status.progress (a DataPile, a ModelCard) log their progress only: the API
        # server refuses a field its schema does not declare.
        self.progress_model = _progress_model(obj.split("/", 1)[0])
        self.has_progress = self.progress_model is not None
        self.every = every
        self._sent = 0.0
        self._figures: dict[str, Any] = {}

    def step(self, name: str, total: int | None = None) -> None:
        super().step(name, total)
        self._figures = {}

    def advance(self, amount: int = 1, **figures: Any) -> None:
        super().advance(amount, **figures)
        self._figures.update({_camel(k): v for k, v in figures.items() if v is not None})
        if self.has_progress and time.monotonic() - self._sent >= self.every:
            self._sent = time.monotonic()
            progress = {"step": self._done, **({"maxSteps": self._total} if self._total else {}), **self._figures}
            try:
                self.writer.apply(progress=progress_status(self.progress_model, progress))
            except Exception as e:  # noqa: BLE001 - progress is a courtesy: never fail the stage over it
                self.log("Failed to report progress", error=str(e))
