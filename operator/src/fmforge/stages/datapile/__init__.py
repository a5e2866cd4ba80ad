"""The DataPile stage: sources in, a versioned and tagged pile out.

    list sources → read (Ray tasks) → [repair; reuse the version if it exists]
    → categorize, filter, exact hash, MinHash (Ray tasks)
    → exact dedup (driver: ids and hashes) → fuzzy dedup (band keys shuffled on Ray, candidate
      pairs and components on the driver)
    → tokenizer (trained on a bounded sample on one worker, or loaded)
    → keep, split, encode (tiktoken, checked against tokenizers), pack, write Parquet (Ray tasks)
    → publish (the driver commits the files' metadata: Iceberg snapshots and tags) → data card

`run()` runs STEPS in order; each is `step(work: Work) -> None` and reads what the steps before it
left in `work`. The documents stay in Ray's object store and on the workers from the read to the
written files: the driver holds ObjectRefs and compact columns (ids, lengths, hashes, candidate
pairs, counters), never text or token ids (workers.py says what runs where). The same code runs
in `fmforge run` (a local Ray) and as the entrypoint of a RayJob (the KubeRay cluster's Ray).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...api.v1alpha1.common import quantity_value
from ...api.v1alpha1.datapile import DataPileSpec, DocumentCounts, PileStats, PileVersion
from .. import models, raysession
from ..base import InputError, InvalidSpec, OutputError, StageContext, StageError, StageResult, output_error, unwritable
from ..piles import PROP_TOKENIZER
from ..uris import locate
from . import datacard as dc
from . import dedup as dd
from . import publish as pub
from . import tokenize as tk
from . import workers as wk
from .filters import effective_rules
from .sources import FilesRead, SourceFiles, SourceRead, list_source, scan_file, summarize


@dataclass
class Work:
    """What the steps share: the context, and what each step found or made."""

    ctx: StageContext
    """The run's context: spec, directories, progress reporter."""
    spec: DataPileSpec
    """The DataPile's spec."""
    listed: list[SourceFiles] = field(default_factory=list)
    """Each source's files and sizes."""
    chunks: list[wk.Chunk] = field(default_factory=list)
    """Groups of files or parts of a large file, one read task each."""
    target: float = 0.0
    """Work per piece (workers.piece_target)."""
    docs: list = field(default_factory=list)
    """ObjectRef of each chunk's documents (released once processed)."""
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    """(chunk, first row, end row) of each piece: the unit of every later task."""
    reads: list[SourceRead] = field(default_factory=list)
    """What was read of each source."""
    at_read: Counter = field(default_factory=Counter)
    """Records dropped at read, by reason."""
    digest: str = ""
    """The version's digest: spec and sources' content."""
    cat: Any = None
    """The Iceberg catalog."""
    processed: list = field(default_factory=list)
    """ObjectRef of each processed piece (text, annotations, hashes, signatures)."""
    index: pa.Table | None = None
    """The compact columns of every document (workers.INDEX_COLUMNS), in piece order."""
    step_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds of each per-document step on the workers, summed."""
    counters: dict[str, int] = field(default_factory=dict)
    """Documents dropped, by reason."""
    reason: np.ndarray | None = None
    """Per row of the index: why dedup drops it (duplicateExact, duplicateFuzzy), else None."""
    duplicate_of: np.ndarray | None = None
    """Per row of the index: the id of the document a duplicate copies, else None."""
    kept: np.ndarray | None = None
    """Which rows of the index are kept."""
    dedup: dc.CardDedup | None = None
    """What dedup found."""
    version_dir: Path | None = None
    """The version's artifact folder (tokenizer, data card)."""
    tokenizer_json: str = ""
    """The version's tokenizer, as tokenizer.json text (what the write tasks encode with)."""
    tokenizer_source: str = ""
    """How the tokenizer was made, for the data card."""
    tables: dict = field(default_factory=dict)
    """The Iceberg tables this version writes (documents, sequences[, dropped])."""
    attempt: str = ""
    """The attempt's folder name under each table's data folder."""
    written: list[wk.Written] = field(default_factory=list)
    """What each piece's write task wrote."""
    encoder: dc.CardEncoder | None = None
    """Which encoder made the token ids, summed over the pieces."""
    committing: bool = False
    """Whether commit_version has begun committing (the attempt's files are no longer ours to drop)."""
    published: pub.Published | None = None
    """The version, once committed (staged, then made visible)."""
    card_md: Path | None = None
    """The version's data card (Markdown)."""
    stats: PileStats | None = None
    """The version's counters, once everything is written."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each step done."""
    result: StageResult | None = None
    """Set by a step that ends the run (the version exists already, or the run is done)."""


def list_sources(w: Work) -> None:
    """List every source's files (names and sizes) and plan the read chunks."""
    confine = not w.ctx.allow_outside_paths
    w.listed = [list_source(s, w.ctx.base_dir, confine) for s in w.spec.sources]
    total = sum(float(wk.cost_of(size, sf.source.format == "code")) for sf in w.listed for *_, size in sf.files)
    w.target = wk.piece_target(total)
    w.chunks = wk.plan_chunks(w.listed, w.target)
    w.ctx.reporter.advance(len(w.chunks), files=sum(len(sf.files) for sf in w.listed),
                           mb=f"{sum(s for sf in w.listed for *_, s in sf.files) / 1e6:.1f}")


def read(w: Work) -> None:
    """Read the chunks on the workers; sum what was read per source; the version's digest. If
    that version is published already, end here."""
    raysession.start(w.ctx.state_dir, w.spec.resources.workers * w.spec.resources.cpus_per_worker)
    # a file read in parts is hashed (and for JSON lines its parts' starts found) by one pass
    scan = wk.remote(scan_file)
    scans = {}
    for c in w.chunks:
        if c.parts is not None and (c.source.name, c.files[0][1]) not in scans:
            scans[c.source.name, c.files[0][1]] = scan.remote(c.source, c.fs, c.files[0], c.parts[2])
    task = wk.remote(wk.read_chunk, num_returns=3)
    refs = [task.remote(c, w.target, scans[c.source.name, c.files[0][1]] if wk.needs_scan(c) else None)
            for c in w.chunks]
    w.docs = [r[0] for r in refs]
    parts = wk.gather([r[1] for r in refs], w.ctx.reporter.advance)
    bounds = wk.gather([r[2] for r in refs])
    scanned = dict(zip(scans, wk.gather(list(scans.values())), strict=True))
    w.pieces = [(c, a, b) for c, bs in enumerate(bounds) for a, b in zip(bs, bs[1:], strict=False)]
    for sf in w.listed:
        name = sf.source.name
        files = [FilesRead(0, {}, [(f.rel, f.sha256, f.size)]) for (src, _), f in scanned.items() if src == name]
        r = summarize(sf, [p for c, p in zip(w.chunks, parts, strict=True) if c.source.name == name] + files)
        w.reads.append(r)
        w.at_read.update(r.dropped)
        w.ctx.reporter.log("Read source", source=r.name, documents=r.documents, mb=f"{r.bytes / 1e6:.1f}",
                           **{f"dropped_{k}": v for k, v in r.dropped.items()})
    read_total = sum(r.documents for r in w.reads) + sum(w.at_read.values())
    if not w.pieces:
        raise InputError(f"no documents to process: the sources' {read_total} records were all dropped at read "
                         f"({', '.join(f'{k}: {v}' for k, v in w.at_read.items())}); fix the data or the sources' "
                         f"invalidText and maxDocumentBytes")
    if w.spec.tokenizer.uri:
        # Loaded now: its content is part of the version (another tokenizer, another version).
        uri = w.spec.tokenizer.uri
        if models.is_gguf(uri):
            # A GGUF model's tokenizer lives in its metadata: read from the model's conversion
            # (cached, and the same directory a TrainingRun continuing that model will load).
            fs, path = None, models.load(w.ctx, uri, "spec.tokenizer.uri").path
        else:
            fs, path = locate(uri, w.ctx.base_dir, confine=not w.ctx.allow_outside_paths)
        w.tokenizer_json = tk.load_tokenizer(path, fs).to_str()
        w.tokenizer_source = f"loaded from {uri}"
    w.digest = _digest(w.spec, w.reads, w.tokenizer_json)
    w.cat = pub.catalog(w.ctx.state_dir)
    repaired = pub.repair(w.cat, w.ctx.namespace, w.ctx.name)
    if repaired:
        w.ctx.reporter.log("Repaired the pile's tables after an interrupted publish", pile=w.ctx.name, **repaired)
    existing = pub.find_version(w.cat, w.ctx.namespace, w.ctx.name, w.digest)
    if existing is not None:
        # Same spec, same sources: the version exists; make sure its tags are on it, publish nothing.
        tags = w.spec.publish.tags
        pub.move_tags(w.cat.load_table(existing.table), existing.snapshot_id, tags)
        props = w.cat.load_table(existing.table).snapshot_by_id(existing.snapshot_id).summary.additional_properties
        for which, prop in pub.PROP_SNAPSHOT.items():
            if prop in props:
                pub.move_tags(w.cat.load_table(pub.table_name(w.ctx.namespace, w.ctx.name, which)), int(props[prop]),
                              tags)
        w.ctx.reporter.log("Found the version already published", snapshot=existing.snapshot_id)
        w.result = _reuse(w.ctx, w.cat, existing, w.digest, w.reads)


def process(w: Work) -> None:
    """Categorize, filter, hash and MinHash each piece on the workers; gather the index."""
    task = wk.remote(wk.process_piece, num_returns=3)
    refs = [task.remote(w.docs[c], a, b, w.spec) for c, a, b in w.pieces]
    w.processed = [r[0] for r in refs]
    # Ray keeps a chunk while a task that reads it is pending: dropping the driver's references
    # now frees each chunk as soon as its last piece is processed.
    w.docs = []
    indexes = wk.gather([r[1] for r in refs], w.ctx.reporter.advance, [b - a for _, a, b in w.pieces])
    for seconds in wk.gather([r[2] for r in refs]):
        for k, v in seconds.items():
            w.step_seconds[k] = w.step_seconds.get(k, 0.0) + v
    w.index = pa.concat_tables(indexes)
    counts = pc.value_counts(w.index.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]["values"].as_py()
        row = w.index.filter(pc.equal(w.index.column("id"), first)).slice(0, 1).to_pylist()[0]
        raise InputError(f"source {row['source']}: document ids repeat ({len(repeated)} of them; the first, {first}, "
                         f"{repeated[0]['counts'].as_py()} times in {row['path']}): the source's idField values are "
                         f"not unique within a file; use a unique field, or remove idField to number the records")
    dropped = w.index.column("dropped").to_numpy(zero_copy_only=False)
    w.counters = {f.type: 0 for f in w.spec.filters}
    w.counters.update(w.at_read)
    w.counters.update(Counter(d for d in dropped if d is not None))


def deduplicate(w: Work) -> None:
    """Exact dedup over the ids and hashes; fuzzy dedup over the candidate pairs of the LSH
    bands, grouped on the workers; per row, whether it is kept and, for a duplicate, why and of
    which document."""
    ids = np.asarray(w.index.column("id").to_numpy(zero_copy_only=False), dtype=object)
    alive = pc.is_null(w.index.column("dropped")).to_numpy(zero_copy_only=False)
    w.reason = np.full(len(ids), None, dtype=object)
    w.duplicate_of = np.full(len(ids), None, dtype=object)
    row_of = {doc: i for i, doc in enumerate(ids)}  # ids are unique (checked in process)
    reached_exact = int(alive.sum())
    n_exact = 0
    if w.spec.dedup.exact:
        h = np.stack([w.index.column("hash_hi").to_numpy(), w.index.column("hash_lo").to_numpy()], axis=1)
        dup, of = dd.exact_duplicates(ids[alive], h[alive])
        _mark(w, row_of, dup, of, "duplicateExact")
        n_exact = len(dup)
    reached_fuzzy = reached_exact - n_exact
    fz = w.spec.dedup.fuzzy
    n_fuzzy, clusters, candidates, edges = 0, 0, 0, 0
    if fz.enabled and reached_fuzzy:
        reaches = alive & (w.reason == None)  # noqa: E711 (numpy elementwise comparison)
        parts = wk.band_partitions(int(reaches.sum()) * fz.bands)
        band = wk.remote(wk.band_piece, num_returns=parts)
        bands = [band.remote(p, reaches[a:b], fz.bands, parts) for p, (a, b) in zip(w.processed, _rows(w), strict=True)]
        bands = [[b] if parts == 1 else list(b) for b in bands]
        reduce = wk.remote(wk.pairs_of_bands, num_returns=2)
        out = [reduce.remote(*[b[p] for b in bands]) for p in range(parts)]
        del bands  # the reduce tasks hold what they need
        # a pair found in bands that went to different partitions comes back once from each
        pairs = pa.concat_tables(wk.gather([o[0] for o in out])).group_by(["a", "b"]).aggregate([])
        candidates = sum(wk.gather([o[1] for o in out]))
        if fz.verify:
            pairs = _verify(w, pairs, fz.threshold, row_of, parts)
        edges = pairs.num_rows
        dup, of, clusters = dd.components(np.asarray(pairs.column("a").to_pylist(), dtype=object),
                                          np.asarray(pairs.column("b").to_pylist(), dtype=object))
        _mark(w, row_of, dup, of, "duplicateFuzzy")
        n_fuzzy = len(dup)
    w.counters["duplicateExact"] = n_exact
    w.counters["duplicateFuzzy"] = n_fuzzy
    w.kept = alive & (w.reason == None)  # noqa: E711
    read_total = w.index.num_rows + sum(w.at_read.values())
    kept = int(w.kept.sum())
    if kept == 0:
        raise InputError(
            f"no documents left after filtering and deduplication ({read_total} read; dropped "
            f"{', '.join(f'{k}: {v}' for k, v in w.counters.items() if v)}); loosen the filters or add sources")
    if read_total != kept + sum(w.counters.values()):  # an invariant, checked even under python -O
        raise RuntimeError(f"counters do not add up: read {read_total}, kept {kept}, dropped {w.counters}")
    w.dedup = dc.CardDedup(exact=n_exact, exact_rate=n_exact / max(reached_exact, 1),
                           fuzzy=n_fuzzy, fuzzy_rate=n_fuzzy / max(reached_fuzzy, 1), clusters=clusters,
                           candidate_pairs=candidates, verified_pairs=edges,
                           params=fz.model_dump(by_alias=True))


def _verify(w: Work, pairs: pa.Table, threshold: float, row_of: dict[str, int], parts: int) -> pa.Table:
    """The candidate pairs whose estimated Jaccard similarity reaches `threshold`: a second pass
    that fetches the signatures of the documents in a pair only, from the pieces holding them,
    and checks the pairs in `parts` tasks."""
    if not pairs.num_rows:
        return pairs
    involved = pc.unique(pa.concat_arrays([pairs.column("a").combine_chunks(), pairs.column("b").combine_chunks()]))
    rows = np.fromiter((row_of[i] for i in involved.to_pylist()), dtype=np.int64, count=len(involved))
    ends = np.array([b for _, b in _rows(w)])
    piece = np.searchsorted(ends, rows, side="right")  # the piece holding each row
    fetch = wk.remote(wk.piece_signatures)
    sigs = [fetch.remote(w.processed[p], involved.filter(pa.array(piece == p)))
            for p in np.unique(piece).tolist()]
    check = wk.remote(wk.verify_pairs)
    step = -(-pairs.num_rows // parts)
    out = [check.remote(threshold, pairs.slice(i, step), *sigs) for i in range(0, pairs.num_rows, step)]
    return pa.concat_tables(wk.gather(out))


def _mark(w: Work, row_of: dict[str, int], dup: np.ndarray, of: np.ndarray, reason: str) -> None:
    """Record that the documents `dup` go as `reason`, each a copy of the one in `of`."""
    rows = np.fromiter((row_of[d] for d in dup), dtype=np.int64, count=len(dup))
    w.reason[rows] = reason
    w.duplicate_of[rows] = of


def _rows(w: Work) -> list[tuple[int, int]]:
    """Each piece's rows in the index: [start, end)."""
    ends = np.cumsum([b - a for _, a, b in w.pieces])
    return [(int(e - (b - a)), int(e)) for e, (_, a, b) in zip(ends, w.pieces, strict=True)]


def tokenizer(w: Work) -> None:
    """Train the tokenizer on a bounded sample of the training split (on one worker), or load it."""
    # The version's artifacts live in a directory named by its digest. One that exists now was
    # left by an attempt that never published (a published digest is reused by `read`), so
    # nothing refers to it.
    w.version_dir = w.ctx.artifacts / w.digest.split(":", 1)[1][:16]
    if w.version_dir.exists():
        shutil.rmtree(w.version_dir)
    spec = w.spec
    if spec.tokenizer.train is not None:
        import ray

        tr = spec.tokenizer.train
        ids = w.index.column("id").filter(pa.array(w.kept)).to_pylist()
        sizes = w.index.column("nbytes").filter(pa.array(w.kept)).to_numpy()
        splits = tk.split_of(ids, spec.split.validation_fraction)
        sample = tk.training_sample(ids, sizes, splits, int(quantity_value(tr.sample_bytes)))
        sample_ref = ray.put(pa.array([ids[i] for i in sample], pa.string()))
        texts = [wk.remote(wk.sample_piece).remote(p, sample_ref) for p in w.processed]
        w.tokenizer_json = wk.gather([wk.remote(wk.train_tokenizer).remote(tr.vocab_size, tr.min_frequency,
                                                                             *texts)])[0]
        tok = tk.from_json(w.tokenizer_json)
        w.tokenizer_source = (f"trained: byte-level BPE, vocab {tok.get_vocab_size()}, on {len(sample)} documents "
                              f"({int(sizes[sample].sum()) / 1e6:.1f} MB) of the training split")
    else:  # loaded by `read`, whose digest covers it
        tok = tk.from_json(w.tokenizer_json)
    tk.special_ids(tok)  # a tokenizer without an end-of-text token fails here, before any file is written
    tk.save_tokenizer(tok, w.version_dir / "tokenizer")


def write(w: Work) -> None:
    """Keep, split, encode, pack and write each piece's Parquet files on the workers."""
    import ray

    schemas = {"documents": wk.DOC_SCHEMA, "sequences": tk.SEQ_SCHEMA}
    if w.spec.publish.keep_dropped:
        schemas["dropped"] = wk.DROPPED_SCHEMA
    w.tables = pub.tables(w.cat, w.ctx.namespace, w.ctx.name, schemas)
    w.attempt = pub.new_attempt(w.digest)
    out = {which: pub.output(t, w.attempt) for which, t in w.tables.items()}
    tok_ref = ray.put(w.tokenizer_json)
    task = wk.remote(wk.write_piece)
    refs, kept_per_piece = [], []
    for i, (p, (a, b)) in enumerate(zip(w.processed, _rows(w), strict=True)):
        # each task gets the driver's decisions for its own rows only
        decisions = pa.table({"keep": w.kept[a:b], "reason": pa.array(w.reason[a:b], pa.string()),
                              "duplicate_of": pa.array(w.duplicate_of[a:b], pa.string())},
                             schema=wk.DECISIONS_SCHEMA)
        refs.append(task.remote(p, i, decisions, tok_ref, w.spec.split.validation_fraction,
                                w.spec.tokenize.sequence_length, out["documents"], out["sequences"],
                                out.get("dropped")))
        kept_per_piece.append(int(w.kept[a:b].sum()))
    w.written = wk.gather(refs, w.ctx.reporter.advance, kept_per_piece)
    w.processed = []
    w.encoder = encoder_summary([x.encoding for x in w.written if x.encoding is not None])
    if w.encoder.fell_back:
        # loud: the pile is right (tokenizers' ids), but tiktoken and tokenizers disagree on this data
        w.ctx.reporter.log("Encoded pieces with tokenizers after tiktoken's ids differed", pieces=w.encoder.fell_back,
                           first=w.encoder.why)
    if sum(x.kept for x in w.written) != int(w.kept.sum()):  # the workers must keep what the driver decided
        raise RuntimeError(f"the workers wrote {sum(x.kept for x in w.written)} documents, the driver kept "
                           f"{int(w.kept.sum())}")


def encoder_summary(encodings: list[tk.Encoding]) -> dc.CardEncoder:
    """The data card's encoder section from what each piece's encoding reported."""
    pieces = dict(Counter(e.encoder for e in encodings))
    fell_back = [e for e in encodings if e.differed]
    why = fell_back[0].why if fell_back else next((e.why for e in encodings if e.why), "")
    return dc.CardEncoder(encoder=" and ".join(sorted(pieces)) or "none", pieces=pieces,
                          documents_checked=sum(e.checked for e in encodings), fell_back=len(fell_back), why=why,
                          seconds=round(sum(e.seconds for e in encodings), 3))


def commit_version(w: Work) -> None:
    """Commit the written files as one staged snapshot per table, write the version's data card,
    then make the version visible: a version anyone can read always has its card."""
    w.stats = _stats(w)  # counted once: the snapshot, the card and the status show the same figures
    files = {"documents": [x.documents for x in w.written if x.documents],
             "sequences": [x.sequences for x in w.written if x.sequences],
             "dropped": [x.dropped for x in w.written if x.dropped]}
    props = {
        pub.PROP_DIGEST: w.digest,
        "fmforge.spec-digest": _spec_digest(w.spec),
        "fmforge.sources": json.dumps({r.name: r.digest for r in w.reads}, sort_keys=True),
        "fmforge.stats": w.stats.model_dump_json(by_alias=True),
        PROP_TOKENIZER: (w.version_dir / "tokenizer").resolve().as_uri(),
        "fmforge.datacard": (w.version_dir / "datacard.md").resolve().as_uri(),
        "fmforge.generation": str(w.ctx.generation),
    }
    # From the first commit on, snapshots may refer to the attempt's files: a failure now leaves
    # them to the next run's repair, which knows which snapshots became visible.
    w.committing = True

    def card_first(staged: pub.Published) -> None:
        w.published = staged
        w.card_md = write_card(w)

    pub.publish(w.tables, files, w.spec.publish.tags, props, before_visible=card_first)
    w.ctx.reporter.log("Published version", snapshot=w.published.snapshot_id,
                       tags=",".join(w.spec.publish.tags) or None)


def write_card(w: Work) -> Path:
    """Write the data card of the staged version; the Markdown file."""
    spec, idx, kept = w.spec, w.index, pa.array(w.kept)
    stats = w.stats

    def counts(column: str, keep_only: bool = True) -> dict[str, int]:
        col = idx.column(column).filter(kept) if keep_only else idx.column(column)
        return {("none" if k is None else k): v for k, v in Counter(col.to_pylist()).most_common()}

    pii = idx.column("pii").filter(kept)
    removed = pc.fill_null(idx.column("lines_removed").filter(kept), 0)
    version = PileVersion(snapshot_id=str(w.published.snapshot_id), digest=w.digest,
                          created_at=w.published.created_at)
    return dc.write(dc.DataCard(
        name=w.ctx.name, version=version, tags=spec.publish.tags,
        sources=[dc.CardSource(name=r.name, uri=r.uri, license=s.license, files=r.files, documents=r.documents,
                               bytes=r.bytes, digest=r.digest) for r, s in zip(w.reads, spec.sources, strict=True)],
        stats=stats,
        quality_rules={k: v for k, v in counts("quality_rule", keep_only=False).items() if k != "none"},
        dedup=w.dedup, licenses=counts("license"), pii_redacted=int(pc.sum(pii).as_py() or 0),
        lines_removed=dc.LinesRemoved(lines=int(pc.sum(removed).as_py() or 0),
                                      documents=int(pc.sum(pc.greater(removed, 0)).as_py() or 0)),
        tokenizer=w.tokenizer_source, encoder=w.encoder, tokens_by_split=_tokens(w),
        sequence_length=spec.tokenize.sequence_length,
        timings={k: round(v, 3) for k, v in w.timings.items()},
        filters=[f.model_dump(by_alias=True) | ({"effectiveRules": effective_rules(f).model_dump(
            by_alias=True, exclude_none=True)} if f.type == "quality" else {}) for f in spec.filters],
        dropped_table=pub.table_name(w.ctx.namespace, w.ctx.name, "dropped") if "dropped" in w.tables else None,
    ), w.version_dir)


def result(w: Work) -> None:
    """The stage's result: the published version, its counters and card, and the lineage."""
    stats = w.stats
    w.result = StageResult(
        status=_status(w.published, w.spec.publish.tags, stats.model_dump(by_alias=True, mode="json"), w.card_md,
                       w.digest, w.reads),
        digest=w.digest,
        message=f"published snapshot {w.published.snapshot_id} ({stats.documents.kept}/{stats.documents.read} "
                f"documents, {stats.tokens} tokens)",
        lineage=_lineage(w.reads),
    )


#: The stage, step by step: (name shown in the progress, step).
STEPS: tuple[tuple[str, Callable[[Work], None]], ...] = (
    ("list sources", list_sources),
    ("read sources (Ray)", read),
    ("categorize, filter, hash (Ray)", process),
    ("deduplicate", deduplicate),
    ("tokenizer", tokenizer),
    ("tokenize, pack, write (Ray)", write),
    ("publish", commit_version),
    ("result", result),
)


def run(ctx: StageContext) -> StageResult:
    """The DataPile stage: STEPS in order, until one sets the result."""
    w = Work(ctx, ctx.spec)
    try:
        for name, step in STEPS:
            ctx.reporter.step(name, _total(w, step))
            t = time.monotonic()
            step(w)
            w.timings[name] = time.monotonic() - t
            if w.result is not None:
                return w.result
    except Exception as e:
        refused = None if isinstance(e, StageError) else unwritable(e)
        if refused is None:
            raise
        raise _refused_write(w, *refused) from e
    finally:
        if w.attempt and not w.committing:
            try:
                pub.discard(w.tables.values(), w.attempt)
            except OSError as e:  # the run's own error matters more; the next run's repair retries
                ctx.reporter.log("Could not remove the failed attempt's files", attempt=w.attempt, error=str(e))
    raise RuntimeError("the DataPile steps ended without a result")


def _refused_write(w: Work, code: int, path: str | None) -> OutputError:
    """One line for a write on the driver that the disk refused (the catalog's metadata, the
    tokenizer, the data card): where, and the fix that fits the place."""
    warehouse = str((w.cat.properties.get("warehouse") if w.cat is not None else None) or "")
    warehouse = warehouse.removeprefix("file://")
    state = str(w.ctx.state_dir.resolve())
    path = path.removeprefix("file://") if path else None
    if path is None:
        # pyarrow's errors often name no file: the tables are what the driver writes with it
        path = f"the pile's tables in {warehouse}" if warehouse else f"the state directory {state}"
    if warehouse and path.startswith(("the pile's", warehouse)):
        return output_error(code, path, wk.ELSEWHERE)
    if path.startswith(("the state", state)):
        return output_error(code, path, "use another state directory")
    return output_error(code, path, "write elsewhere")


def _total(w: Work, step: Callable[[Work], None]) -> int | None:
    """What a step's progress counts to: chunks read, documents processed, documents written."""
    if step is read:
        return len(w.chunks)
    if step is process:
        return sum(b - a for _, a, b in w.pieces)
    if step is write:
        return int(w.kept.sum())
    return None


def _stats(w: Work) -> PileStats:
    kept = pa.array(w.kept)

    def counts(column: str) -> dict[str, int]:
        return dict(Counter(x for x in w.index.column(column).filter(kept).to_pylist() if x).most_common())

    return PileStats(documents=DocumentCounts(read=w.index.num_rows + sum(w.at_read.values()), kept=int(w.kept.sum())),
                     dropped=w.counters, languages=counts("lang"), programming_languages=counts("prog_lang"),
                     tokens=sum(_tokens(w).values()), sequences=sum(x.sequence_count for x in w.written),
                     step_seconds={k: round(v, 3) for k, v in w.step_seconds.items()})


def _tokens(w: Work) -> dict[str, int]:
    out = {"train": 0, "validation": 0}
    for x in w.written:
        for k, v in x.tokens.items():
            out[k] += v
    return out


def _lineage(reads) -> list[dict[str, Any]]:
    """The sources as read, with their digests: the status's `sources` and the local record's lineage."""
    return [{"name": r.name, "uri": r.uri, "digest": r.digest} for r in reads]


def _status(published: pub.Published, tags: list[str], stats: dict[str, Any], md: Path, digest: str, reads) -> dict:
    return {
        "version": {"snapshotId": str(published.snapshot_id), "digest": digest, "createdAt": published.created_at},
        "sources": _lineage(reads),
        "tags": list(tags),
        "stats": stats,
        "dataCard": md.resolve().as_uri(),
        "table": published.table,
    }


def _reuse(ctx: StageContext, cat, existing: pub.Published, digest: str, reads) -> StageResult:
    props = {}
    snap = cat.load_table(existing.table).snapshot_by_id(existing.snapshot_id)
    if snap and snap.summary:
        props = snap.summary.additional_properties
    stats = json.loads(props.get("fmforge.stats", "{}"))
    tags = pub.tags_of(cat, existing.table, existing.snapshot_id)
    # where the version's card was written (recorded since the card is written before the
    # version becomes visible); older versions: the artifact folder of this run
    recorded = props.get("fmforge.datacard")
    card = Path(recorded.removeprefix("file://")) if recorded else ctx.artifacts / digest.split(":", 1)[1][:16] / \
        "datacard.md"
    card = card.resolve() if card.is_file() else None
    return StageResult(
        status={"version": {"snapshotId": str(existing.snapshot_id), "digest": digest,
                            "createdAt": existing.created_at},
                "sources": _lineage(reads), "tags": tags, "stats": stats, "table": existing.table,
                **({"dataCard": card.as_uri()} if card else {})},
        digest=digest,
        message=f"version {existing.snapshot_id} already published with this spec and these sources; nothing new",
        lineage=_lineage(reads),
    )


def _spec_digest(spec: DataPileSpec) -> str:
    body = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _digest(spec: DataPileSpec, reads, tokenizer_json: str = "") -> str:
    """The version's digest: the spec (tags and resources aside: retagging is not a new version,
    nor is running on more workers), the sources' content and a loaded tokenizer's content."""
    body = spec.model_dump(mode="json", by_alias=True)
    body.pop("publish", None)
    body.pop("resources", None)
    if spec.publish.keep_dropped:  # a version with its dropped documents is another version (only then:
        body["keepDropped"] = True  # the digests of versions made without the field stay the same)
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    for r in reads:
        h.update(f"{r.name}\0{r.digest}\n".encode())
    if tokenizer_json:  # only then: the digests of versions with a trained tokenizer stay the same
        h.update(b"tokenizer\0" + hashlib.sha256(tokenizer_json.encode()).hexdigest().encode())
    return "sha256:" + h.hexdigest()


__all__ = ["run", "STEPS", "Work", "InvalidSpec"]
