"""Publish a pile version: Iceberg snapshots, tags, and the data card.

Two Iceberg tables per pile, `<namespace>.<pile>_documents` (the kept documents with their
annotations) and `<namespace>.<pile>_sequences` (the packed token sequences). A version is one
snapshot of each (the first an append, later ones an overwrite that swaps the data files); the
documents snapshot is the version's id and its properties record the spec digest, source
digests, counters and the sequences snapshot. Tags move to the new
snapshots only after both commits, in one metadata commit per table: a run that fails before
that leaves every tag, and so every published version, exactly as it was.

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
    reused: bool
    table: str


def find_version(cat, namespace: str, pile: str, digest: str) -> Published | None:
    """The snapshot already published with `digest`, if any (a re-run publishes nothing new)."""
    from pyiceberg.exceptions import NoSuchTableError

    docs_name, _ = table_names(namespace, pile)
    try:
        t = cat.load_table(docs_name)
    except NoSuchTableError:
        return None
    for snap in reversed(t.snapshots()):
        props = snap.summary.additional_properties if snap.summary else {}
        if props.get(PROP_DIGEST) == digest:
            return Published(snap.snapshot_id, int(props.get("fmforge.sequences-snapshot-id", 0)),
                             datetime.fromtimestamp(snap.timestamp_ms / 1000, timezone.utc).isoformat(),
                             True, docs_name)
    return None


def publish(cat, namespace: str, pile: str, docs: pa.Table, seqs: pa.Table, tags: list[str],
            properties: dict[str, str]) -> Published:
    """Commit both tables, then move the tags; returns the new version."""
    docs_name, seq_name = table_names(namespace, pile)
    dt = _table(cat, docs_name, docs.schema)
    st = _table(cat, seq_name, seqs.schema)
    seq_snap = replace(st, seqs, properties)
    replace(dt, docs, {**properties, "fmforge.sequences-snapshot-id": str(seq_snap)})
    snap = dt.current_snapshot()
    move_tags(dt, snap.snapshot_id, tags)
    move_tags(st, seq_snap, tags)
    return Published(snap.snapshot_id, seq_snap,
                     datetime.fromtimestamp(snap.timestamp_ms / 1000, timezone.utc).isoformat(), False, docs_name)


def replace(table, df: pa.Table, properties: dict[str, str]) -> int:
    """Make `df` the table's contents in one snapshot, and return its id.

    pyiceberg's `overwrite` commits two snapshots (a delete, then an append); a pile version is
    one: an `append` for the first version, then an `overwrite` that removes the previous data
    files and adds the new ones in the same snapshot. Readers see the old contents or the new,
    never an empty table.

    pyiceberg has no public call for this; `_dataframe_to_data_files` is what its own overwrite
    writes with. Should a pyiceberg release drop it, the version is published with `overwrite`
    (two snapshots, the same data and tags)."""
    try:
        from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible, _dataframe_to_data_files
    except ImportError:
        table.overwrite(df, snapshot_properties=properties)
        return table.current_snapshot().snapshot_id

    _check_pyarrow_schema_compatible(table.schema(), provided_schema=df.schema)
    if table.current_snapshot() is None:
        table.append(df, snapshot_properties=properties)
        return table.current_snapshot().snapshot_id
    previous = [task.file for task in table.scan().plan_files()]
    with table.transaction() as tx:
        with tx.update_snapshot(snapshot_properties=properties).overwrite() as snap:
            for data_file in previous:
                snap.delete_data_file(data_file)
            for data_file in _dataframe_to_data_files(table_metadata=tx.table_metadata, df=df, io=table.io,
                                                      write_uuid=snap.commit_uuid):
                snap.append_data_file(data_file)
    return table.current_snapshot().snapshot_id


def move_tags(table, snapshot_id: int, tags: list[str]) -> None:
    if not tags:
        return
    refs = table.refs()
    ms = table.manage_snapshots()
    for tag in tags:
        if tag in refs:
            if refs[tag].snapshot_id == snapshot_id:
                continue
            ms = ms.remove_tag(tag)
        ms = ms.create_tag(snapshot_id, tag)
    ms.commit()


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
              f"{card['dedup']['clusters']} clusters; MinHash "
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
