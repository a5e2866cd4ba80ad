"""Deployment: stage 5, serve a model as a KServe endpoint or package it for the edge.

Spec and status models, read by the serving stage, the CRD generator and the local runner.
The kind collides with apps/v1 Deployment in kubectl: use `deployments.fmforge.io` or the short
name `fmdeploy`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .common import CommonStatus, ModelRef, Quantity, Rule, Spec, Status


class ServingResources(Spec):
    """Resources of one model server replica."""

    cpu: Quantity = "1"
    """CPU request and limit."""
    memory: Quantity = "4Gi"
    """Memory request and limit."""
    gpu: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per replica."""


class KServe(Spec):
    """A KServe InferenceService."""

    __rules__ = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must be less than or equal to maxReplicas",
            check=lambda m: m.min_replicas <= m.max_replicas,
            field_path=".minReplicas",
        ),
    )

    runtime: Literal["huggingface", "fmforge"] = "huggingface"
    """huggingface (KServe's Hugging Face runtime) or fmforge (fmforge's predictor in the runtime
    image, through the chart's ClusterServingRuntime `fmforge`; it checks the approved digest)."""
    protocol: Literal["v1", "v2", "openai"] = "openai"
    """Inference protocol: v1, v2 (Open Inference Protocol) or openai (completions)."""
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Fewest replicas; 0 allows scale to zero where the cluster supports it."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    """Most replicas."""
    canary_traffic_percent: Annotated[int, Field(ge=0, le=100)] = 0
    """Share of traffic sent to a new model revision while the previous one keeps the rest;
    0 switches at once. Only KServe's Knative mode splits traffic; its Standard mode (v0.17)
    ignores it and rolls the new model out in place of the old."""
    resources: ServingResources = ServingResources()
    """Per-replica resources."""
    expose: Literal["route", "none"] = "none"
    """route: an OpenShift Route (route.openshift.io/v1) to the predictor's Service; none:
    cluster-internal only."""
    route_tls: Literal["edge", "none"] = "edge"
    """TLS of the Route (expose: route): edge (the router terminates TLS with its certificate and
    redirects plain HTTP to HTTPS) or none (plain HTTP)."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 8080
    """Port of the model server run locally (`fmforge serve`); on a cluster the serving runtime's
    port applies (the chart's servingRuntime.port for fmforge)."""


class Edge(Spec):
    """An edge package: the model exported for on-device inference."""

    format: Literal["onnx"] = "onnx"
    """Export format."""
    quantize: Literal["none", "int8"] = "int8"
    """Weight quantization: none or int8 (dynamic)."""


class DeploymentSpec(Spec):
    """Which model to serve, and where."""

    __rules__ = (
        Rule(
            cel="self.target == 'edge' || !has(self.edge)",
            message="edge settings apply to target edge only",
            check=lambda m: m.target == "edge" or m.edge is None,
        ),
        Rule(
            cel="self.target == 'kserve' || !has(self.kserve)",
            message="kserve settings apply to target kserve only",
            check=lambda m: m.target == "kserve" or m.kserve is None,
        ),
    )

    model_ref: ModelRef
    """The model to serve."""
    require_approved_model_card: bool = True
    """Serve only a model digest that an approved ModelCard validated."""
    target: Literal["kserve", "edge"] = "kserve"
    """kserve (an endpoint) or edge (a package)."""
    kserve: KServe | None = None
    """Endpoint settings (target kserve); unset: the defaults."""
    edge: Edge | None = None
    """Package settings (target edge); unset: the defaults."""


class ServedModel(Status):
    """The model behind the endpoint or in the package."""

    uri: str | None = None
    """Model location."""
    digest: str | None = None
    """Model digest."""
    model_card: str | None = None
    """Name of the approved ModelCard for that digest."""


class DeploymentStatus(CommonStatus):
    """What the Deployment serves."""

    phase: Literal["Pending", "Waiting", "Running", "Ready", "Degraded", "Succeeded", "Failed"] | None = None
    """Pending, Waiting, Running, Ready (serving), Degraded, Succeeded (edge package built) or Failed."""
    url: str | None = None
    """Endpoint URL."""
    served_model: ServedModel | None = None
    """What is served."""
    inference_service: str | None = None
    """InferenceService name (cluster only)."""
    package: str | None = None
    """URI of the edge package."""
