"""A stage's writes to its own object's status, from inside its RayJob pod.

The operator's plan names the status subresource (`plan["status"]`: path, apiVersion, kind,
field manager); the Ray head's pod runs as the namespace's `fmforge-stage` ServiceAccount, whose
Role allows get and patch of fmforge status subresources and nothing else. Writes are
server-side apply with the field manager `fmforge-stage`: the stage owns `progress` and the
result fields, the operator owns phase and conditions, and neither overwrites the other.

Used by `fmforge.runtime.report` in the runtime image. It uses the `kubernetes` client (its
in-cluster configuration and CustomObjectsApi), never kopf: the runtime image runs no operator.
"""

from __future__ import annotations

import os
from typing import Any

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class StatusWriter:
    """Server-side applies fields of one object's status, keeping every field it applied so far
    (an apply that leaves a field out would give it up)."""

    def __init__(self, target: dict[str, Any], server: str, token: str, ca_file: str | None):
        from kubernetes import client

        self.target = target
        conf = client.Configuration()
        conf.host = server.rstrip("/")
        conf.api_key = {"authorization": f"Bearer {token}"}
        conf.ssl_ca_cert = ca_file
        self.api = client.CustomObjectsApi(client.ApiClient(conf))
        self.fields: dict[str, Any] = {}

    @classmethod
    def in_pod(cls, target: dict[str, Any]) -> StatusWriter | None:
        """The writer of a pod with a ServiceAccount token; None outside a cluster."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not os.path.exists(SA_TOKEN):
            return None
        with open(SA_TOKEN) as f:
            return cls(target, f"https://{host}:{port}", f.read().strip(), os.path.join(os.path.dirname(SA_TOKEN),
                                                                                          "ca.crt"))

    def apply(self, **fields: Any) -> None:
        """Apply `fields` (with every field applied before) to the object's status. A refused apply
        leaves nothing behind: the next one does not carry the refused fields again."""
        merged = {**self.fields, **fields}
        # path: /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME/status
        _, _, group, version, _, ns, plural, name, _ = self.target["path"].split("/")
        body = {"apiVersion": self.target["apiVersion"], "kind": self.target["kind"],
                "metadata": {"name": name, "namespace": ns}, "status": merged}
        self.api.patch_namespaced_custom_object_status(
            group, version, ns, plural, name, body, field_manager=self.target["fieldManager"], force=True,
            _content_type="application/apply-patch+yaml")
        self.fields = merged
