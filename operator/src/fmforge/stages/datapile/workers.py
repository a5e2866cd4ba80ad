"""The DataPile's Ray plumbing: what runs on the Ray workers, and how the driver schedules it.

The driver lists the sources (names and sizes), plans chunks of files, and from then on holds
only ObjectRefs of the documents (which stay in Ray's object store, spilled to disk when it
fills) and the compact columns it needs for its decisions: ids, lengths, exact hashes, the
candidate pairs of the LSH bands and counters. Text and token ids never reach it.

    scan_file       one pass over a file read in parts: its hash, and for JSON lines where each
                    part starts and the lines before it (sources.py)
    read_chunk      one chunk of a source's files, or parts of one large file → its documents,
                    per-file digests, and the row ranges of its pieces (each piece about
                    `target` bytes of work; a part of a file always starts a piece)
    process_piece   categorize, filter, exact hash, MinHash of one piece → the processed piece
                    (stays on the workers) and its index (compact columns, to the driver)
    band_piece      the LSH band keys of one processed piece, hash-partitioned into P parts
                    (P from the number of band rows: band_partitions)
    pairs_of_bands  one partition of every piece's band rows → the candidate pairs in it
    piece_signatures  with `verify`: the signatures of a piece's documents in candidate pairs
    verify_pairs    with `verify`: the candidate pairs whose estimated similarity is enough
    sample_piece    the texts of a piece that the tokenizer trains on (bounded by sampleBytes)
    train_tokenizer the tokenizer, trained on the sample
    write_piece     keep, split, encode (tiktoken, checked against `tokenizers` on a sample;
                    tokenize.py), pack and write one piece's Parquet files (documents,
                    sequences, and with keepDropped the dropped documents)

The band grouping is a hash shuffle written with Ray tasks: each piece's band rows go to P
partitions by band key (a task with P returns), and each partition's task sorts its rows and
emits the pairs of each bucket. Every bucket lands whole in one partition, so the pairs do not
depend on P or on the pieces; P follows the number of band rows (band_partitions), not the CPUs.
With `verify`, the band rows still carry no signature: a second pass fetches those of the
documents in a candidate pair from their pieces (piece_signatures) and checks the distinct pairs
(verify_pairs), instead of every band row carrying its document's signature. Ray Data's
`groupby(...).map_groups` does the same grouping but calls the UDF once per bucket, and nearly
every bucket holds one document: on 280,000 band rows (20,000 documents x 14 bands, 2 CPUs) it
took 13.6 s where this shuffle took 2.0 s (`python tests/bench/bench_bands.py`).

A piece is the unit of every task, numbered in the order of the listing, so file names and
sequence ids are the same on every run and every retry. Tasks are pure or write files named by
their piece: Ray retries a task whose worker died (`max_retries`), and the retry writes the same
file again. Errors a user must fix (`InputError`, `InvalidSpec`) come back as themselves, and a
write the disk refused (full, over quota, read-only, forbidden) as one line (`OutputError`)
instead of Ray's traceback.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...api.v1alpha1.datapile import DataPileSpec, Source
from ..base import StageError, output_error, unwritable
from . import dedup as dd
from . import tokenize as tk
from .annotate import annotate
from .filters import build_steps
from .sources import FileScan, FilesRead, SourceFiles, read_files, read_in_parts, read_part

#: Relative cost per byte of a prose document against a code file in process_piece (measured on
#: the quickstart corpus: 0.9 s/MB against 0.18 s/MB on one core).
PROSE_COST = 5.0

#: Columns of the index of each processed piece: all the driver gathers about a document.
INDEX_COLUMNS = ("id", "source", "path", "dropped", "quality_rule", "hash_hi", "hash_lo", "nbytes", "lang",
                 "prog_lang", "license", "pii", "lines_removed")

#: Columns of the published documents table.
DOC_COLUMNS = ("id", "source", "path", "text", "is_code", "lang", "lang_confidence", "prog_lang", "license",
               "source_license", "hap_score", "pii", "split")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("path", pa.string()), ("text", pa.large_string()),
    ("is_code", pa.bool_()), ("lang", pa.string()), ("lang_confidence", pa.float32()), ("prog_lang", pa.string()),
    ("license", pa.string()), ("source_license", pa.string()), ("hap_score", pa.float32()), ("pii", pa.int32()),
    ("split", pa.string()),
])

#: The dropped documents (publish.keepDropped): why each went, and of which document a
#: duplicate is a copy.
DROPPED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("path", pa.string()), ("text", pa.large_string()),
    ("reason", pa.string()), ("rule", pa.string()), ("duplicate_of", pa.string()),
])

#: What the driver decides for each row of a piece, in the piece's order: keep it or not, and for
#: a duplicate why (duplicateExact, duplicateFuzzy) and of which document.
DECISIONS_SCHEMA = pa.schema([("keep", pa.bool_()), ("reason", pa.string()), ("duplicate_of", pa.string())])

#: Sequence ids: the piece's number in the high bits, the sequence's number in the piece below.
SEQ_BITS = 32

#: How to write the pile's files somewhere else, in the messages of a refused write.
ELSEWHERE = "point the catalog's warehouse elsewhere"


def cost_of(nbytes: int | np.ndarray, is_code: bool | np.ndarray):
    """Relative work of documents: bytes, times PROSE_COST for prose (language detection and HAP
    run on prose only)."""
    return nbytes * np.where(is_code, 1.0, PROSE_COST)


def piece_target(total_cost: float) -> float:
    """Work per piece: about 1/32 of the pile, between 1 MiB and 128 MiB of code-equivalent bytes.
    It depends on the data only, never on the cluster, so a pile packs into the same sequences on
    any number of workers."""
    return float(min(max(total_cost / 32, 1 << 20), 128 << 20))


@dataclass(frozen=True)
class Chunk:
    """Files of one source that one read task reads, or parts of one large file."""

    index: int
    source: Source
    fs: Any
    files: list[tuple[str, str, int]]
    parts: tuple[int, int, int] | None = None
    """Of a file read in parts (the only one in `files`): the first and end part this chunk
    reads, and how many parts the file has."""


def plan_chunks(listed: Sequence[SourceFiles], target: float, parts_per_chunk: int = 1) -> list[Chunk]:
    """Each source's files in order, grouped into chunks of about `target` work. A file of about
    two pieces' work or more that can be read in parts (sources.read_in_parts) is cut into parts
    of about `target`, `parts_per_chunk` to a chunk (1: each its own read task); any other larger
    file is a chunk of its own, which read_chunk cuts into pieces."""
    chunks: list[Chunk] = []
    for sf in listed:
        code = sf.source.format == "code"
        group: list[tuple[str, str, int]] = []
        cost = 0.0
        for f in sf.files:
            c = float(cost_of(f[2], code))
            parts = round(c / target) if read_in_parts(sf.source, f[1]) else 1
            if parts >= 2:
                if group:
                    chunks.append(Chunk(len(chunks), sf.source, sf.fs, group))
                    group, cost = [], 0.0
                for first in range(0, parts, parts_per_chunk):
                    chunks.append(Chunk(len(chunks), sf.source, sf.fs, [f],
                                        (first, min(first + parts_per_chunk, parts), parts)))
                continue
            if group and cost + c > target:
                chunks.append(Chunk(len(chunks), sf.source, sf.fs, group))
                group, cost = [], 0.0
            group.append(f)
            cost += c
        if group:
            chunks.append(Chunk(len(chunks), sf.source, sf.fs, group))
    return chunks


def needs_scan(chunk: Chunk) -> bool:
    """Whether the chunk's read task waits for its file's scan (JSON lines parts start where the
    scan found a line); Parquet parts are row groups, read without it."""
    return chunk.parts is not None and chunk.source.format == "jsonl"


# -- the tasks -------------------------------------------------------------------------------------


def read_chunk(chunk: Chunk, target: float, scan: FileScan | None = None) -> tuple[pa.Table, FilesRead, list[int]]:
    """The chunk's documents, what was read, and the row bounds of its pieces (each about
    `target` work; a piece is never empty). Of a file read in parts, each part is cut on its
    own, so the pieces are the same however many parts one task reads."""
    code = chunk.source.format == "code"
    if chunk.parts is None:
        docs, read = read_files(chunk.source, chunk.fs, chunk.files)
        return docs, read, _bounds(docs, code, target)
    first, end, parts = chunk.parts
    tables, bounds, dropped = [], [0], {}
    for part in range(first, end):
        docs, read = read_part(chunk.source, chunk.fs, chunk.files[0], part, parts, scan)
        bounds += [bounds[-1] + b for b in _bounds(docs, code, target)[1:]]
        tables.append(docs)
        for k, v in read.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    docs = pa.concat_tables(tables)
    return docs, FilesRead(docs.num_rows, dropped, []), bounds


def _bounds(docs: pa.Table, code: bool, target: float) -> list[int]:
    """Row bounds of the pieces of `docs`: cut where the work so far passes a multiple of `target`."""
    n = docs.num_rows
    if not n:
        return [0]
    nbytes = pc.binary_length(docs.column("text").cast(pa.large_binary())).to_numpy()
    cum = np.cumsum(cost_of(nbytes, code))
    cuts = np.searchsorted(cum, np.arange(1, int(cum[-1] // target) + 1) * target)
    return sorted({0, n, *(int(c) for c in cuts if 0 < c < n)})


def process_piece(docs: pa.Table, start: int, stop: int, spec: DataPileSpec) -> tuple[pa.Table, pa.Table, dict]:
    """Categorize, filter, hash and MinHash rows [start, stop) of a chunk: the processed piece,
    its index, and the seconds each step took."""
    seconds: dict[str, float] = {}
    batch = process_batch(docs.slice(start, stop - start), spec, seconds)
    nbytes = pc.binary_length(batch.column("text").cast(pa.large_binary())).cast(pa.int64())
    index = batch.append_column("nbytes", nbytes).select(list(INDEX_COLUMNS))
    return batch, index, seconds


def process_batch(batch: pa.Table, spec: DataPileSpec, seconds: dict[str, float] | None = None) -> pa.Table:
    """The per-document part of the pipeline on one Arrow table; adds each step's time to
    `seconds` (categorize, each filter by type, exactHash, minhash)."""
    seconds = {} if seconds is None else seconds

    def timed(name: str, fn: Callable[[], Any]):
        t = time.perf_counter()
        out = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
        return out

    nl, pl = spec.categorize.natural_language, spec.categorize.programming_language
    batch = timed("categorize", lambda: annotate(batch, nl.enabled, nl.min_confidence, pl.enabled))
    batch = batch.append_column("dropped", pa.nulls(batch.num_rows, pa.string()))
    for f, step in zip(spec.filters, build_steps(spec.filters), strict=True):
        batch = timed(f.type, lambda step=step, batch=batch: step(batch))
    for col, typ in (("hap_score", pa.float32()), ("pii", pa.int32()), ("license", pa.string()),
                     ("quality_rule", pa.string()), ("lines_removed", pa.int32())):
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(batch.num_rows, typ))
    # Hashes and signatures only for what the filters kept: dropped rows never reach dedup.
    alive = pc.is_null(batch.column("dropped")).to_numpy(zero_copy_only=False)
    texts = batch.column("text").take(pa.array(np.flatnonzero(alive), pa.int64()))
    word_lists = dd.words(texts)
    h = np.zeros((batch.num_rows, 2), dtype=np.uint64)
    h[alive] = timed("exactHash", lambda: dd.content_hashes(texts, word_lists))
    batch = batch.append_column("hash_hi", pa.array(h[:, 0])).append_column("hash_lo", pa.array(h[:, 1]))
    fz = spec.dedup.fuzzy
    if fz.enabled:
        sig = np.zeros((batch.num_rows, fz.num_perm), dtype=np.uint64)
        if alive.any():
            sig[alive] = timed("minhash", lambda: dd.signatures(texts, fz.num_perm, fz.shingle_size, word_lists))
        batch = batch.append_column("minhash", pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)),
                                                                                 fz.num_perm))
    return batch


#: Band rows (one per document and band) per shuffle partition: the number of partitions follows
#: the data, not the cluster (20 bytes a row plus the id: about 40 MB to sort per partition).
BAND_ROWS_PER_PARTITION = 1 << 20

#: The most shuffle partitions (each piece's band task returns one object per partition).
MAX_PARTITIONS = 256


def band_partitions(rows: int) -> int:
    """Shuffle partitions for `rows` band rows: one per BAND_ROWS_PER_PARTITION, at most
    MAX_PARTITIONS. The pairs do not depend on it (every bucket lands whole in one partition)."""
    return int(min(max(-(-rows // BAND_ROWS_PER_PARTITION), 1), MAX_PARTITIONS))


def band_piece(processed: pa.Table, reaches: np.ndarray, bands: int, partitions: int):
    """The band rows (band, key, id) of the documents of a piece that reach fuzzy dedup
    (`reaches`, per row: kept by the filters, not an exact duplicate), split into `partitions`
    parts by key. Signatures stay out of the shuffle: verification fetches those of the candidate
    pairs only (piece_signatures)."""
    rows = processed.filter(pa.array(reaches))
    n = rows.num_rows
    num_perm = processed.schema.field("minhash").type.list_size
    sig = rows.column("minhash").combine_chunks().flatten().to_numpy().reshape(n, num_perm) if n else \
        np.zeros((0, num_perm), dtype=np.uint64)
    per = num_perm // bands
    keys = np.stack([dd.row_hash(sig[:, b * per:(b + 1) * per]) for b in range(bands)], axis=1) if n else \
        np.zeros((0, bands), dtype=np.uint64)
    table = pa.table({"band": pa.array(np.tile(np.arange(bands, dtype=np.int16), n)),
                      "key": pa.array(keys.reshape(-1)),
                      "id": rows.column("id").take(pa.array(np.repeat(np.arange(n), bands), pa.int64()))})
    # the partition of a row: its key mixed with its band, so that each band spreads over all parts
    with np.errstate(over="ignore"):
        mixed = keys.reshape(-1) ^ (np.tile(np.arange(bands, dtype=np.uint64), n) * np.uint64(0x9E3779B97F4A7C15))
    part = mixed % np.uint64(partitions)
    out = [table.filter(pa.array(part == p)) for p in range(partitions)]
    return out[0] if partitions == 1 else tuple(out)


def pairs_of_bands(*parts: pa.Table) -> tuple[pa.Table, int]:
    """The candidate pairs of one partition: in every bucket (band and key), each document with
    the bucket's smallest id. Returns the distinct pairs (a, b) and the number of candidates
    (a pair found in several bands counted in each)."""
    rows = pa.concat_tables([p for p in parts if p.num_rows]) if any(p.num_rows for p in parts) else None
    if rows is None:
        return pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())}), 0
    rows = rows.sort_by([("band", "ascending"), ("key", "ascending"), ("id", "ascending")])
    band = rows.column("band").to_numpy()
    key = rows.column("key").to_numpy()
    n = rows.num_rows
    new_bucket = np.ones(n, dtype=bool)
    new_bucket[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    first = np.maximum.accumulate(np.where(new_bucket, np.arange(n), 0))
    src = np.flatnonzero(~new_bucket)
    ids = rows.column("id")
    pairs = pa.table({"a": ids.take(pa.array(src, pa.int64())), "b": ids.take(pa.array(first[src], pa.int64()))})
    # a pair found in several bands is one edge
    return pairs.group_by(["a", "b"]).aggregate([]), len(src)


def piece_signatures(processed: pa.Table, ids: pa.Array) -> pa.Table:
    """(id, minhash) of the piece's documents among `ids` (those in a candidate pair)."""
    return processed.filter(pc.is_in(processed.column("id"), value_set=ids)).select(["id", "minhash"])


def verify_pairs(threshold: float, pairs: pa.Table, *signatures: pa.Table) -> pa.Table:
    """The pairs (a, b) whose estimated Jaccard similarity (the share of equal MinHash values)
    reaches `threshold`; `signatures` hold (id, minhash) of every document in them."""
    if not pairs.num_rows:
        return pairs
    sigs = pa.concat_tables(signatures)
    num_perm = sigs.schema.field("minhash").type.list_size
    matrix = sigs.column("minhash").combine_chunks().flatten().to_numpy().reshape(sigs.num_rows, num_perm)
    ids = sigs.column("id")
    a = pc.index_in(pairs.column("a"), value_set=ids).to_numpy(zero_copy_only=False)
    b = pc.index_in(pairs.column("b"), value_set=ids).to_numpy(zero_copy_only=False)
    ok = (matrix[a] == matrix[b]).mean(axis=1) >= threshold
    return pairs.filter(pa.array(ok))


def sample_piece(processed: pa.Table, sample: pa.Array) -> pa.Array:
    """The texts of the piece's documents in the tokenizer's training sample."""
    return processed.filter(pc.is_in(processed.column("id"), value_set=sample)).column("text").combine_chunks()


def train_tokenizer(vocab_size: int, min_frequency: int, *texts: pa.Array) -> str:
    """The tokenizer (as JSON) trained on the sample's texts, gathered on this one worker."""
    def docs():
        for arr in texts:
            yield from arr.to_pylist()

    return tk.train_tokenizer(docs(), vocab_size, min_frequency).to_str()


@dataclass(frozen=True)
class Output:
    """Where write_piece writes: one table's folder for this attempt, its FileIO properties, and
    its Arrow schema (with Iceberg's field ids)."""

    folder: str
    io_properties: dict[str, str]
    schema: pa.Schema


@dataclass
class Written:
    """What write_piece wrote (paths are None when the piece had no such rows)."""

    documents: str | None
    sequences: str | None
    dropped: str | None
    kept: int
    tokens: dict[str, int]
    """Tokens per split, end-of-text tokens included."""
    sequence_count: int
    encoding: tk.Encoding | None = None
    """Which encoder encoded the piece, and what its check found (None: nothing kept to encode)."""


def write_piece(processed: pa.Table, piece: int, decisions: pa.Table, tokenizer_json: str, validation_fraction: float,
                seq_len: int, docs_out: Output, seq_out: Output, dropped_out: Output | None) -> Written:
    """Keep the rows the driver decided to keep (`decisions`, row by row), assign splits, write
    the documents; encode, pack (per split, within this piece) and write the sequences; with
    `dropped_out`, write the dropped documents with their reason."""
    keep = decisions.column("keep")
    kept = processed.filter(keep)
    name = f"{piece:06d}.parquet"
    docs_path = seq_path = dropped_path = None
    tokens = {"train": 0, "validation": 0}
    nseq = 0
    encoding = None
    if kept.num_rows:
        splits = tk.split_of(kept.column("id").to_pylist(), validation_fraction)
        kept = kept.append_column("split", pa.array(splits.tolist(), pa.string()))
        docs_path = _write(kept.select(list(DOC_COLUMNS)), docs_out, name)
        encoded, encoding = tk.encode(kept.select(["text"]), tokenizer_json)
        ids = encoded.column("ids")
        tok = tk.from_json(tokenizer_json)
        eos, pad = tk.special_ids(tok)
        seqs, tokens = tk.pack(ids, splits, eos, pad, seq_len, first_seq=piece << SEQ_BITS)
        nseq = seqs.num_rows
        seq_path = _write(seqs, seq_out, name)
    if dropped_out is not None:
        gone = processed.filter(pc.invert(keep))
        if gone.num_rows:
            why = decisions.filter(pc.invert(keep))
            # a filter's reason, else dedup's (a filtered document never reaches dedup)
            reason = pc.coalesce(gone.column("dropped"), why.column("reason"))
            table = pa.table({"id": gone.column("id"), "source": gone.column("source"), "path": gone.column("path"),
                              "text": gone.column("text"), "reason": reason, "rule": gone.column("quality_rule"),
                              "duplicate_of": why.column("duplicate_of")})
            dropped_path = _write(table, dropped_out, name)
    return Written(docs_path, seq_path, dropped_path, kept.num_rows, tokens, nseq, encoding)


def _write(table: pa.Table, out: Output, name: str) -> str:
    """Write `table` as one Parquet file in the output's folder (cast to its schema, so that the
    file carries Iceberg's field ids), and return the file's location."""
    import pyarrow.parquet as pq
    from pyiceberg.io import load_file_io

    path = f"{out.folder}/{name}"
    table = table.select(out.schema.names).cast(out.schema)
    io = load_file_io(out.io_properties, path)
    try:
        with io.new_output(path).create(overwrite=True) as stream:
            pq.write_table(table, stream, compression="zstd")
    except OSError as e:
        # pyarrow's error names neither the file nor the fix ("Error writing bytes to file")
        refused = unwritable(e)
        if refused is None:
            raise
        raise output_error(refused[0], path, ELSEWHERE) from e
    return path


# -- scheduling -------------------------------------------------------------------------------------


@functools.cache
def remote(fn: Callable, num_returns: int = 1):
    """`fn` as a Ray task. Ray retries it (up to 3 times) when its worker dies; an exception it
    raises is not retried (it would fail again)."""
    import ray

    return ray.remote(num_returns=num_returns, max_retries=3, retry_exceptions=False)(fn)


def gather(refs: list, progress: Callable[[int], None] | None = None, weights: Sequence[int] | None = None) -> list:
    """The values of `refs`, in order; `progress(weight)` as they are done. If a task fails, the
    later ones are cancelled and the error of the first failing task in order is raised (the
    same error on every run, whichever task finished first); a StageError (bad input: what the
    user must fix) is raised as itself, and a write the disk refused as an OutputError."""
    import ray

    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        # every result ready by now at once: one wait per batch, not per task
        done, _ = ray.wait(list(pending), num_returns=1, timeout=None)
        more, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in {*done, *more}:
            i = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # the later tasks are not needed; the earlier ones decide which error is reported
                for other, j in pending.items():
                    if j > i:
                        ray.cancel(other)
                _raise_first(refs[:i], e)
            if progress is not None:
                progress(weights[i] if weights is not None else 1)
    return ray.get(refs)


def _raise_first(earlier: list, error: Exception) -> None:
    """Raise the error of the first of `earlier` that fails, else `error`; a StageError as itself."""
    import ray

    for ref in earlier:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            error = e
            break
    if isinstance(error, ray.exceptions.RayTaskError):
        if isinstance(error.cause, StageError):
            raise error.cause from None
        # A refused write outside _write: one line, not Ray's traceback in colour (it stays
        # chained, for whoever logs the full error).
        refused = unwritable(error)
        if refused is not None:
            raise output_error(refused[0], refused[1] or "the pile's files", ELSEWHERE) from error
    raise error
