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


def standin_note(what: str, module: str, version: str, error: Exception) -> str:
    """The warning to print when a stand-in CRD replaces the real `what` because its Go module
    could not be downloaded. In CI that is a failure instead: a stand-in accepts anything, so the
    tests that need the real schema would prove nothing (and they skip only locally)."""
    if in_ci():
        pytest.fail(
            f"{what}: the Go module {module}@{version} could not be downloaded, and CI never uses a stand-in "
            f"CRD ({error}). Give the machine the Go module proxy (GOPROXY, https://proxy.golang.org by "
            f"default), or fill the module cache beforehand with `go mod download {module}@{version}`, as "
            f"`make controlplane` does for the binaries.")
    return f"{what}: stand-in used, the module {module}@{version} was not served: {error}"


def build(what: str) -> Path:
    """Build (or find in the cache) `what` (helm, k8s, etcd, versitygw); the directory with its binaries."""
    if shutil.which("go") is None:
        unavailable(f"Go is not installed: the tests build {what} with it")
    r = subprocess.run([str(BUILD), what], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"building {what} failed:\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1])
