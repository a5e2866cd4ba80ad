"""Stage tests: a corpus built from text that ships with the machine, and a local Ray.

The corpus comes from examples/quickstart/build-corpus.py (Python's documentation topics and
module docstrings, two standard-library trees, the system's licence texts), cut down for speed,
plus the project-written lines in tests/stages/data for the HAP, PII and language checks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT, STAGE_DATA as DATA  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart" / "build-corpus.py"), "--out", str(out),
                    "--max-files", "70"], check=True, capture_output=True)
    extra = out / "extra"
    extra.mkdir()
    for name in ("hap.jsonl", "pii.jsonl", "languages.jsonl"):
        shutil.copy(DATA / name, extra / name)
    return out


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()
