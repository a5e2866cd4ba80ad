"""Prometheus metrics of the operator, served on `--metrics-port` (`/metrics`).

Counters and a histogram the reconciler updates, and two collectors read at scrape time: the
objects in the store by kind and phase, and the API requests the client made by verb, resource
and status code (what the benchmark divides by the reconciles to get requests per reconcile).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..kube.client import Kube
from .store import Store


class Metrics:
    """The operator's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = PromCounter("fmforge_reconciles", "Reconciles run, by kind and result (ok, error).",
                                      ["kind", "result"], registry=self.registry)
        self.duration = Histogram("fmforge_reconcile_duration_seconds", "Time one reconcile took, by kind.",
                                  ["kind"], registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.errors = PromCounter("fmforge_reconcile_errors", "Reconciles that raised, by kind and error type.",
                                  ["kind", "error"], registry=self.registry)
        self.events = PromCounter("fmforge_events", "Events posted, by kind, type and reason.",
                                  ["kind", "type", "reason"], registry=self.registry)

    def watch(self, store: Store, kube: Kube) -> None:
        """Expose the store's objects by phase and the client's requests."""
        self.registry.register(_Objects(store))
        self.registry.register(_Requests(kube))

    def serve(self, port: int) -> None:
        """Serve /metrics on `port` (a daemon thread: scraping never blocks the event loop)."""
        start_http_server(port, registry=self.registry)


class _Objects(Collector):
    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("fmforge_objects", "fmforge objects by kind and phase.", labels=["kind", "phase"])
        counts = Counter((o["kind"], (o.get("status") or {}).get("phase") or "Pending") for o in self.store)
        for (kind, phase), n in sorted(counts.items()):
            g.add_metric([kind, phase], n)
        yield g


class _Requests(Collector):
    def __init__(self, kube: Kube):
        self.kube = kube

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily("fmforge_api_requests", "Kubernetes API requests the reconcilers made.",
                                labels=["verb", "resource", "code"])
        for (verb, res, code), n in sorted(self.kube.requests.items()):
            c.add_metric([verb, res, str(code)], n)
        yield c
