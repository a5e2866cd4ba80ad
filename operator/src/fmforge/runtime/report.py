"""A stage in a RayJob reports progress and results into its own object's status.

The operator's plan names the status subresource (`plan["status"]`); the Ray head's pod runs as
the namespace's `fmforge-stage` ServiceAccount, whose Role allows get and patch of fmforge
status subresources and nothing else. Patches are server-side apply with the field manager
`fmforge-stage`: the stage owns `progress` and the result fields, the operator owns phase and
conditions, and neither overwrites the other. Plain urllib over the pod's token: the runtime
image needs no Kubernetes client, and this module does not import one.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.request
from typing import Any

from .progress import ConsoleReporter

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


class StatusWriter:
    """Server-side applies fields of one object's status, keeping every field it applied so far
    (an apply that leaves a field out would give it up)."""

    def __init__(self, target: dict[str, Any], server: str, token: str, ca_file: str | None):
        self.target = target
        self.server = server.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self.fields: dict[str, Any] = {}

    @classmethod
    def in_pod(cls, target: dict[str, Any]) -> "StatusWriter | None":
        """The writer of a pod with a ServiceAccount token; None outside a cluster."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = f"{SA_DIR}/token"
        if not host or not os.path.exists(token):
            return None
        with open(token) as f:
            return cls(target, f"https://{host}:{port}", f.read().strip(), f"{SA_DIR}/ca.crt")

    def apply(self, **fields: Any) -> None:
        self.fields.update(fields)
        path = self.target["path"]
        name, ns = path.split("/")[-2], path.split("/")[-4]
        body = {"apiVersion": self.target["apiVersion"], "kind": self.target["kind"],
                "metadata": {"name": name, "namespace": ns}, "status": self.fields}
        req = urllib.request.Request(
            f"{self.server}{path}?fieldManager={self.target['fieldManager']}&force=true",
            data=json.dumps(body).encode(), method="PATCH",
            headers={"Content-Type": "application/apply-patch+yaml", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=self.context, timeout=30) as resp:
            resp.read()


class StatusReporter(ConsoleReporter):
    """The console reporter of a RayJob's stage that also writes `status.progress` (for kinds
    whose status has it), at most every `every` seconds."""

    def __init__(self, obj: str, writer: StatusWriter, every: float = 5.0):
        super().__init__(obj, rich=False)
        self.writer = writer
        self.every = every
        self._sent = 0.0
        self._figures: dict[str, Any] = {}

    def step(self, name: str, total: int | None = None) -> None:
        super().step(name, total)
        self._figures = {}

    def advance(self, amount: int = 1, **figures: Any) -> None:
        super().advance(amount, **figures)
        self._figures.update({_camel(k): v for k, v in figures.items() if v is not None})
        if time.monotonic() - self._sent >= self.every:
            self._sent = time.monotonic()
            progress = {"step": self._done, **({"maxSteps": self._total} if self._total else {}), **self._figures}
            try:
                self.writer.apply(progress=progress)
            except OSError as e:  # progress is a courtesy: never fail the stage over it
                self.log("Failed to report progress", error=str(e))
