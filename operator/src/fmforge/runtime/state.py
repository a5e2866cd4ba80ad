"""The local state directory (`.fmforge/` next to the manifests by default).

Holds one record per object in the shape of the custom resource (apiVersion, kind, metadata,
spec, status), plus what the runner needs to skip unchanged work (digests) and to print lineage,
and each attempt's artifacts. Written by `fmforge.runtime.local`, read by `fmforge get` and
`fmforge lineage`. Writes are atomic (temporary file + rename), so an interrupted run never
leaves a half-written record.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..api.v1alpha1 import KIND_ORDER


@dataclass
class StateDir:
    """The state directory and its layout."""

    root: Path

    def record_path(self, kind: str, name: str) -> Path:
        return self.root / "objects" / kind / f"{name}.json"

    def artifacts_dir(self, kind: str, name: str, generation: int) -> Path:
        return self.root / "artifacts" / kind / name / f"g{generation}"

    def logs_dir(self) -> Path:
        return self.root / "logs"

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        path = self.record_path(kind, name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise RuntimeError(f"state record {path} is corrupt ({e}); delete it to start that object afresh") from e

    def write(self, record: dict[str, Any]) -> None:
        path = self.record_path(record["kind"], record["metadata"]["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)

    def records(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every record, in pipeline order then by name."""
        kinds = [kind] if kind else list(KIND_ORDER)
        for k in kinds:
            d = self.root / "objects" / k
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.json")):
                rec = self.read(k, p.stem)
                if rec is not None:
                    yield rec

    def exists(self) -> bool:
        return (self.root / "objects").is_dir()


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the custom resource would look (the runner's bookkeeping left out)."""
    return {k: v for k, v in record.items() if k != "fmforge"}
