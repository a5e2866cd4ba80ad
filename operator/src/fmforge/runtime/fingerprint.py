"""The runner's fingerprint of what a spec names outside the graph, and of what a stage made.

Every `file://`, `pvc://`, `s3://` and `pkg://` URI in a spec (sources, a tokenizer, a prompts file,
tuning examples, a base model) is fingerprinted here, once for every kind, so that no stage has to
remember to: an edited prompts file or a replaced tokenizer runs the object again, and nothing
else does. A local file counts by its path relative to the URI, its size and the sha256 of its
content, so the fingerprint depends on content only (a project copied elsewhere, with new
modification times, is still unchanged). Hashing is paid once per file version: the digests are
cached in the state directory by (path, size, mtime, inode). An `s3://` object counts by key, size
and modification time (pyarrow's listing has no ETag; S3 reports times in whole seconds).

The same fingerprint of a stage's outputs (the model directory its status names) is recorded when
it succeeds, so that a model whose files were changed afterwards is made again instead of skipped.
Called by `fmforge.runtime.local`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..stages.base import StageError

#: URIs the fingerprint covers. Producers' artifacts are covered by the graph (their digests).
URI = re.compile(r"^(file|pvc|s3|pkg)://")


def spec_uris(spec: Any, where: str = "spec") -> Iterator[tuple[str, str]]:
    """(field path, URI) of every URI in a spec in wire form (`spec.sources[0].uri`, …)."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            yield from spec_uris(v, f"{where}.{k}")
    elif isinstance(spec, list):
        for i, v in enumerate(spec):
            yield from spec_uris(v, f"{where}[{i}]")
    elif isinstance(spec, str) and URI.match(spec):
        yield where, spec


def output_uris(status: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, URI) of the local artifacts a stage's status names: its model, adapter and package."""
    for field in ("model", "adapter"):
        uri = (status.get(field) or {}).get("uri")
        if isinstance(uri, str) and uri.startswith("file://"):
            yield f"status.{field}.uri", uri
    if isinstance(status.get("package"), str) and status["package"].startswith("file://"):
        yield "status.package", status["package"]


class DigestCache:
    """Content digests of local files, reused while a file's size, mtime and inode are unchanged."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a cache: rebuilt, never trusted when unreadable

    def digest(self, f: Path, st: os.stat_result) -> str:
        key = str(f)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        self.entries[key] = [*stamp, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(self.entries, out)
        os.replace(tmp, self.path)
        self.changed = False


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of the files under `root` (itself when a file); links to folders are
    not followed, as the DataPile does not follow them."""
    if root.is_file():
        return [(root.name, root)]
    out = []
    for d, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for n in sorted(names):
            p = Path(d) / n
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    return out


def _s3_files(path: str) -> list[tuple[str, int, int]]:
    import pyarrow.fs as pafs

    from ..stages.uris import s3_filesystem

    fs = s3_filesystem()
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(info.base_name, info.size, info.mtime_ns or 0)]
    listed = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((f.path[len(path):].lstrip("/"), f.size, f.mtime_ns or 0)
                  for f in listed if f.type == pafs.FileType.File)


def _one(uri: str, base_dir: Path, cache: DigestCache) -> list[str]:
    from ..stages.uris import locate

    try:
        _, path = locate(uri, base_dir, confine=False)
    except StageError as e:  # the stage says what is wrong with the URI; the fingerprint notes it
        return [f"invalid\0{e}"]
    try:
        if uri.startswith("s3://"):
            return [f"{rel}\0{size}\0{mtime}" for rel, size, mtime in _s3_files(path)]
        root = Path(path)
        if not root.exists():
            return ["missing"]
        return [f"{rel}\0{f.stat().st_size}\0{cache.digest(f, f.stat())}" for rel, f in _local_files(root)]
    except OSError as e:  # unreadable now: run, and let the stage say why
        return [f"error\0{type(e).__name__}\0{e}"]


def fingerprint(uris: list[tuple[str, str]], base_dir: Path, cache: DigestCache) -> str:
    """One digest over the named URIs' files (see the module's docstring); "" when there are none."""
    if not uris:
        return ""
    h = hashlib.sha256()
    for field, uri in uris:
        for part in _one(uri, base_dir, cache):
            h.update(f"{field}\0{uri}\0{part}\n".encode())
    return "sha256:" + h.hexdigest()
