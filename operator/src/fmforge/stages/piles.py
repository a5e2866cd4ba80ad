"""Pile versions as the stages read them: the catalog, the tables, a version resolved, then streamed.

Shared by every stage that reads a pile (the DataPile publishes through `catalog` and
`table_name`; the TrainingRun, ModelCard and TunedModel read).

`snapshot_of` finds the documents snapshot a `dataPileRef` (tag, snapshot id, or the latest) names;
`pin` turns it into the exact Iceberg snapshots to read, with the version's tokenizer and
lineage, and refuses a missing tag or a pile without a sequences table before any work starts.
`sequences` is the Ray Data dataset of one split of that snapshot: read from Iceberg by Ray Data
tasks and streamed on, so that no process holds the pile. Called by the TrainingRun stage
(`fmforge.stages.train`), the ModelCard stage (`fmforge.stages.card`) and, for a pile's
documents as tuning examples, the TunedModel stage.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import url2pathname

import pyarrow as pa

from . import raysession
from .base import InputError, InvalidSpec, StageContext

#: The documents snapshot's property holding the version's digest.
PROP_DIGEST = "fmforge.digest"

#: The documents snapshot's property naming each other table's snapshot of the version.
PROP_SNAPSHOT = {"sequences": "fmforge.sequences-snapshot-id", "dropped": "fmforge.dropped-snapshot-id"}

#: The documents snapshot's property naming the version's tokenizer (a URI).
PROP_TOKENIZER = "fmforge.tokenizer"


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
    """The documents and sequences tables of a pile."""
    return table_name(namespace, pile, "documents"), table_name(namespace, pile, "sequences")


def table_name(namespace: str, pile: str, which: str) -> str:
    """The table of `which` (documents, sequences, dropped) of a pile."""
    return f"{namespace}.{pile.replace('-', '_')}_{which}"


@dataclass(frozen=True)
class PinnedPile:
    """One version of a pile, pinned to its snapshots."""

    name: str
    tag: str | None
    snapshot_id: int
    """The version's id: the snapshot of the documents table."""
    sequences_table: str
    sequences_snapshot_id: int
    digest: str | None
    tokenizer: Path
    """The version's tokenizer, in Hugging Face layout."""
    sequence_length: int
    catalog_kwargs: dict[str, str]
    """What `pyiceberg.catalog.load_catalog` needs to open the catalog again in a Ray task."""
    data_card: str | None = None
    documents_table: str = ""
    """The documents table (read by `documents`)."""

    def lineage(self) -> dict[str, Any]:
        """The status' `dataPile` (wire form)."""
        out = {"name": self.name, "snapshotId": str(self.snapshot_id), "tag": self.tag, "digest": self.digest,
               "sequencesSnapshotId": str(self.sequences_snapshot_id), "dataCard": self.data_card}
        return {k: v for k, v in out.items() if v is not None}


def catalog_kwargs(cat) -> dict[str, str]:
    """The catalog's name and properties, as `load_catalog` takes them (Ray Data's read tasks open
    the catalog themselves)."""
    return {"name": cat.name, **{k: str(v) for k, v in cat.properties.items()}}


def snapshot_of(ctx: StageContext, ref, field: str):
    """(catalog, documents table, snapshot) of the version `ref` (a DataPileRef: tag, snapshot id,
    or the latest) names; `field` is its path in the spec, for the error messages."""
    from pyiceberg.exceptions import NoSuchTableError

    cat = catalog(ctx.state_dir)
    docs_name = table_name(ctx.namespace, ref.name, "documents")
    try:
        docs = cat.load_table(docs_name)
    except NoSuchTableError:
        raise InputError(f"{field}: DataPile {ref.name} has no published version (no table {docs_name} in the "
                         f"pile catalog); run the DataPile first") from None
    if ref.snapshot_id is not None:
        snap = docs.snapshot_by_id(int(ref.snapshot_id))
        if snap is None:
            raise InvalidSpec(f"{field}.snapshotId: DataPile {ref.name} has no snapshot {ref.snapshot_id}; "
                              f"its versions are {_versions(docs)}")
    elif ref.tag is not None:
        snap = docs.snapshot_by_name(ref.tag)
        if snap is None:
            tags = sorted(k for k in docs.refs() if k != "main")
            raise InvalidSpec(f"{field}.tag: DataPile {ref.name} has no version tagged {ref.tag!r}; its tags are "
                              f"{', '.join(tags) or 'none'}: use one of them, or add the tag to the pile's "
                              f"publish.tags")
    else:
        snap = docs.current_snapshot()
        if snap is None:
            raise InputError(f"{field}: DataPile {ref.name} has no published version; run the DataPile first")
    return cat, docs, snap


def pin(ctx: StageContext, ref, field: str) -> PinnedPile:
    """The version `ref` (a DataPileRef) names, checked to be trainable; `field` is its path in
    the spec, for the error messages."""
    from pyiceberg.exceptions import NoSuchTableError

    cat, docs, snap = snapshot_of(ctx, ref, field)
    seq_name = table_name(ctx.namespace, ref.name, "sequences")
    props = snap.summary.additional_properties if snap.summary else {}
    seq_snap = props.get("fmforge.sequences-snapshot-id")
    try:
        seqs = cat.load_table(seq_name)
    except NoSuchTableError:
        seqs = None
    if seq_snap is None or seqs is None or seqs.snapshot_by_id(int(seq_snap)) is None:
        raise InputError(f"{field}: DataPile {ref.name} version {snap.snapshot_id} has no sequences table "
                         f"({seq_name}); publish the pile with tokenize.sequenceLength set, then train on it")
    tok = props.get(PROP_TOKENIZER)
    if tok and tok.startswith("file://"):
        tok = url2pathname(tok.removeprefix("file://"))
    # Versions published before the tokenizer was recorded as a URI hold a path: absolute, or
    # relative to where that run was started (which only works from there).
    if not tok or not (Path(tok) / "tokenizer.json").is_file():
        raise InputError(f"{field}: the tokenizer of DataPile {ref.name} version {snap.snapshot_id} is missing "
                         f"(recorded at {tok or 'nowhere'}); re-run the DataPile to publish it again")
    first = seqs.scan(snapshot_id=int(seq_snap), selected_fields=("input_ids",), limit=1).to_arrow()
    if first.num_rows == 0:
        raise InputError(f"{field}: DataPile {ref.name} version {snap.snapshot_id} has no sequences")
    status = (ctx.inputs.get(f"DataPile/{ref.name}") or {}).get("status") or {}
    card = status.get("dataCard") if (status.get("version") or {}).get("snapshotId") == str(snap.snapshot_id) else None
    return PinnedPile(
        name=ref.name, tag=ref.tag, snapshot_id=snap.snapshot_id, sequences_table=seq_name,
        sequences_snapshot_id=int(seq_snap), digest=props.get(PROP_DIGEST), tokenizer=Path(tok),
        sequence_length=len(first.column("input_ids")[0]), catalog_kwargs=catalog_kwargs(cat), data_card=card,
        documents_table=table_name(ctx.namespace, ref.name, "documents"),
    )


def _versions(table) -> str:
    return ", ".join(str(s.snapshot_id) for s in table.snapshots()) or "none"


def count(pile: PinnedPile, split: str) -> int:
    """Sequences of one split (reads the split column only)."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.expressions import EqualTo

    t = load_catalog(**pile.catalog_kwargs).load_table(pile.sequences_table)
    scan = t.scan(snapshot_id=pile.sequences_snapshot_id, row_filter=EqualTo("split", split),
                  selected_fields=("split",))
    return scan.count()


def sequences(pile: PinnedPile, split: str):
    """A Ray Data dataset of one split's sequences (`input_ids`, `length`) at the pinned snapshot;
    nothing is read until a consumer iterates it.

    pyiceberg plans the scan (the snapshot's manifests, pruned by the split's column statistics);
    Ray Data tasks read the planned Parquet data files and keep the split's rows. Not
    `ray.data.read_iceberg`: its dataset keeps the loaded table, whose SQL catalog holds an
    SQLAlchemy engine that cannot be pickled, and Ray Train pickles the datasets it shards."""
    paths = _split_files(pile, pile.sequences_table, pile.sequences_snapshot_id, split)
    return _read_split(paths, split, ("input_ids", "length"))


def documents(pile: PinnedPile, split: str, columns: tuple[str, ...] = ("text",)):
    """A Ray Data dataset of one split's documents (`columns`) at the version's documents
    snapshot, in the stored order; read as `sequences` is (pyiceberg plans, Ray Data reads), for
    a model that tokenizes the text itself (a perplexity across tokenizers)."""
    paths = _split_files(pile, pile.documents_table, pile.snapshot_id, split)
    if not paths:
        raise InputError(f"DataPile {pile.name} version {pile.snapshot_id} has no {split} documents to evaluate on; "
                         f"use the other split or a pile with a validation split")
    return _read_split(paths, split, columns)


def _split_files(pile: PinnedPile, table: str, snapshot_id: int, split: str) -> list[str]:
    """The Parquet files of `table` at `snapshot_id` that hold rows of `split` (pyiceberg prunes
    the snapshot's manifests by the split column's statistics)."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.expressions import EqualTo

    t = load_catalog(**pile.catalog_kwargs).load_table(table)
    tasks = list(t.scan(snapshot_id=snapshot_id, row_filter=EqualTo("split", split)).plan_files())
    if any(task.delete_files for task in tasks):
        raise InputError(f"DataPile {pile.name}: the table {table} has row-level delete files at snapshot "
                         f"{snapshot_id}; fmforge publishes whole-file versions only, so re-publish the pile")
    return [task.file.file_path for task in tasks]


def _read_split(paths: list[str], split: str, columns: tuple[str, ...]):
    """A Ray Data dataset of `columns` of the rows of `split` in `paths`."""
    import ray
    from ray.data.expressions import col

    ds = ray.data.read_parquet(paths).select_columns([*columns, "split"])
    return ds.filter(expr=col("split") == split).select_columns(list(columns))


def ray_init(state_dir: Path, cpus: int) -> None:
    """Start the local Ray (or attach to the RayJob's cluster) with at least `cpus` CPUs, and
    set Ray Data up to feed training in a fixed order."""
    import ray

    raysession.start(state_dir, cpus)
    # A resumed attempt skips the batches its checkpoint had consumed: the order must not change.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' per-file "Loading weights" bars: the reporter shows the stage's progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def read_version(cat, namespace: str, pile: str, ref: str | int | None = None, which: str = "documents") -> pa.Table:
    """Read a version of the pile by tag, snapshot id, or the latest (None): its documents,
    sequences or dropped documents (`which`)."""
    docs_name = table_name(namespace, pile, "documents")
    t = cat.load_table(docs_name)
    snap = t.current_snapshot() if ref is None else (
        t.snapshot_by_name(ref) if isinstance(ref, str) else t.snapshot_by_id(int(ref)))
    if snap is None:
        raise KeyError(f"DataPile {pile}: no version {ref!r}")
    if which == "documents":
        return t.scan(snapshot_id=snap.snapshot_id).to_arrow()
    sid = (snap.summary.additional_properties if snap.summary else {}).get(PROP_SNAPSHOT[which])
    if sid is None:
        raise KeyError(f"DataPile {pile}: version {snap.snapshot_id} has no {which} table (a version keeps its "
                       f"dropped documents only with publish.keepDropped)")
    return cat.load_table(table_name(namespace, pile, which)).scan(snapshot_id=int(sid)).to_arrow()
