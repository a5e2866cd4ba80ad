"""kopf glue: watch events feed the store and the work queue of `fmforge.reconcile`; nothing else.

`fmforge operator` (fmforge.cli) calls `run`; `kopf run -m fmforge.handlers` works too, reading
the same settings from the environment. Every handler is a few lines: the decisions live in
`fmforge.reconcile`, the requests in `fmforge.kube`. Runs as one replica (`--standalone`, no
peering); the chart's Deployment uses the Recreate strategy so that two never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import kopf

from ..api.v1alpha1 import KINDS
from ..kube.client import Kube
from ..kube.names import LABEL_KIND
from ..kube.settings import Settings, load_settings
from ..reconcile.core import Reconciler
from ..reconcile.metrics import Metrics
from ..reconcile.queue import WorkQueue
from ..reconcile.store import Store


@dataclass
class Options:
    """What `fmforge operator` takes as flags, or kopf run from the environment."""

    config: str | None = field(default_factory=lambda: os.environ.get("FMFORGE_CONFIG"))
    metrics_port: int = field(default_factory=lambda: int(os.environ.get("FMFORGE_METRICS_PORT", "9090")))
    namespaces: list[str] = field(default_factory=list)
    """Watched namespaces; empty: all."""


@dataclass
class Operator:
    """The operator's state, created at start-up."""

    settings: Settings
    kube: Kube
    store: Store
    reconciler: Reconciler
    queue: WorkQueue
    metrics: Metrics


OPERATOR: dict[str, Operator] = {}


def _connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    # In a pod: its ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config. kopf's own
    # minimal readers, so the operator needs no `kubernetes` package.
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    return _connection(settings)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    opts: Options = memo.get("options") or Options()
    # fmforge posts its own Events (on transitions); kopf's would repeat every log line.
    settings.posting.enabled = False
    # Reconnect watches regularly, so a restarted or replaced API server is picked up quickly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Watching some namespaces, the chart grants Roles there and nothing cluster-wide, so kopf
    # does not watch CRDs: KubeRay and KServe must be installed before the operator starts.
    settings.scanning.disabled = bool(opts.namespaces)
    info = _connection(settings)
    if info is None:
        raise kopf.PermanentError("no credentials: neither a ServiceAccount token nor a kubeconfig was found")
    cfg = load_settings(opts.config)
    store, kube, metrics = Store(), Kube(info), Metrics()
    reconciler = Reconciler(kube, store, cfg, metrics)
    queue = WorkQueue(reconciler, workers=cfg.workers)
    metrics.watch(store, kube)
    if opts.metrics_port:
        metrics.serve(opts.metrics_port)
    queue.start()
    OPERATOR["op"] = Operator(cfg, kube, store, reconciler, queue, metrics)
    logger.info("Started fmforge: runtime image %s, storage %s, metrics on :%s", cfg.runtime_image,
                cfg.storage_uri, opts.metrics_port or "off")


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    op = OPERATOR.pop("op", None)
    if op is not None:
        await op.queue.stop()
        await op.kube.close()


@kopf.on.probe(id="queued")
def queued(**_: Any) -> int:
    op = OPERATOR.get("op")
    return len(op.queue) if op else 0


async def on_object(event: dict[str, Any], **_: Any) -> None:
    """An fmforge object changed: record it, reconcile it and whoever reads it."""
    op = OPERATOR["op"]
    obj = event["object"]
    if event["type"] == "DELETED":
        keys = op.store.remove(obj)
        ns = obj["metadata"].get("namespace") or ""
        if not op.store.world(ns).objects:
            op.reconciler.forget_namespace(ns)
    else:
        keys = op.store.put(obj)
    for key in keys:
        op.queue.add(key)


def listed(**_: Any) -> None:
    """Index nothing. An index makes kopf list a resource completely before any handler runs, so
    the first reconciles see every object and child that exists (no producer taken for missing,
    no child created twice after a restart)."""
    return None


for _info in KINDS.values():
    kopf.on.event("fmforge.io", "v1alpha1", _info.plural, id=f"watch-{_info.plural}")(on_object)
    kopf.index("fmforge.io", "v1alpha1", _info.plural, id=f"listed-{_info.plural}")(listed)
for _group, _version, _plural in (("ray.io", "v1", "rayjobs"), ("serving.kserve.io", "v1beta1", "inferenceservices")):
    kopf.index(_group, _version, _plural, labels={LABEL_KIND: kopf.PRESENT}, id=f"listed-{_plural}")(listed)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_KIND: kopf.PRESENT})
@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels={LABEL_KIND: kopf.PRESENT})
async def on_child(event: dict[str, Any], **_: Any) -> None:
    """A RayJob or InferenceService of ours changed: reconcile its owner."""
    op = OPERATOR["op"]
    obj = event["object"]
    owner = op.store.remove_child(obj) if event["type"] == "DELETED" else op.store.put_child(obj)
    if owner is not None:
        op.queue.add(owner)


def run(options: Options, namespaces: list[str], health_port: int | None, log_format: str, log_level: str) -> None:
    """Run the operator until it is stopped (SIGINT/SIGTERM): what `fmforge operator` does."""
    kopf.configure(debug=log_level == "debug", quiet=log_level in ("warning", "error"),
                   log_format=kopf.LogFormat[log_format.upper()], log_refkey="object")
    if log_level != "debug":
        # kopf logs "Handler … succeeded" for every watch event; fmforge logs what changed instead.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    options.namespaces = namespaces or load_settings(options.config).watch_namespaces
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    kopf.run(
        loop=loop,
        standalone=True,
        clusterwide=not options.namespaces,
        namespaces=options.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        memo=kopf.Memo(options=options),
    )
