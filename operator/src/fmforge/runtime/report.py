"""A stage in a RayJob reports progress into its own object's status, `kubectl get` shows it.

The writes themselves are `fmforge.kube.stagestatus` (server-side apply as the namespace's
`fmforge-stage` ServiceAccount); this module turns a stage's progress into them, at most every
few seconds, and never fails the stage over a write that did not go through.
"""

from __future__ import annotations

import time
from typing import Any

from ..api.v1alpha1 import kind_info
from ..kube.stagestatus import StatusWriter
from .progress import ConsoleReporter


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


class StatusReporter(ConsoleReporter):
    """The console reporter of a RayJob's stage that also writes `status.progress` (for kinds
    whose status has it), at most every `every` seconds."""

    def __init__(self, obj: str, writer: StatusWriter, every: float = 5.0):
        super().__init__(obj, rich=False)
        self.writer = writer
        # Kinds without status.progress (a DataPile, a ModelCard) log their progress only: the API
        # server refuses a field its schema does not declare.
        self.has_progress = "progress" in kind_info(obj.split("/", 1)[0]).status.model_fields
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
                self.writer.apply(progress=progress)
            except Exception as e:  # noqa: BLE001 - progress is a courtesy: never fail the stage over it
                self.log("Failed to report progress", error=str(e))
