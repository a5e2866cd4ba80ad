"""The operator's settings: the config file the chart mounts (`FMFORGE_CONFIG`), as a model.

Read once at start by `fmforge operator` and handed to the reconcilers and the manifest
builders. Every key has a default that runs as-is, so the operator also starts without a file
(the tests and `fmforge operator` on a laptop against any cluster).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_attribute_docstrings=True)


class Catalog(_Model):
    """The pyiceberg catalog DataPile versions are published to."""

    type: str = "sql"
    """sql, rest, glue or hive."""
    uri: str = "sqlite:////mnt/pvc/fmforge-artifacts/catalog.db"
    """Catalog URI (sql: an SQLAlchemy URL, rest: the endpoint)."""
    warehouse: str = "pvc://fmforge-artifacts/warehouse"
    """Warehouse location of the tables; pvc:// is turned into the path the claim is mounted at."""
    properties: dict[str, str] = {}
    """Extra pyiceberg properties."""


class Jobs(_Model):
    """Limits of every RayJob the operator creates."""

    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    """How long KubeRay keeps a finished job's Ray cluster (for logs) before deleting it."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Wall-clock limit of one attempt; unset: none."""
    backoff_limit: Annotated[int, Field(ge=0)] = 0
    """Resubmissions of a failed job by KubeRay; 0: a failure is reported at once (stages
    retry worker failures themselves)."""
    head_cpu: Annotated[str, Field(pattern=r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")] = "1"
    """CPU request and limit of the Ray head pod, which runs the driver only (`num-cpus: 0`): a
    Kubernetes quantity. Lower it where nodes are small (the smallest RayJob asks the head's CPU,
    one worker's, and the submitter's 100m)."""


class Settings(_Model):
    """What `FMFORGE_CONFIG` holds (charts/fmforge/templates/configmap.yaml writes it)."""

    runtime_image: str = "ghcr.io/fmforge/runtime:0.1.0"
    """Image of the Ray head and workers that run the stages."""
    storage_uri: str = "pvc://fmforge-artifacts/"
    """Where artifacts go: pvc://CLAIM/PATH (mounted in every Ray pod) or s3://BUCKET/PREFIX."""
    storage_secret: str = ""
    """Secret in the object's namespace whose keys become environment variables of the Ray pods
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for s3://); empty: none."""
    catalog: Catalog = Catalog()
    """The pile catalog."""
    queue: str = ""
    """Default Kueue LocalQueue of RayJobs whose spec names none; empty: no queue label."""
    watch_namespaces: list[str] = []
    """Namespaces to watch; empty: all (the command line's --namespace wins)."""
    jobs: Jobs = Jobs()
    """RayJob limits."""
    resync_seconds: Annotated[float, Field(gt=0)] = 300.0
    """Safety-net re-reconcile of every unfinished object; watches do the real work."""
    workers: Annotated[int, Field(ge=1, le=256)] = 32
    """Reconciles run at once."""


def load_settings(path: str | Path | None = None) -> Settings:
    """The settings from `path`, else $FMFORGE_CONFIG, else the defaults."""
    path = path or os.environ.get("FMFORGE_CONFIG")
    if not path:
        return Settings()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return Settings.model_validate(data)
