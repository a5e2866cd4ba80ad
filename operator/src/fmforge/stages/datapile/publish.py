"""Publish a pile version: Iceberg snapshots, tags, and the data card.

Two Iceberg tables per pile, `<namespace>.<pile>_documents` (the kept documents with their
annotations) and `<namespace>.<pile>_sequences` (the packed token sequences). A version is one
snapshot of each (the first an append, later ones an overwrite that swaps the data files); the
documents snapshot is the version's id and its properties record the spec digest, source
digests, counters and the sequences snapshot.

Both snapshots are first committed staged (on no branch: Iceberg's write-audit-publish), so a
reader of either table's current snapshot sees nothing of them. Then the version is made
visible: the documents table's `main` and tags move to it in one metadata commit (the commit
point), then the sequences table's. A run killed before the commit point leaves only staged
snapshots that no reader sees; one killed between the two ref commits leaves the sequences
table one version behind. The next run repairs either case before it does anything else
(`repair`): it completes the sequences table's refs from the documents snapshot, and expires
the snapshots no ref reaches, deleting the files only they added. Readers that go through
`read_version` always get a matching pair: the sequences snapshot comes from the documents
snapshot's properties, never from the other table's `main`.

Locally the catalog is SQLite under the state directory; on a cluster any pyiceberg catalog, from
the properties in $FMFORGE_CATALOG (JSON), as the operator's config ConfigMap sets it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

PROP_DIGEST = "fmforge.digest"


def catalog(state_dir: Path):
    """The pile catalog: $FMFORGE_CATALOG's properties, or SQLite under the state directory."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.catalog.sql import SqlCatalog

    props = os.environ.get("FMFORGE_CATALOG")
    if props:
        return load_catalog("fmforge", **json.loads(props))
    root = (state_dir / "catalog").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return SqlCatalog("fmforge", uri=f"sqlite:///{root}/catalog.db", warehouse=f"file://{root}/warehouse")


def table_names(namespace: str, pile: str) -> tuple[str, str]:
    base = pile.replace("-", "_")
    return f"{namespace}.{base}_documents", f"{namespace}.{base}_sequences"


def _table(cat, name: str, schema: pa.Schema):
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError

    ns = name.rsplit(".", 1)[0]
    try:
        cat.create_namespace(ns)
    except NamespaceAlreadyExistsError:
        pass
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
            return Published(snap.snapshot_id, int(props.get("fmforge.sequences-snapshot-id", 0)),
                             datetime.fromtimestamp(snap.timestamp_ms / 1000, timezone.utc).isoformat(),
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

    docs_name, seq_name = table_names(namespace, pile)
    try:
        dt, st = cat.load_table(docs_name), cat.load_table(seq_name)
    except NoSuchTableError:
        return {}
    done: dict[str, int] = {}
    head = dt.current_snapshot()
    if head is not None:
        props = head.summary.additional_properties if head.summary else {}
        seq_id = int(props.get("fmforge.sequences-snapshot-id", 0))
        cur = st.current_snapshot()
        if seq_id and st.snapshot_by_id(seq_id) is not None and (cur is None or cur.snapshot_id != seq_id):
            # Killed between the two ref commits: the documents side is published; finish the sequences side.
            promote(st, seq_id, tags_of(cat, docs_name, head.snapshot_id))
            st = cat.load_table(seq_name)
            done["sequencesRefsCompleted"] = 1
    visible = _reachable(dt)
    referenced = {int((s.summary.additional_properties if s.summary else {}).get("fmforge.sequences-snapshot-id", 0))
                  for s in dt.snapshots() if s.snapshot_id in visible}
    for table, keep, key in ((dt, set(), "documentsSnapshotsExpired"), (st, referenced, "sequencesSnapshotsExpired")):
        orphans = [s for s in table.snapshots() if s.snapshot_id not in _reachable(table) | keep]
        if orphans:
            _expire(table, orphans)
            done[key] = len(orphans)
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
        try:
            table.io.delete(path)
        except FileNotFoundError:
            pass


def publish(cat, namespace: str, pile: str, docs: pa.Table, seqs: pa.Table, tags: list[str],
            properties: dict[str, str]) -> Published:
    """Commit both tables staged, then make the version visible (documents first: the commit
    point); returns the new version."""
    docs_name, seq_name = table_names(namespace, pile)
    dt = _table(cat, docs_name, docs.schema)
    st = _table(cat, seq_name, seqs.schema)
    seq_snap = replace(st, seqs, properties)
    doc_snap = replace(dt, docs, {**properties, "fmforge.sequences-snapshot-id": str(seq_snap)})
    promote(dt, doc_snap, tags)
    promote(st, seq_snap, tags)
    snap = dt.snapshot_by_id(doc_snap)
    return Published(doc_snap, seq_snap,
                     datetime.fromtimestamp(snap.timestamp_ms / 1000, timezone.utc).isoformat(), docs_name)


def replace(table, df: pa.Table, properties: dict[str, str]) -> int:
    """Stage a snapshot whose contents are `df` (no ref moves to it), and return its id.

    pyiceberg's `overwrite` commits two snapshots (a delete, then an append); a pile version is
    one: an `append` for the first version, then an `overwrite` that removes the previous data
    files and adds the new ones in the same snapshot. Readers see the old contents or the new,
    never an empty table.

    pyiceberg has no public call for this (a staged `overwrite` would stage a delete and an
    append whose parent is `main`, not the delete): `_dataframe_to_data_files` is what its own
    overwrite writes with, and `_check_pyarrow_schema_compatible` its own schema check. Both are
    private, so pyiceberg is pinned to the minor version this is tested with (pyproject.toml)."""
    from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible, _dataframe_to_data_files

    _check_pyarrow_schema_compatible(table.schema(), provided_schema=df.schema)
    if table.current_snapshot() is None:
        table.append(df, snapshot_properties=properties, branch=None)
        return _newest(table)
    previous = [task.file for task in table.scan().plan_files()]
    with table.transaction() as tx:
        with tx.update_snapshot(snapshot_properties=properties, branch=None).overwrite() as snap:
            for data_file in previous:
                snap.delete_data_file(data_file)
            for data_file in _dataframe_to_data_files(table_metadata=tx.table_metadata, df=df, io=table.io,
                                                      write_uuid=snap.commit_uuid):
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
    t = cat.load_table(name)
    return sorted(k for k, r in t.refs().items() if r.snapshot_id == snapshot_id and k != "main")


def read_version(cat, namespace: str, pile: str, ref: str | int | None = None, which: str = "documents") -> pa.Table:
    """Read a version of the pile by tag, snapshot id, or the latest (None)."""
    docs_name, seq_name = table_names(namespace, pile)
    t = cat.load_table(docs_name)
    snap = t.current_snapshot() if ref is None else (
        t.snapshot_by_name(ref) if isinstance(ref, str) else t.snapshot_by_id(int(ref)))
    if snap is None:
        raise KeyError(f"DataPile {pile}: no version {ref!r}")
    if which == "documents":
        return t.scan(snapshot_id=snap.snapshot_id).to_arrow()
    seq_snap = int(snap.summary.additional_properties["fmforge.sequences-snapshot-id"])
    return cat.load_table(seq_name).scan(snapshot_id=seq_snap).to_arrow()


# -- data card -------------------------------------------------------------------------------------


def data_card(card: dict[str, Any], out: Path) -> Path:
    """Write datacard.json and datacard.md into `out`; the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "datacard.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    st = card["stats"]
    lines = [
        f"# Data card: {card['name']} (snapshot {card['version']['snapshotId']})",
        "",
        f"- Published: {card['version']['createdAt']}; tags: {', '.join(card['tags']) or 'none'}",
        f"- Digest: `{card['version']['digest']}`",
        f"- Documents: {st['documents']['read']} read, {st['documents']['kept']} kept",
        f"- Tokens: {st['tokens']} in {st['sequences']} sequences of {card['sequenceLength']} "
        f"(train {card['tokensBySplit'].get('train', 0)}, validation {card['tokensBySplit'].get('validation', 0)})",
        f"- Tokenizer: {card['tokenizer']}",
        "",
        "## Sources",
        "",
        "| source | uri | declared licence | files | documents | MB | content digest |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in card["sources"]:
        lines.append(f"| {s['name']} | {s['uri']} | {s.get('license') or 'none'} | {s['files']} | {s['documents']} | "
                     f"{s['bytes'] / 1e6:.2f} | `{s['digest'][:19]}…` |")
    lines += ["", "## What each step dropped", "", "| step | dropped | share of read |", "|---|---|---|"]
    read = max(st["documents"]["read"], 1)
    for reason, n in st["dropped"].items():
        lines.append(f"| {reason} | {n} | {100 * n / read:.1f}% |")
    if card.get("qualityRules"):
        lines += ["", "Quality rules broken (first rule per document): "
                  + ", ".join(f"{k} {v}" for k, v in card["qualityRules"].items())]
    lines += ["", "## Deduplication", "",
              f"- Exact: {card['dedup']['exact']} removed ({card['dedup']['exactRate']:.1%} of documents reaching it)",
              f"- Fuzzy: {card['dedup']['fuzzy']} removed ({card['dedup']['fuzzyRate']:.1%}) in "
              f"{card['dedup']['clusters']} clusters ({card['dedup']['candidatePairs']} candidate pairs from "
              f"the LSH bands, {card['dedup']['verifiedPairs']} kept as edges); MinHash "
              + ", ".join(f"{k} {v}" for k, v in card["dedup"]["params"].items()),
              "", "## Languages", "", "| natural language | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in st["languages"].items()]
    lines += ["", "| programming language | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in st["programmingLanguages"].items()]
    lines += ["", "## Licences of kept documents", "", "| licence | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card["licenses"].items()]
    lines += ["", f"PII redacted: {card['piiRedacted']} matches."]
    removed = card.get("linesRemoved") or {}
    if removed.get("lines"):
        lines += [f"C4 line cleaning removed {removed['lines']} lines from {removed['documents']} kept documents."]
    lines += [""]
    path = out / "datacard.md"
    path.write_text("\n".join(lines))
    return path
