"""The local state directory (`.fmforge/` next to the manifests by default).

Holds one record per object in the shape of the custom resource (apiVersion, kind, metadata,
spec, status), plus what the runner needs to skip unchanged work (digests) and to print lineage,
and each attempt's artifacts. Written by `fmforge.runtime.local`, read by `fmforge get` and
`fmforge lineage`. Writes are atomic (temporary file + rename), so an interrupted run never
leaves a half-written record.

One `fmforge run` at a time owns a state directory: it holds an exclusive lock on `run.lock`
(flock, so the kernel releases it when the process dies, even by `kill -9`) and writes its pid,
host and command there. A record left `Running` by a process that no longer holds the lock is a
dead run: `get` shows it as such and the next run marks it failed before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.status import now, with_phase
from ..api.v1alpha1 import KIND_ORDER


class StateBusy(Exception):
    """Another process holds the state directory's lock; the message names it."""


@dataclass
class StateDir:
    """The state directory and its layout."""

    root: Path

    def record_path(self, kind: str, name: str) -> Path:
        return self.root / "objects" / kind / f"{name}.json"

    def artifacts_dir(self, kind: str, name: str) -> Path:
        """The object's artifact root; each stage writes what it makes into a subdirectory
        named by the digest of what it made, so no attempt rewrites another's artifacts."""
        return self.root / "artifacts" / kind / name

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[dict[str, Any]]:
        """Hold the state directory for one run; StateBusy if another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder() or {}
                raise StateBusy(
                    f"the state directory {self.root} is in use by another fmforge run (pid {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')}, started {holder.get('startedAt', '?')}: "
                    f"{holder.get('command', '?')}); wait for it to finish, stop it, or use another --state-dir"
                ) from None
            me = {"pid": os.getpid(), "host": socket.gethostname(), "startedAt": now(),
                  "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            yield me
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (pid, host, startedAt, command), or None when no run holds it."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return json.loads(os.pread(fd, 4096, 0) or b"{}")
                except json.JSONDecodeError:
                    return {}
            return None
        finally:
            os.close(fd)

    def live_view(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as it is: a `Running` record whose run no longer holds the lock is a dead run,
        shown Failed with reason RunnerDied (the last success's fields stay)."""
        if record.get("status", {}).get("phase") != "Running":
            return record
        owner = (record.get("fmforge") or {}).get("owner") or {}
        holder = self.holder()
        if holder and holder.get("pid") == owner.get("pid") and holder.get("host") == owner.get("host"):
            return record
        dead = dict(record)
        dead["status"] = with_phase(
            record["status"], "Failed", "RunnerDied",
            f"the fmforge run that was running it (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
            f"{owner.get('startedAt', '?')}) ended without recording a result (killed or crashed); run it again",
            record["metadata"].get("generation", 1))
        return dead

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
