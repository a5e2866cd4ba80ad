"""What the stage and end-to-end tests share to run manifests locally: a free port, a Workspace.

Imported by name (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from fmforge.runtime.local import Outcome, RunReport, run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def path_of(uri: str) -> Path:
    """The local path of a file:// URI a status records."""
    return Path(uri.removeprefix("file://"))


class Quiet:
    """A stage reporter that shows nothing (for stage functions called directly)."""

    def step(self, name, total=None):
        pass

    def advance(self, amount=1, **figures):
        pass

    def log(self, message, **fields):
        pass


class Workspace:
    """A folder of manifests and data, run with the local runner on its own state directory.

    `base` names manifests (relative to the folder) that every run includes, such as the pile
    that the objects under test read."""

    def __init__(self, root: Path, base: tuple[str, ...] = ()):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = StateDir(root / ".fmforge")
        self.base = base

    def put(self, manifest: dict) -> Path:
        """Write `manifest` into the folder, named by its kind and name."""
        p = self.root / f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        p.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return p

    def run(self, *manifests: dict, force: bool = False) -> RunReport:
        """Run the base manifests and `manifests`; the runner's report (never a graph error)."""
        paths = [self.root / b for b in self.base] + [self.put(m) for m in manifests]
        report = run_paths(paths, state_dir=self.state.root, console=RunConsole(rich=False), force=force)
        assert not report.errors, report.errors
        return report

    def run_one(self, manifest: dict, force: bool = False) -> tuple[Outcome, dict]:
        """Run one manifest; its outcome and its record afterwards."""
        report = self.run(manifest, force=force)
        key = f"{manifest['kind']}/{manifest['metadata']['name']}"
        return next(o for o in report.outcomes if o.key == key), self.record(manifest["kind"],
                                                                             manifest["metadata"]["name"])

    def record(self, kind: str, name: str) -> dict:
        return self.state.read(kind, name)
