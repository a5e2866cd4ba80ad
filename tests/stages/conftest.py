"""Stage tests: a corpus built from text that ships with the machine, and a local Ray.

An S3 server for the s3:// sources: versitygw (Versity's S3 gateway, built from the Go module
proxy like the control plane) serving a temporary directory.

The corpus comes from examples/quickstart/build-corpus.py (Python's documentation topics and
module docstrings, two standard-library trees, the system's licence texts), cut down for speed,
plus the project-written lines in tests/stages/data for the HAP, PII and language checks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from paths import ROOT  # noqa: E402
from paths import STAGE_DATA as DATA


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


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory) -> Path:
    """A tiny pretrained llama as a GGUF file with the ChatML template (tests/tinymodel.py), made
    once per session: the GGUF, chat-format and continued-pretraining tests read copies of it."""
    from tinymodel import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    root: Path
    """The gateway's directory: each subdirectory is a bucket."""

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tools import build

    binary = build("versitygw") / "versitygw"
    root = tmp_path_factory.mktemp("s3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root.parent / "versitygw.log").open("wb")
    server = S3Server(f"http://127.0.0.1:{port}", "fmforge-test", "fmforge-test-secret", root / "data")
    server.root.mkdir()
    proc = subprocess.Popen([str(binary), "--port", f"127.0.0.1:{port}", "--access", server.access_key,
                             "--secret", server.secret_key, "--quiet", "posix", str(server.root)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"versitygw did not start: {(root.parent / 'versitygw.log').read_text()[-2000:]}")
            time.sleep(0.05)
    yield server
    proc.terminate()
    proc.wait(10)
    log.close()
