"""The contract between a stage and whatever runs it.

A stage is a plain function `run(ctx: StageContext) -> StageResult`. It does not know whether it
runs in `fmforge run` on a laptop or as the entrypoint of a RayJob: the runtime builds the
context (spec, resolved inputs, directories, a progress reporter) and records the result. Errors
carry their retry semantics in their type, so the runner and the operator treat them alike.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    """Progress and log output of a stage; the runtime supplies a terminal or plain-log one."""

    def step(self, name: str, total: int | None = None) -> None:
        """A named step begins (`total` units of work, if known)."""

    def advance(self, amount: int = 1, **figures: Any) -> None:
        """Units of the current step are done; `figures` (loss=…, docs=…) are shown beside it."""

    def log(self, message: str, **fields: Any) -> None:
        """One log line: capitalised, past tense, with fields naming what it is about."""


@dataclass
class StageContext:
    """Everything a stage needs, resolved: no references left, only URIs and digests."""

    kind: str
    name: str
    namespace: str
    generation: int
    spec: Any
    """The validated spec model of the kind."""
    inputs: dict[str, dict[str, Any]]
    """Upstream `Kind/name` → its recorded status (wire form), as resolved for this attempt."""
    base_dir: Path
    """Directory that `file://` URIs are relative to (the manifest's directory locally)."""
    artifacts: Path
    """The object's artifact root, created by the runtime. A stage writes what it makes into a
    subdirectory named by its digest (or snapshot id), never into one an earlier attempt wrote:
    a later version must not change what an older one recorded."""
    state_dir: Path
    """The runtime's state directory (catalogs live under it locally)."""
    reporter: Reporter
    allow_outside_paths: bool = False
    """Whether `file://` URIs may name paths outside `base_dir` (the user opted in)."""
    annotations: dict[str, str] = field(default_factory=dict)
    """The object's annotations (a ModelCard's manual approval lives there)."""
    config_maps: dict[str, Path] = field(default_factory=dict)
    """ConfigMaps of the spec mounted into the RayJob's pods: name → the directory (one file per
    key). Empty when the stage runs locally, where there is no ConfigMap to read."""


@dataclass
class StageResult:
    """What a stage made."""

    status: dict[str, Any]
    """Kind-specific status fields in wire form (version, stats, model, url…)."""
    digest: str
    """Digest of the artifact produced; downstream digests include it."""
    message: str = ""
    """One line for people: what was made."""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """Where the artifact came from beyond the graph (sources with their content digests)."""
    waiting: str = ""
    """Non-empty: the work is done and the object now waits for a person (a manual approval);
    says what to do. The runner records the status with phase Waiting."""
    rejected: str = ""
    """Non-empty: the work is done and its verdict is no (thresholds not met); says why. The
    runner records the status with phase Failed, reason Rejected."""


class StageError(Exception):
    """A stage cannot succeed without a change from the user: no retry."""

    reason = "StageFailed"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason:
            self.reason = reason


class InvalidSpec(StageError):
    """The spec is valid in form but not in substance (a source that does not exist, …)."""

    reason = "InvalidSpec"


class InputError(StageError):
    """An input is unusable (unreadable file, wrong field, empty pile after filtering)."""

    reason = "InvalidInput"


class OutputError(StageError):
    """The stage cannot write what it makes: the destination is full, over its quota, read-only
    or forbidden. A retry would fail alike until someone frees space or points the output
    elsewhere."""

    reason = "OutputUnwritable"


#: The errno of a write the destination refused, as each reads in a message.
UNWRITABLE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}


def unwritable(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of the refused write behind `exc`, or None: `exc` itself, or what it wraps
    (a Ray task error's `cause`, an explicit cause, the exception being handled when it was
    raised). The path is the OSError's filename, or the first quoted absolute path of its text
    (pyarrow's errors name the path there, if at all); None where neither says."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in UNWRITABLE:
            quoted = re.search(r"'(/[^']+)'", str(e))
            return e.errno, (str(e.filename) if e.filename else None) or (quoted.group(1) if quoted else None)
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__,
                 None if e.__suppress_context__ else e.__context__]
    return None


def output_error(code: int, path: str, elsewhere: str) -> OutputError:
    """One line for a write the destination refused (`code`, an errno of UNWRITABLE) at `path`:
    what happened and the fix; `elsewhere` says how to write somewhere else ("point the
    catalog's warehouse elsewhere")."""
    fix = {errno.ENOSPC: f"free space or {elsewhere}",
           errno.EDQUOT: f"free space within the quota or {elsewhere}",
           errno.EROFS: f"remount it read-write or {elsewhere}"}.get(
        code, f"let user {os.geteuid()} write there or {elsewhere}")
    return OutputError(f"{UNWRITABLE[code]} writing {path.removeprefix('file://')}: {fix}")


class TemporaryError(Exception):
    """A dependency is not ready yet (an approval, a producer); retry after `delay` seconds.
    The object waits (phase Waiting, Ready=False with `reason`)."""

    def __init__(self, message: str, delay: float = 10.0, reason: str = "Waiting"):
        super().__init__(message)
        self.delay = delay
        self.reason = reason
