"""List a DataPile's sources on the driver and read their files on the workers.

URIs: `file://PATH` (relative to the manifest's directory locally), `pvc://CLAIM/PATH` (the
claim mounted at $FMFORGE_PVC_ROOT/CLAIM in the pod, /mnt/pvc by default), `s3://BUCKET/PREFIX`
(pyarrow's S3 filesystem; endpoint and credentials from the usual AWS_* variables). Formats:
jsonl (also .gz), parquet, text (one document per file) and code (one document per file of a
source tree, its path kept). Every document gets a stable id (source, path, line) and every
source a content digest over its files, recorded in the pile's lineage.

A large file is read in parts by several workers: JSON lines (not `.gz`) in byte ranges that start
at a line (one pass, `scan_file`, hashes the file and finds where each range starts and how many
lines come before it), Parquet by row groups. Ids are the same as when the file is read whole (the
line or row number counts from the file's start), and so is the source's digest (the scan hashes
the whole file). A `.gz` file stays whole (gzip cannot be entered in the middle), and so do text
and code files (one document each).

What is read stays where the user pointed: `file://` paths stay inside the manifest's folder
unless the runner allows otherwise (`fmforge run --allow-outside-paths`), `pvc://` paths inside
their claim, and directory links in a local tree are not followed (a link loop would read the
same files again and again). A record whose text is not a string is never turned into one, and
documents over the source's `maxDocumentBytes` are dropped at read; both are counted.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ...api.v1alpha1.common import quantity_value
from ...api.v1alpha1.datapile import Source
from ..base import InputError
from ..uris import locate

READ_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("text", pa.large_string()),
        ("is_code", pa.bool_()),
        ("source_license", pa.string()),
    ]
)

_EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".ndjson"),
    "parquet": (".parquet",),
    "text": None,  # any file
    "code": None,
}


@dataclass
class SourceRead:
    """What was read from one source."""

    name: str
    uri: str
    files: int
    documents: int
    bytes: int
    digest: str
    dropped: dict[str, int]
    """Records dropped at read, by reason: invalidText, tooLarge."""


def _hint(e: OSError) -> str:
    """What to fix, for the errors whose cause the message alone does not say."""
    text = str(e)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return ("; check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the pod's "
                "service account) and that they may read this bucket")
    if isinstance(e, PermissionError):
        return "; the file is not readable by this user"
    return ""


def list_files(fs: pafs.FileSystem, root: str, source: Source) -> list[tuple[str, str]]:
    """(absolute path, path relative to the source root) of every file the source reads, sorted."""
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise InputError(f"source {source.name}: cannot read {source.uri}: {e}{_hint(e)}") from e
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"source {source.name}: {source.uri} does not exist (resolved to {root}); "
                         f"fix the uri or create the data")
    if info.type == pafs.FileType.File:
        entries = [(root, PurePosixPath(root).name)]
    elif isinstance(fs, pafs.LocalFileSystem):
        entries = _local_tree(root)
    else:
        sel = pafs.FileSelector(root, recursive=True)
        entries = [(i.path, os.path.relpath(i.path, root)) for i in fs.get_file_info(sel)
                   if i.type == pafs.FileType.File]
    exts = _EXTENSIONS[source.format]
    out = []
    for path, rel in entries:
        name = PurePosixPath(rel).name
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            continue
        if exts and not name.endswith(exts):
            continue
        if source.include and not any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in source.include):
            continue
        if any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in source.exclude):
            continue
        out.append((path, rel))
    if not out:
        raise InputError(f"source {source.name}: no {source.format} files under {source.uri}"
                         + (f" matching {source.include}" if source.include else ""))
    return sorted(out, key=lambda e: e[1])


def _local_tree(root: str) -> list[tuple[str, str]]:
    """Files of a local tree. Directory links are not followed (a loop would read the same files
    over and over, a link out of the tree would read what the user did not point at); a file
    link is read only if its target lies inside the tree."""
    top = Path(root).resolve()
    out = []
    for d, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = os.path.join(d, name)
            if os.path.islink(path):
                target = Path(path).resolve()
                if not target.is_file() or not target.is_relative_to(top):
                    continue
            elif not os.path.isfile(path):
                continue
            out.append((path, os.path.relpath(path, root)))
    return out


def _doc_id(source: str, rel: str, n: int | str) -> str:
    return hashlib.sha1(f"{source}\0{rel}\0{n}".encode()).hexdigest()[:20]


def _not_text(source: Source, where: str, value: object) -> str:
    what = "null" if value is None else type(value).__name__
    return (f"source {source.name}: {where}: {source.text_field!r} is {what}, not text; fix the data, or set "
            f"invalidText: skip on the source to skip and count such records")


@dataclass
class SourceFiles:
    """A source's files, as listed on the driver: what the workers read."""

    source: Source
    fs: pafs.FileSystem
    files: list[tuple[str, str, int]]
    """(path on `fs`, path relative to the source root, size in bytes), sorted by relative path."""


def list_source(source: Source, base_dir: Path, confine: bool = True) -> SourceFiles:
    """The files of one source with their sizes (names and sizes only: nothing is read)."""
    fs, root = locate(source.uri, base_dir, confine)
    files = list_files(fs, root, source)
    try:
        infos = fs.get_file_info([path for path, _ in files])
    except OSError as e:
        raise InputError(f"source {source.name}: cannot read {source.uri}: {e}{_hint(e)}") from e
    sized = [(path, rel, max(int(i.size or 0), 0)) for (path, rel), i in zip(files, infos, strict=True)]
    return SourceFiles(source, fs, sized)


@dataclass
class FilesRead:
    """What reading some of a source's files found (on a worker; summed on the driver)."""

    documents: int
    dropped: dict[str, int]
    """Records dropped at read, by reason: invalidText, tooLarge."""
    files: list[tuple[str, str, int]]
    """(relative path, sha256 hex of the file's bytes, bytes) of each file read."""


def read_files(source: Source, fs: pafs.FileSystem, files: list[tuple[str, str, int]]) -> tuple[pa.Table, FilesRead]:
    """The documents of some of a source's files (a worker's share), and what was read."""
    ids: list[str] = []
    paths: list[str] = []
    texts: list[str] = []
    dropped = {"invalidText": 0, "tooLarge": 0}
    done = []
    limit = int(quantity_value(source.max_document_bytes))
    for path, rel, _ in files:
        try:
            with fs.open_input_file(path) as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"source {source.name}: cannot read {rel}: {e}{_hint(e)}") from e
        done.append((rel, hashlib.sha256(data).hexdigest(), len(data)))
        for key, text in _documents(source, rel, data, limit, dropped):
            ids.append(_doc_id(source.name, rel, key))
            paths.append(rel)
            texts.append(text)
    return _table(source, ids, paths, texts), FilesRead(len(ids), {k: v for k, v in dropped.items() if v}, done)


def _table(source: Source, ids: list[str], paths: list[str], texts: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "source": [source.name] * n,
            "path": paths,
            "text": pa.array(texts, type=pa.large_string()),
            "is_code": [source.format == "code"] * n,
            "source_license": [source.license] * n,
        },
        schema=READ_SCHEMA,
    )


#: Bytes the scan of a file read in parts reads at a time.
SCAN_BLOCK = 8 << 20


def read_in_parts(source: Source, rel: str) -> bool:
    """Whether a file of this source may be read in parts: JSON lines (not gzip) and Parquet."""
    return (source.format == "jsonl" and not rel.endswith(".gz")) or source.format == "parquet"


@dataclass(frozen=True)
class FileScan:
    """One pass over a file read in parts: its content hash, and for JSON lines where each part
    starts and how many lines come before it."""

    rel: str
    """The file's path relative to the source root."""
    sha256: str
    """sha256 hex of the whole file (what reading it whole records)."""
    size: int
    """Bytes."""
    starts: list[int]
    """JSON lines: the byte offset of each part's first line, then the file's size (parts whose
    planned start fell inside one long line are merged: fewer parts than planned). Empty for
    Parquet, whose parts are row groups."""
    lines: list[int]
    """JSON lines: lines (empty ones included) before each part's first line."""


def scan_file(source: Source, fs: pafs.FileSystem, file: tuple[str, str, int], parts: int) -> FileScan:
    """Hash a file read in `parts` parts, streaming; for JSON lines, move each part's planned
    start (k × size / parts) to the start of the next line and count the lines before it."""
    path, rel, size = file
    planned = [k * size // parts for k in range(1, parts)] if source.format == "jsonl" else []
    h = hashlib.sha256()
    starts, lines = [0], [0]
    pos = seen = 0  # bytes and newlines before the current block
    try:
        with fs.open_input_stream(path) as f:
            while block := f.read(SCAN_BLOCK):
                h.update(block)
                while planned and planned[0] - 1 < pos + len(block):
                    # the first line that starts at or after the planned offset
                    j = block.find(b"\n", max(planned[0] - 1 - pos, 0))
                    if j < 0:
                        break  # inside a line that goes on in the next block
                    start = pos + j + 1
                    starts.append(start)
                    lines.append(seen + block.count(b"\n", 0, j + 1))
                    planned = [o for o in planned if o > start]
                seen += block.count(b"\n")
                pos += len(block)
    except OSError as e:
        raise InputError(f"source {source.name}: cannot read {rel}: {e}{_hint(e)}") from e
    keep = [i for i, st in enumerate(starts) if st < pos or i == 0]
    return FileScan(rel, h.hexdigest(), pos, [starts[i] for i in keep] + [pos], [lines[i] for i in keep])


def read_part(source: Source, fs: pafs.FileSystem, file: tuple[str, str, int], part: int, parts: int,
              scan: FileScan | None) -> tuple[pa.Table, FilesRead]:
    """The documents of part `part` of `parts` of one file: for JSON lines the byte range the scan
    found, for Parquet the row groups [part × G / parts, (part + 1) × G / parts). Ids and drops
    are those of reading the file whole; the file itself is recorded by its scan, not here."""
    path, rel, _ = file
    dropped = {"invalidText": 0, "tooLarge": 0}
    limit = int(quantity_value(source.max_document_bytes))
    try:
        with fs.open_input_file(path) as f:
            if source.format == "jsonl":
                if scan is None:
                    raise ValueError(f"{rel}: a JSON lines part needs its file's scan")
                if part + 1 < len(scan.starts):
                    a, b = scan.starts[part], scan.starts[part + 1]
                    docs = list(_jsonl_documents(source, rel, f.read_at(b - a, a), limit, dropped,
                                                 first_line=scan.lines[part]))
                else:  # merged into an earlier part (one long line spanned the planned start)
                    docs = []
            else:
                docs = list(_parquet_part(source, rel, f, part, parts, limit, dropped))
    except OSError as e:
        raise InputError(f"source {source.name}: cannot read {rel}: {e}{_hint(e)}") from e
    table = _table(source, [_doc_id(source.name, rel, k) for k, _ in docs], [rel] * len(docs), [t for _, t in docs])
    return table, FilesRead(len(docs), {k: v for k, v in dropped.items() if v}, [])


def _parquet_part(source: Source, rel: str, f, part: int, parts: int, limit: int, dropped: dict[str, int]):
    """(id key, text) of the documents in one part's row groups of a Parquet file."""
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"source {source.name}: {rel} is not a readable Parquet file ({e}); "
                         f"fix or remove it, or set the source's format") from e
    groups = pf.num_row_groups
    lo, hi = part * groups // parts, (part + 1) * groups // parts
    first_row = sum(pf.metadata.row_group(g).num_rows for g in range(lo))
    names = pf.schema_arrow.names
    columns = [c for c in dict.fromkeys([source.text_field, source.id_field]) if c and c in names]
    t = pf.read_row_groups(list(range(lo, hi)), columns=columns) if hi > lo else \
        pf.schema_arrow.empty_table().select(columns)
    yield from _parquet_rows(source, rel, t, names, limit, dropped, first_row)


def summarize(listed: SourceFiles, parts: list[FilesRead]) -> SourceRead:
    """One source's SourceRead from what the workers read of it. The digest covers every file's
    relative path and content hash in sorted order, whichever worker read it."""
    dropped: dict[str, int] = {}
    per_file = {}
    for part in parts:
        for k, v in part.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        per_file.update({rel: (sha, size) for rel, sha, size in part.files})
    source = listed.source
    documents = sum(p.documents for p in parts)
    if documents == 0 and not dropped:
        raise InputError(f"source {source.name}: its {len(listed.files)} {source.format} file(s) under {source.uri} "
                         f"hold no documents (empty files?); add data or remove the source")
    digest = hashlib.sha256()
    for rel in sorted(per_file):
        digest.update(rel.encode() + b"\0" + bytes.fromhex(per_file[rel][0]))
    return SourceRead(source.name, source.uri, len(per_file), documents, sum(s for _, s in per_file.values()),
                      "sha256:" + digest.hexdigest(), dropped)


def read_source(source: Source, base_dir: Path, confine: bool = True) -> tuple[pa.Table, SourceRead]:
    """All documents of one source in this process, and what was read (tests and tools; the
    stage reads on the Ray workers)."""
    listed = list_source(source, base_dir, confine)
    table, part = read_files(source, listed.fs, listed.files)
    return table, summarize(listed, [part])


def _documents(source: Source, rel: str, data: bytes, limit: int, dropped: dict[str, int]):
    """(id key, text) of each document in one file's bytes; counts what it drops into `dropped`."""
    if source.format in ("text", "code"):
        if len(data) > limit:
            dropped["tooLarge"] += 1
            return
        yield 0, data.decode("utf-8", errors="replace")
    elif source.format == "jsonl":
        yield from _jsonl_documents(source, rel, data, limit, dropped)
    else:
        yield from _parquet_documents(source, rel, data, limit, dropped)


def _jsonl_documents(source: Source, rel: str, data: bytes, limit: int, dropped: dict[str, int],
                     first_line: int = 0):
    """(id key, text) of each record; line numbers (the id key without idField) count from
    `first_line`, the lines before `data` in its file."""
    if rel.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(f"source {source.name}: {rel} is not a readable gzip file ({e}); "
                             f"fix or remove it, or drop the .gz suffix if it is plain JSON lines") from e
    for n, line in enumerate(io.BytesIO(data), start=first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"source {source.name}: {rel} line {n + 1} is not JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise InputError(f"source {source.name}: {rel} line {n + 1} is not UTF-8 text ({e.reason} at "
                             f"byte {e.start}); re-encode the file as UTF-8") from e
        if not isinstance(rec, dict) or source.text_field not in rec:
            have = sorted(rec)[:10] if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f"source {source.name}: {rel} line {n + 1} has no field "
                             f"{source.text_field!r} (it has {have}); set textField")
        text = rec[source.text_field]
        if not isinstance(text, str):
            if source.invalid_text == "fail":
                raise InputError(_not_text(source, f"{rel} line {n + 1}", text))
            dropped["invalidText"] += 1
            continue
        if len(line) > limit and len(text.encode()) > limit:
            dropped["tooLarge"] += 1
            continue
        yield (_id_value(source, rec.get(source.id_field), f"{rel} line {n + 1}") if source.id_field else str(n)), text


def _parquet_documents(source: Source, rel: str, data: bytes, limit: int, dropped: dict[str, int]):
    try:
        t = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"source {source.name}: {rel} is not a readable Parquet file ({e}); "
                         f"fix or remove it, or set the source's format") from e
    yield from _parquet_rows(source, rel, t, t.column_names, limit, dropped)


def _parquet_rows(source: Source, rel: str, t: pa.Table, names: list[str], limit: int, dropped: dict[str, int],
                  first_row: int = 0):
    """(id key, text) of each row of `t` (rows of a file whose columns are `names`); row numbers
    (the id key without idField) count from `first_row`."""
    if source.text_field not in names:
        raise InputError(f"source {source.name}: {rel} has no column {source.text_field!r} "
                         f"(it has {names[:10]}); set textField")
    column = t.column(source.text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"source {source.name}: {rel}: column {source.text_field!r} holds {column.type}, "
                         f"not text; set textField to the text column")
    col = column.to_pylist()
    if source.id_field and source.id_field not in names:
        raise InputError(f"source {source.name}: {rel} has no column {source.id_field!r} for idField "
                         f"(it has {names[:10]}); fix idField or remove it to number the rows")
    keys = t.column(source.id_field).to_pylist() if source.id_field else range(first_row, first_row + len(col))
    for row, (key, text) in enumerate(zip(keys, col, strict=True), start=first_row):
        if text is None:
            if source.invalid_text == "fail":
                raise InputError(_not_text(source, f"{rel} row {row}", text))
            dropped["invalidText"] += 1
            continue
        if len(text) > limit // 4 and len(text.encode()) > limit:
            dropped["tooLarge"] += 1
            continue
        yield (_id_value(source, key, f"{rel} row {row}") if source.id_field else str(key)), text


def _id_value(source: Source, value: object, where: str) -> str:
    """A record's idField value as the key of its document id; a missing one fails (two records
    without one would get the same id)."""
    if value is None or value == "":
        raise InputError(f"source {source.name}: {where} has no value for idField {source.id_field!r}; give every "
                         f"record one, or remove idField to number the records")
    return str(value)
