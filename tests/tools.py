"""Finding (building, on first use) the Go-built tools the tests need: helm, the control plane,
the S3 gateway.

A machine without Go skips the tests that need them, with the reason; in CI (CI=true) a missing
tool or a failed build fails the run instead, so CI never silently skips a tier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "cluster" / "build-controlplane.sh"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip locally; fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI never skips this tier)")
    pytest.skip(reason)


def build(what: str) -> Path:
    """Build (or find in the cache) `what` (helm, k8s, etcd, versitygw); the directory with its binaries."""
    if shutil.which("go") is None:
        unavailable(f"Go is not installed: the tests build {what} with it")
    r = subprocess.run([str(BUILD), what], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"building {what} failed:\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1])
