"""Publish a pile version: Iceberg snapshots and tags, committed from files the workers wrote.

Iceberg tables per pile: `<namespace>.<pile>_documents` (the kept documents with their
annotations), `<namespace>.<pile>_sequences` (the packed token sequences) and, for versions made
with `publish.keepDropped`, `<namespace>.<pile>_dropped` (each dropped document and why). The
workers write the Parquet data files into a folder of the attempt under each table's location,
with Iceberg's field ids (`output`); the driver only reads their footers (pyiceberg's
`parquet_file_to_data_file`) and commits. A version is one snapshot of each table (the first an
append, later ones an overwrite that swaps the data files); the documents snapshot is the
version's id and its properties record the spec digest, source digests, counters and the other
tables' snapshots.

All snapshots are first committed staged (on no branch: Iceberg's write-audit-publish), so a
reader of either table's current snapshot sees nothing of them. Then the version is made
visible: the documents table's `main` and tags move to it in one metadata commit (the commit
point), then the other tables'. A run killed before the commit point leaves only staged
snapshots that no reader sees; one killed between the ref commits leaves the other tables one
version behind. The next run repairs either case before it does anything else (`repair`): it
completes the other tables' refs from the documents snapshot, expires the snapshots no ref
reaches, deleting the files only they added, and removes attempt folders no snapshot refers to
(files of a run killed before it committed). Readers that go through
`read_version` always get a matching pair: the sequences snapshot comes from the documents
snapshot's properties, never from the other table's `main`.

Locally the catalog is SQLite under the state directory; on a cluster any pyiceberg catalog, from
the properties in $FMFORGE_CATALOG (JSON), as the operator's config ConfigMap sets it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from ..piles import PROP_DIGEST, PROP_SNAPSHOT, catalog, read_version, table_name, table_names  # noqa: F401 - re-exported

#: Attempt folders under a table's data folder start with this.
ATTEMPT_PREFIX = "fmforge-"


def tables(cat, namespace: str, pile: str, schemas: dict[str, pa.Schema]) -> dict:
    """The pile's tables for `schemas` (which → Arrow schema), created on first use."""
    return {which: _table(cat, table_name(namespace, pile, which), schema) for which, schema in schemas.items()}


def new_attempt(digest: str) -> str:
    """The name of an attempt's folder: the version's digest and a random part."""
    return f"{ATTEMPT_PREFIX}{digest.split(':', 1)[1][:16]}-{uuid.uuid4().hex[:8]}"


def output(table, attempt: str):
    """Where workers write `table`'s files for `attempt`: the folder, its FileIO properties, and
    the Arrow schema with Iceberg's field ids (so readers need no name mapping)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    from .workers import Output

    return Output(f"{table.location().rstrip('/')}/data/{attempt}", dict(table.io.properties),
                  schema_to_pyarrow(table.schema()))


def discard(table_list: Iterable, attempt: str) -> None:
    """Remove an attempt's folders (a run that failed before it committed)."""
    for table in table_list:
        _remove_folder(table, f"{table.location().rstrip('/')}/data/{attempt}")


def _filesystem(table, location: str):
    """A pyarrow filesystem and path for `location` in `table`'s warehouse (file:// or s3://,
    with the catalog's S3 settings where it has them), or None for another scheme."""
    import pyarrow.fs as pafs

    from ..uris import s3_filesystem

    scheme, _, rest = location.partition("://")
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    if scheme not in ("s3", "s3a"):
        return None
    props = table.io.properties
    if "s3.endpoint" not in props and "s3.access-key-id" not in props:
        return s3_filesystem(), rest
    endpoint = props.get("s3.endpoint", "")
    scheme_, _, host = endpoint.rpartition("://")
    return pafs.S3FileSystem(endpoint_override=host or None, scheme=scheme_ or "https",
                             access_key=props.get("s3.access-key-id"), secret_key=props.get("s3.secret-access-key"),
                             session_token=props.get("s3.session-token"),
                             region=props.get("s3.region", "us-east-1")), rest


def _remove_folder(table, location: str) -> None:
    fs = _filesystem(table, location)
    if fs is not None:
        with contextlib.suppress(FileNotFoundError):
            fs[0].delete_dir(fs[1])


def _orphan_attempts(table, keep_paths: set[str]) -> list[str]:
    """Attempt folders under `table`'s data folder that hold no file of any snapshot."""
    import pyarrow.fs as pafs

    data = f"{table.location().rstrip('/')}/data"
    fs = _filesystem(table, data)
    if fs is None:
        return []
    try:
        infos = fs[0].get_file_info(pafs.FileSelector(fs[1], allow_not_found=True))
    except OSError:
        return []
    used = {p.rsplit("/", 2)[-2] for p in keep_paths}
    return [f"{data}/{i.base_name}" for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith(ATTEMPT_PREFIX) and i.base_name not in used]


def _table(cat, name: str, schema: pa.Schema):
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError

    ns = name.rsplit(".", 1)[0]
    with contextlib.suppress(NamespaceAlreadyExistsError):
        cat.create_namespace(ns)
    try:
        return cat.load_table(name)
    except NoSuchTableError:
        return cat.create_table(name, schema=schema)


@dataclass
class Published:
    """A version as published (or found already published)."""

    snapshot_id: int
    sequences_snapshot_id: int
    created_at: str
    table: str


def find_version(cat, namespace: str, pile: str, digest: str) -> Published | None:
    """The snapshot already published with `digest`, if any (a re-run publishes nothing new)."""
    from pyiceberg.exceptions import NoSuchTableError

    docs_name, _ = table_names(namespace, pile)
    try:
        t = cat.load_table(docs_name)
    except NoSuchTableError:
        return None
    visible = _reachable(t)
    for snap in reversed(t.snapshots()):
        props = snap.summary.additional_properties if snap.summary else {}
        if snap.snapshot_id in visible and props.get(PROP_DIGEST) == digest:
            return Published(snap.snapshot_id, int(props.get(PROP_SNAPSHOT["sequences"], 0)),
                             datetime.fromtimestamp(snap.timestamp_ms / 1000, UTC).isoformat(),
                             docs_name)
    return None


def _reachable(table) -> set[int]:
    """Snapshots a reader can reach: the refs (main, tags) and their ancestors."""
    out: set[int] = set()
    for ref in table.refs().values():
        snap = table.snapshot_by_id(ref.snapshot_id)
        while snap is not None and snap.snapshot_id not in out:
            out.add(snap.snapshot_id)
            snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id else None
    return out


def repair(cat, namespace: str, pile: str) -> dict[str, int]:
    """Finish or undo what an interrupted publish left; what was done, counted (empty: nothing).

    Called at the start of a run, under the state directory's lock (locally) or the one RayJob
    of the object (on a cluster), so no publish of this pile is in flight."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        dt = cat.load_table(table_name(namespace, pile, "documents"))
    except NoSuchTableError:
        return {}
    others = {}
    for which in PROP_SNAPSHOT:
        with contextlib.suppress(NoSuchTableError):
            others[which] = cat.load_table(table_name(namespace, pile, which))
    done: dict[str, int] = {}
    head = dt.current_snapshot()
    props = head.summary.additional_properties if head is not None and head.summary else {}
    for which, t in others.items():
        sid = int(props.get(PROP_SNAPSHOT[which], 0))
        cur = t.current_snapshot()
        if sid and t.snapshot_by_id(sid) is not None and (cur is None or cur.snapshot_id != sid):
            # Killed between the ref commits: the documents side is published; finish this side.
            promote(t, sid, tags_of(cat, table_name(namespace, pile, "documents"), head.snapshot_id))
            others[which] = cat.load_table(table_name(namespace, pile, which))
            done[f"{which}RefsCompleted"] = 1
    visible = _reachable(dt)
    for table, which in ((dt, "documents"), *((t, w) for w, t in others.items())):
        keep = set() if which == "documents" else {
            int((s.summary.additional_properties if s.summary else {}).get(PROP_SNAPSHOT[which], 0))
            for s in dt.snapshots() if s.snapshot_id in visible}
        orphans = [s for s in table.snapshots() if s.snapshot_id not in _reachable(table) | keep]
        if orphans:
            _expire(table, orphans)
            done[f"{which}SnapshotsExpired"] = len(orphans)
        table = cat.load_table(table_name(namespace, pile, which))
        files = {e.data_file.file_path for snap in table.snapshots() for m in snap.manifests(table.io)
                 for e in m.fetch_manifest_entry(table.io, discard_deleted=False)}
        stale = _orphan_attempts(table, files)
        for folder in stale:
            _remove_folder(table, folder)
        if stale:
            done[f"{which}AttemptFoldersRemoved"] = len(stale)
    return done


def _expire(table, snapshots) -> None:
    """Expire snapshots no ref reaches and delete the files only they wrote: each was committed
    staged and never made visible, so no other snapshot holds its data files."""
    ids = [s.snapshot_id for s in snapshots]
    paths: list[str] = []
    for snap in snapshots:
        for manifest in snap.manifests(table.io):
            if manifest.added_snapshot_id == snap.snapshot_id:
                paths += [e.data_file.file_path for e in manifest.fetch_manifest_entry(table.io)
                          if e.snapshot_id == snap.snapshot_id and e.status.name == "ADDED"]
                paths.append(manifest.manifest_path)
        paths.append(snap.manifest_list)
    table.maintenance.expire_snapshots().by_ids(ids).commit()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            table.io.delete(path)


def publish(tabs: dict, files: dict[str, list[str]], tags: list[str], properties: dict[str, str],
            before_visible: Callable[[Published], None] | None = None) -> Published:
    """Commit each table of `tabs` staged from the data files in `files` (which → paths); call
    `before_visible` with the staged version (what must exist before anyone can read it, such as
    its data card); then make the version visible: documents first (the commit point), then the
    others. Returns the new version."""
    snaps = {which: commit(tabs[which], files[which], properties) for which in tabs if which != "documents"}
    doc_props = {**properties, **{PROP_SNAPSHOT[w]: str(sid) for w, sid in snaps.items()}}
    doc_snap = commit(tabs["documents"], files["documents"], doc_props)
    snap = tabs["documents"].snapshot_by_id(doc_snap)
    staged = Published(doc_snap, snaps["sequences"], datetime.fromtimestamp(snap.timestamp_ms / 1000, UTC).isoformat(),
                       ".".join(tabs["documents"].name()))
    if before_visible is not None:
        before_visible(staged)
    promote(tabs["documents"], doc_snap, tags)
    for which, sid in snaps.items():
        promote(tabs[which], sid, tags)
    return staged


def commit(table, paths: list[str], properties: dict[str, str]) -> int:
    """Stage a snapshot whose data files are exactly `paths` (Parquet files written with the
    table's schema) and return its id; no ref moves to it.

    The first version is an append; later ones one overwrite snapshot that removes the previous
    data files and adds the new ones, so readers see the old contents or the new, never an empty
    table (pyiceberg's `overwrite` would commit a delete and then an append). Only the files'
    footers are read here (`parquet_file_to_data_file`, which also checks each file's schema
    against the table's)."""
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    data_files = [parquet_file_to_data_file(table.io, table.metadata, p) for p in paths]
    previous = [task.file for task in table.scan().plan_files()] if table.current_snapshot() else []
    with table.transaction() as tx:
        update = tx.update_snapshot(snapshot_properties=properties, branch=None)
        with (update.overwrite() if previous else update.fast_append()) as snap:
            for data_file in previous:
                snap.delete_data_file(data_file)
            for data_file in data_files:
                snap.append_data_file(data_file)
    return _newest(table)


def _newest(table) -> int:
    """The id of the snapshot committed last (a staged one is on no ref)."""
    return max(table.snapshots(), key=lambda s: (s.sequence_number, s.timestamp_ms)).snapshot_id


def promote(table, snapshot_id: int, tags: list[str]) -> None:
    """Make a staged snapshot the table's current one and move `tags` to it, in one commit."""
    _retag(table, table.manage_snapshots().set_current_snapshot(snapshot_id), snapshot_id, tags).commit()


def move_tags(table, snapshot_id: int, tags: list[str]) -> None:
    """Move `tags` to a snapshot that is already visible, in one commit (none when no tag moves)."""
    if tags:
        _retag(table, table.manage_snapshots(), snapshot_id, tags).commit()


def _retag(table, ms, snapshot_id: int, tags: list[str]):
    """`ms` (a pending ManageSnapshots) with each of `tags` moved onto `snapshot_id`."""
    refs = table.refs()
    for tag in tags:
        if tag in refs:
            if refs[tag].snapshot_id == snapshot_id:
                continue
            ms = ms.remove_tag(tag)
        ms = ms.create_tag(snapshot_id, tag)
    return ms


def tags_of(cat, name: str, snapshot_id: int) -> list[str]:
    """The tags (refs other than main) of table `name` on `snapshot_id`."""
    t = cat.load_table(name)
    return sorted(k for k, r in t.refs().items() if r.snapshot_id == snapshot_id and k != "main")
