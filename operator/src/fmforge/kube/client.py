"""An asyncio client for the Kubernetes API: the only code in fmforge that sends requests to it.

The operator's reconcilers call it to create children, patch status and post Events. It is a
thin layer over aiohttp (which kopf already brings) built from the same `ConnectionInfo` kopf
logs in with, so the operator process needs neither the `kubernetes` package nor a second
configuration. Every request is counted by verb, resource and status code (`requests`), which the
metrics endpoint and the benchmark read.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("fmforge.kube")


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource, addressed by group, version and plural."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        out = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            out += f"/{name}"
        if sub:
            out += f"/{sub}"
        return out


RAYJOBS = Resource("ray.io", "v1", "rayjobs", "RayJob")
INFERENCESERVICES = Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
ROUTES = Resource("route.openshift.io", "v1", "routes", "Route")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
EVENTS = Resource("", "v1", "events", "Event")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")

BY_KIND = {r.kind: r for r in (RAYJOBS, INFERENCESERVICES, ROUTES, CONFIGMAPS, SERVICEACCOUNTS, EVENTS, ROLES,
                                ROLEBINDINGS)}


def fmforge_resource(plural: str, kind: str) -> Resource:
    """The Resource of one of fmforge's own kinds."""
    return Resource("fmforge.io", "v1alpha1", plural, kind)


class ApiError(Exception):
    """A response other than 2xx; `status` is the HTTP code, `reason` the Status reason."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether waiting can help: throttling, server errors, and conflicts of concurrent writers."""
        return self.status in (409, 429) or self.status >= 500


FIELD_MANAGER = "fmforge-operator"


class Kube:
    """Requests to one API server with one set of credentials."""

    def __init__(self, info: kopf.ConnectionInfo):
        self.server = info.server.rstrip("/")
        self._info = info
        self._session: aiohttp.ClientSession | None = None
        self.requests: Counter[tuple[str, str, int]] = Counter()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Enough connections for every reconcile worker and the Events; each is a TLS session
            # kept alive, so a burst does not pay a handshake per request.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=self._info.as_ssl_context()),
                headers={**self._info.as_http_headers(), "User-Agent": "fmforge-operator"},
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, res: Resource, path: str, body: Any = None,
                      content_type: str = "application/json", params: dict[str, str] | None = None) -> Any:
        session = self._open()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with session.request(method, self.server + path, data=data, headers=headers,
                                       params=params) as resp:
                self.requests[(method, res.plural, resp.status)] += 1
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        st = json.loads(text)
                        raise ApiError(resp.status, st.get("reason", ""), st.get("message", text))
                    except ValueError:
                        raise ApiError(resp.status, "", text) from None
                return json.loads(text) if text else None
        except (TimeoutError, aiohttp.ClientError) as e:
            self.requests[(method, res.plural, 0)] += 1
            # A dropped connection (an API server restart) or no answer in time (an overloaded
            # one) is worth a retry, like a 503.
            raise ApiError(503, "ConnectionError", f"{type(e).__name__}: {e}") from e

    # -- verbs ----------------------------------------------------------------------------------
    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", res, res.path(namespace, name))

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj`; unknown fields are an error (a builder that drifted from the CRD)."""
        res = BY_KIND[obj["kind"]]
        ns = obj["metadata"]["namespace"]
        return await self.request("POST", res, res.path(ns), obj,
                                  params={"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict"})

    async def create_or_get(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `obj`, or get the object of that name if it exists (409 is success); (object, created)."""
        try:
            return await self.create(obj), True
        except ApiError as e:
            if e.status != 409:
                raise
        res = BY_KIND[obj["kind"]]
        return await self.get(res, obj["metadata"]["namespace"], obj["metadata"]["name"]), False

    async def ensure(self, obj: dict[str, Any]) -> bool:
        """Create `obj` unless it exists, without reading it back; True when it was created."""
        try:
            await self.create(obj)
            return True
        except ApiError as e:
            if e.status != 409:
                raise
            return False

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of `obj` as fmforge's field manager (forced: fmforge owns these fields)."""
        res = BY_KIND[obj["kind"]]
        meta = obj["metadata"]
        return await self.request("PATCH", res, res.path(meta["namespace"], meta["name"]), obj,
                                  content_type="application/apply-patch+yaml",
                                  params={"fieldManager": FIELD_MANAGER, "force": "true",
                                          "fieldValidation": "Strict"})

    async def delete(self, res: Resource, namespace: str, name: str, propagation: str = "Background") -> None:
        """Delete one object (gone already is fine); `propagation` Foreground keeps it, with a
        deletionTimestamp, until the garbage collector has deleted what it owns."""
        try:
            await self.request("DELETE", res, res.path(namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
        except ApiError as e:
            if e.status != 404:
                raise

    async def patch_status(self, res: Resource, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the status subresource: only the fields given change."""
        return await self.request("PATCH", res, res.path(namespace, name, "status"), {"status": status},
                                  content_type="application/merge-patch+json",
                                  params={"fieldManager": FIELD_MANAGER})

    async def post_event(self, event: dict[str, Any]) -> None:
        await self.request("POST", EVENTS, EVENTS.path(event["metadata"]["namespace"]), event)
