"""Argo CD for the tests: its release, the health checks' test cases, its Lua runtime.

Imported by name (tests/ is on sys.path through tests/conftest.py) by tests/unit/test_argocd_health.py
and tests/cluster/test_gitops.py. Argo CD's own health code (util/lua) does not build from the
Go module proxy: its go.mod replaces github.com/argoproj/argo-cd/gitops-engine with a directory
of its repository, and the proxy serves no version of that module. So what the tests take from
Argo CD is its published Go module at ARGOCD_VERSION: the versions of the Lua interpreter and JSON
bridge it runs health scripts with (tests/luahealth/ builds a small runner against exactly those)
and, for the cluster tier, its Application CRD.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from tools import ROOT, unavailable

ARGOCD_MODULE = "github.com/argoproj/argo-cd/v3"
# The newest release whose go.mod this machine's Go (1.26) can load; v3.6 needs Go 1.27.
ARGOCD_VERSION = os.environ.get("ARGOCD_VERSION", "v3.5.7")
HEALTH = ROOT / "charts" / "fmforge" / "argocd" / "resource_customizations" / "fmforge.io"
KINDS = ("DataPile", "TrainingRun", "TunedModel", "ModelCard", "Deployment")
LUAHEALTH_BUILD = ROOT / "tests" / "luahealth" / "build.sh"


class _NoTimestamps(yaml.SafeLoader):
    """YAML as sigs.k8s.io/yaml reads it for Argo CD: a timestamp stays a string."""


_NoTimestamps.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=_NoTimestamps)


@dataclass(frozen=True)
class Case:
    """One entry of a kind's health_test.yaml, in Argo CD's format."""

    kind: str
    input_path: str
    status: str
    message: str

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.input_path}"

    def object(self) -> dict:
        return load_yaml(HEALTH / self.kind / self.input_path)


def cases() -> list[Case]:
    out = []
    for kind in KINDS:
        for t in load_yaml(HEALTH / kind / "health_test.yaml")["tests"]:
            hs = t["healthStatus"]
            out.append(Case(kind, t["inputPath"], hs["status"], hs.get("message", "")))
    return out


def script(kind: str) -> str:
    return (HEALTH / kind / "health.lua").read_text()


def luahealth() -> Path:
    """The luahealth binary (built on first use, cached under ~/.cache/fmforge)."""
    if shutil.which("go") is None:
        unavailable("Go is not installed: the tests build the Lua health runner with it")
    r = subprocess.run([str(LUAHEALTH_BUILD), ARGOCD_VERSION], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"building luahealth failed:\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1]) / "luahealth"


def evaluate(runner: Path, evaluations: list[tuple[str, dict]], open_libs: bool) -> list[dict]:
    """Run (script, object) pairs in gopher-lua as Argo CD does; one {status, message} or {error} each."""
    args = [str(runner)] + (["-openlibs"] if open_libs else [])
    payload = json.dumps([{"script": s, "object": o} for s, o in evaluations])
    r = subprocess.run(args, input=payload, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)

