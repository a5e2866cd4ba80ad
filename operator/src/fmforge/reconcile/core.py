"""The reconciler: one level-based reconcile of one object, from the store to the API server.

Reads the object, its namespace and its children from the store (no request), asks the kind's
pure `decide` function what should exist, then creates, applies and deletes children through
`fmforge.kube.client`, writes the status once (a merge patch of the operator's fields, only when
they changed) and posts an Event when the phase or reason changed. API errors are turned into
kopf's typed errors for the work queue: retryable ones (conflicts, throttling, server errors, a
lost connection) into `kopf.TemporaryError`; a child the API server refuses (invalid) into a
Failed status, a Warning Event and `kopf.PermanentError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf

from ..api.status import Phase
from ..api.v1alpha1 import KINDS
from ..kube import builders
from ..kube.client import RAYJOBS, ApiError, Kube, fmforge_resource
from ..kube.settings import Settings
from . import deployment, jobs
from .decision import WARNING_REASONS, Decision, phase_status, reason_of, status_patch
from .metrics import Metrics
from .store import Key, Store

log = logging.getLogger("fmforge.reconcile")

#: Children whose watch events keep the store current (`fmforge.handlers.on_child`).
WATCHED = ("RayJob", "InferenceService")

DECIDE: dict[str, Callable[..., Decision]] = {
    "DataPile": jobs.decide,
    "TrainingRun": jobs.decide,
    "ModelCard": jobs.decide,
    "TunedModel": jobs.decide,
    "Deployment": deployment.decide,
}


def _object(obj: dict[str, Any]) -> dict[str, Any]:
    """Log fields naming the object (kopf's JSON log format prints them)."""
    m = obj["metadata"]
    return {"object": {"kind": obj["kind"], "name": m["name"], "namespace": m.get("namespace", "")}}


class Reconciler:
    """Reconciles fmforge objects by key; the work queue's handler."""

    def __init__(self, kube: Kube, store: Store, settings: Settings, metrics: Metrics):
        self.kube = kube
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._stage_rbac: set[str] = set()
        self._events: set[asyncio.Task] = set()
        # A burst of transitions (a thousand objects applied at once) posts its Events a few at a time.
        self._event_slots = asyncio.Semaphore(8)

    def forget_namespace(self, namespace: str) -> None:
        """The namespace has no fmforge object left (it may be deleted and made again): create its
        stage ServiceAccount and Role again when a RayJob is next needed there."""
        self._stage_rbac.discard(namespace)

    async def __call__(self, key: Key) -> float | None:
        kind = key[1]
        t0 = time.monotonic()
        try:
            again = await self.reconcile(key)
        except Exception as e:
            self.metrics.reconciles.labels(kind, "error").inc()
            self.metrics.errors.labels(kind, type(e).__name__).inc()
            raise
        finally:
            self.metrics.duration.labels(kind).observe(time.monotonic() - t0)
        self.metrics.reconciles.labels(kind, "ok").inc()
        return again

    async def reconcile(self, key: Key) -> float | None:
        obj = self.store.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None  # deleted: the garbage collector removes the children (owner references)
        ns = key[0]
        decision = DECIDE[obj["kind"]](obj, self.store.world(ns), self.store.children(key), self.settings)
        try:
            existed = await self._carry_out(obj, decision)
            if not existed:
                await self._write_status(obj, decision)
        except ApiError as e:
            if e.retryable or e.status in (401, 403, 404):
                # 403: RBAC may be fixed; 404: a CRD (KubeRay, KServe) may be installed later.
                raise kopf.TemporaryError(f"{e}", delay=2.0 if e.retryable else 30.0) from e
            failed = phase_status(obj.get("status") or {}, Phase.FAILED, "ChildRejected",
                                  f"the API server refused a child object: {e.message}", obj["metadata"]["generation"])
            await self._write_status(obj, Decision(failed, decision.owned))
            raise kopf.PermanentError(f"a child of {obj['kind']}/{obj['metadata']['name']} was refused: {e}") from e
        if existed:
            # A child of this generation was there before the store knew it: it is in the store
            # now, so decide again from it instead of writing a status that lags behind it.
            return 0.01
        if decision.permanent:
            raise kopf.PermanentError(decision.status.get("message") or "cannot go on without a change")
        return self.settings.resync_seconds if decision.requeue else None

    async def _carry_out(self, obj: dict[str, Any], decision: Decision) -> bool:
        ns = obj["metadata"]["namespace"]
        existed = False
        for res, name, why in decision.delete:
            # A RayJob goes after what it owns (KubeRay's submitter Job, its Ray cluster): an
            # attempt made again under its name (a card's new model) never meets the old Job.
            await self.kube.delete(res, ns, name, "Foreground" if res == RAYJOBS else "Background")
            log.info("Deleted %s %s: %s", res.kind, name, why, extra=_object(obj))
        if any(c["kind"] == "RayJob" for c in decision.create) and ns not in self._stage_rbac:
            for o in builders.stage_rbac(ns):
                if await self.kube.ensure(o):
                    log.info("Created %s %s for the stages", o["kind"], o["metadata"]["name"], extra=_object(obj))
            self._stage_rbac.add(ns)
        # At once: the RayJob may exist before its plan ConfigMap; its pods wait for the mount.
        results = await asyncio.gather(*(self.kube.create_or_get(c) for c in decision.create))
        for child, (got, created) in zip(decision.create, results, strict=True):
            if child["kind"] in WATCHED:
                self.store.put_child(got)
                existed = existed or not created
            if created:
                log.info("Created %s %s", child["kind"], child["metadata"]["name"], extra=_object(obj))
        for child in decision.apply:
            try:
                got = await self.kube.apply(child)
            except ApiError as e:
                if e.status == 404 and child["kind"] == "Route":
                    # Not a passing state: this API server has no Route resource at all.
                    raise ApiError(422, "RouteUnavailable", "this cluster does not serve OpenShift Routes "
                                   "(route.openshift.io/v1) for kserve.expose: route; set expose: none and "
                                   "expose the predictor's Service another way (an Ingress, a Gateway)") from e
                raise
            if child["kind"] in WATCHED:
                self.store.put_child(got)
            log.info("Applied %s %s", child["kind"], child["metadata"]["name"], extra=_object(obj))
        return existed

    async def _write_status(self, obj: dict[str, Any], decision: Decision) -> None:
        old = obj.get("status") or {}
        patch = status_patch(old, decision.status, decision.owned)
        if not patch:
            return
        m = obj["metadata"]
        res = fmforge_resource(KINDS[obj["kind"]].plural, obj["kind"])
        try:
            new = await self.kube.patch_status(res, m["namespace"], m["name"], patch)
        except ApiError as e:
            if e.status == 404:
                return  # deleted meanwhile: its DELETED event is on its way
            raise
        self.store.update(new)
        before = (old.get("phase"), reason_of(old))
        after = (decision.status.get("phase"), reason_of(decision.status))
        if before != after:
            phase, reason = after
            message = decision.status.get("message") or ""
            type_ = "Warning" if phase in (Phase.FAILED, Phase.DEGRADED) or reason in WARNING_REASONS else "Normal"
            log.info("Moved %s/%s to %s (%s): %s", obj["kind"], m["name"], phase, reason, message, extra=_object(obj))
            # Off the reconcile's path: an Event is a courtesy, and the worker is free sooner.
            task = asyncio.create_task(self._post_event(obj, type_, reason or phase or "", message))
            self._events.add(task)
            task.add_done_callback(self._events.discard)

    async def _post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            async with self._event_slots:
                await self.kube.post_event(builders.event(obj, type_, reason, message))
            self.metrics.events.labels(obj["kind"], type_, reason).inc()
        except ApiError as e:
            # Its loss must not undo or repeat the reconcile.
            log.warning("Failed to post an Event about %s/%s: %s", obj["kind"], obj["metadata"]["name"], e,
                        extra=_object(obj))
