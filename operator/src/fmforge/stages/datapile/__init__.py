"""The DataPile stage: sources in, a versioned and tagged pile out.

    read sources → [Ray Data map_batches: categorize → filters in order → exact hash → MinHash]
    → exact dedup → fuzzy dedup (LSH, components) → tokenizer (trained on a sample)
    → [Ray Data map_batches: encode] → pack → publish (Iceberg snapshots + tags) → data card

The per-document work runs on Ray Data (`map_batches` over Arrow batches: in-process locally,
on the KubeRay cluster in a RayJob); the global steps (dedup decisions over hashes and
signatures, tokenizer training, packing, publishing) run on the driver over compact arrays. Called by the
local runner (`fmforge run`) and by the RayJob entrypoint with the same StageContext.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...api.v1alpha1.common import quantity_value
from ...api.v1alpha1.datapile import DataPileSpec
from .. import raysession
from ..base import InputError, InvalidSpec, StageContext, StageResult
from . import dedup as dd
from . import publish as pub
from . import tokenize as tk
from .annotate import annotate
from .filters import build_steps, effective_rules
from .sources import fingerprint as _fingerprint
from .sources import read_source, resolve

#: Columns of the published documents table.
DOC_COLUMNS = ("id", "source", "path", "text", "is_code", "lang", "lang_confidence", "prog_lang", "license",
               "source_license", "hap_score", "pii", "split")


#: Relative cost per byte of a prose document against a code file in process_batch (measured on
#: the quickstart corpus: 0.9 s/MB against 0.18 s/MB on one core).
PROSE_COST = 5.0


def fingerprint(spec: DataPileSpec, base_dir: Path) -> str:
    """What the runner adds to the digest: the sources' files (names, sizes, times)."""
    return _fingerprint(spec.sources, base_dir)


def process_batch(batch: pa.Table, spec: DataPileSpec) -> pa.Table:
    """The per-document part of the pipeline, on one Arrow batch (a Ray Data map_batches UDF)."""
    nl, pl = spec.categorize.natural_language, spec.categorize.programming_language
    batch = annotate(batch, nl.enabled, nl.min_confidence, pl.enabled)
    batch = batch.append_column("dropped", pa.nulls(batch.num_rows, pa.string()))
    for step in build_steps(spec.filters):
        batch = step(batch)
    for col, typ in (("hap_score", pa.float32()), ("pii", pa.int32()), ("license", pa.string()),
                     ("quality_rule", pa.string()), ("lines_removed", pa.int32())):
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(batch.num_rows, typ))
    # Hashes and signatures only for what the filters kept: dropped rows never reach dedup.
    alive = pc.is_null(batch.column("dropped")).to_numpy(zero_copy_only=False)
    idx = pa.array(np.flatnonzero(alive), pa.int64())
    texts = batch.column("text").take(idx)
    word_lists = dd.words(texts)
    h = np.zeros((batch.num_rows, 2), dtype=np.uint64)
    h[alive] = dd.content_hashes(texts, word_lists)
    batch = batch.append_column("hash_hi", pa.array(h[:, 0])).append_column("hash_lo", pa.array(h[:, 1]))
    fz = spec.dedup.fuzzy
    if spec.dedup.fuzzy.enabled:
        sig = np.zeros((batch.num_rows, fz.num_perm), dtype=np.uint64)
        if alive.any():
            sig[alive] = dd.signatures(texts, fz.num_perm, fz.shingle_size, word_lists)
        flat = pa.array(sig.reshape(-1))
        batch = batch.append_column("minhash", pa.FixedSizeListArray.from_arrays(flat, fz.num_perm))
    return batch


def map_on_ray(table: pa.Table, fn, fn_kwargs: dict[str, Any], progress=None, weights: np.ndarray | None = None,
               per_cpu: int = 2) -> pa.Table:
    """`fn` (an Arrow-batch UDF) over `table` with Ray Data, in `per_cpu` blocks per CPU,
    balanced by bytes of text (times `weights`, a relative cost per document, if given);
    `progress(rows)` is called as each block comes back (streaming, not at the end). Blocks may
    come back in any order."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Balanced by bytes (and cost), not rows: code files and doc topics differ a lot in size.
    cost = pc.binary_length(table.column("text").cast(pa.large_binary())).to_numpy().astype(np.float64)
    if weights is not None:
        cost = cost * weights
    sizes = np.cumsum(cost)
    nblocks = max(1, min(table.num_rows, cpus * per_cpu))
    cuts = np.searchsorted(sizes, np.linspace(0, sizes[-1], nblocks + 1)[1:-1]) if len(sizes) else []
    bounds = [0, *sorted(set(int(c) for c in cuts)), table.num_rows]
    blocks = [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
    # A dataset copies the context when it is created: configure it first (raysession.start has
    # turned Ray Data's own output off).
    ctx = ray.data.DataContext.get_current()
    # Ray Data keeps half the CPUs in reserve per operator by default; with one map operator on
    # a small node that runs the tasks one at a time (measured: 6 half-second tasks on 2 CPUs
    # took 2.4 s with the reservation, 1.6 s without).
    ctx.op_resource_reservation_enabled = False
    # from_blocks builds the block metadata here; from_arrow runs a remote task for it.
    out = ray.data.from_blocks(blocks).map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=None,
                                                  zero_copy_batch=True)
    tables = []
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        tables.append(batch)
        if progress is not None:
            progress(batch.num_rows)
    return pa.concat_tables(tables, promote_options="default")


def start_ray(spec: DataPileSpec, state_dir: Path) -> None:
    """Ray with the CPUs the spec's resources grant (locally), or the cluster's."""
    raysession.start(state_dir, spec.resources.workers * spec.resources.cpus_per_worker)


def run_on_ray(table: pa.Table, spec: DataPileSpec, progress=None) -> pa.Table:
    """process_batch over the documents on Ray Data (categorize, filter, hash, MinHash)."""
    # Prose costs about 5x more per byte than code (language detection and HAP run on prose
    # only): blocks are balanced by that cost, four per CPU so that no block is a long tail.
    weights = np.where(table.column("is_code").to_numpy(zero_copy_only=False), 1.0, PROSE_COST)
    return map_on_ray(table, process_batch, {"spec": spec}, progress, weights=weights, per_cpu=4)


def encode_on_ray(texts: pa.Array, tokenizer_json: str, progress=None) -> pa.ChunkedArray:
    """Token ids of each text, in the order of `texts`, encoded on the Ray Data workers."""
    table = pa.table({"row": pa.array(np.arange(len(texts), dtype=np.int64)), "text": texts})
    out = map_on_ray(table, tk.encode, {"tokenizer_json": tokenizer_json}, progress)
    # Each block is a contiguous range of rows: putting the blocks back in order is enough, and
    # costs nothing; sort the rows only if Ray Data split or merged blocks on the way.
    blocks = sorted((b for b in out.to_batches() if b.num_rows), key=lambda b: b["row"][0].as_py())
    ordered = pa.Table.from_batches(blocks, schema=out.schema) if blocks else out
    if not np.array_equal(ordered.column("row").to_numpy(), np.arange(len(texts))):
        ordered = out.sort_by("row")
    return ordered.column("ids")


def run(ctx: StageContext) -> StageResult:
    spec: DataPileSpec = ctx.spec
    rep = ctx.reporter
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str, total: int | None = None):
        rep.step(name, total)
        t = time.monotonic()
        yield
        timings[name] = time.monotonic() - t

    # 1. sources
    with timed("read sources"):
        tables, reads = [], []
        for s in spec.sources:
            t, r = read_source(s, ctx.base_dir, confine=not ctx.allow_outside_paths)
            tables.append(t)
            reads.append(r)
            rep.advance(r.documents, source=s.name, mb=f"{r.bytes / 1e6:.1f}",
                        **{f"dropped_{k}": v for k, v in r.dropped.items()})
        docs = pa.concat_tables(tables)
    # Records dropped at read (text that is not a string, documents over the size limit) count
    # as read and dropped, so that read = kept + every dropped counter.
    at_read = Counter()
    for r in reads:
        at_read.update(r.dropped)
    read = docs.num_rows + sum(at_read.values())
    digest = _digest(spec, reads)
    if docs.num_rows == 0:
        raise InputError(f"no documents to process: the sources' {read} records were all dropped at read "
                         f"({', '.join(f'{k}: {v}' for k, v in at_read.items())}); fix the data or the sources' "
                         f"invalidText and maxDocumentBytes")

    cat = pub.catalog(ctx.state_dir)
    repaired = pub.repair(cat, ctx.namespace, ctx.name)
    if repaired:
        rep.log("Repaired the pile's tables after an interrupted publish", pile=ctx.name, **repaired)
    existing = pub.find_version(cat, ctx.namespace, ctx.name, digest)
    if existing is not None:
        # Same spec, same sources: the version exists; make sure its tags are on it, publish nothing.
        pub.move_tags(cat.load_table(existing.table), existing.snapshot_id, spec.publish.tags)
        _, seq_name = pub.table_names(ctx.namespace, ctx.name)
        pub.move_tags(cat.load_table(seq_name), existing.sequences_snapshot_id, spec.publish.tags)
        rep.log("Found the version already published", snapshot=existing.snapshot_id)
        return _reuse(ctx, cat, existing, digest, reads)

    # 2-3. categorize and filter on Ray Data, with exact hashes and MinHash signatures
    start_ray(spec, ctx.state_dir)
    with timed("categorize, filter, hash (Ray Data)", total=docs.num_rows):
        processed = run_on_ray(docs, spec, progress=rep.advance)
    dropped = processed.column("dropped").to_numpy(zero_copy_only=False)
    counters: dict[str, int] = {f.type: 0 for f in spec.filters}
    counters.update(at_read)
    counters.update(Counter(d for d in dropped if d is not None))
    alive = np.array([d is None for d in dropped])

    # 4. dedup on the driver, over hashes and signatures of the surviving rows
    order_keys = np.argsort(np.argsort(np.array(processed.column("id").to_pylist(), dtype=object)))
    with timed("deduplicate"):
        survivors = np.flatnonzero(alive)
        n_exact = n_fuzzy = clusters = candidates = verified = 0
        if spec.dedup.exact and len(survivors):
            h = np.stack([processed.column("hash_hi").to_numpy()[survivors],
                          processed.column("hash_lo").to_numpy()[survivors]], axis=1)
            keep = dd.first_of_each(h, order_keys[survivors])
            n_exact = int((~keep).sum())
            survivors = survivors[keep]
        reached_fuzzy = len(survivors)
        fz = spec.dedup.fuzzy
        if fz.enabled and len(survivors):
            sig = processed.column("minhash").combine_chunks().flatten().to_numpy().reshape(-1, fz.num_perm)[survivors]
            res = dd.fuzzy_clusters(sig, order_keys[survivors], fz.bands, fz.threshold, fz.verify)
            n_fuzzy = int((~res.keep).sum())
            clusters, candidates, verified = res.clusters, res.candidate_pairs, res.verified_pairs
            survivors = survivors[res.keep]
        reached_exact = int(alive.sum())
    counters["duplicateExact"] = n_exact
    counters["duplicateFuzzy"] = n_fuzzy
    kept = processed.take(pa.array(survivors, pa.int64()))
    if kept.num_rows == 0:
        raise InputError(
            f"no documents left after filtering and deduplication ({read} read; dropped "
            f"{', '.join(f'{k}: {v}' for k, v in counters.items() if v)}); loosen the filters or add sources")
    if read != kept.num_rows + sum(counters.values()):  # an invariant, checked even under python -O
        raise RuntimeError(f"counters do not add up: read {read}, kept {kept.num_rows}, dropped {counters}")

    # 5. tokenizer, split, pack
    splits = tk.split_of(kept.column("id").to_pylist(), spec.split.validation_fraction)
    kept = kept.append_column("split", pa.array(splits.tolist(), pa.string()))
    # The version's artifacts live in a directory named by its digest. One that exists now was
    # left by an attempt that never published (a published digest is found above and reused),
    # so nothing refers to it.
    version_dir = ctx.artifacts / digest.split(":", 1)[1][:16]
    if version_dir.exists():
        shutil.rmtree(version_dir)
    tok_dir = version_dir / "tokenizer"
    with timed("tokenizer"):
        if spec.tokenizer.train is not None:
            tr = spec.tokenizer.train
            sizes = pc.binary_length(kept.column("text").cast(pa.large_binary())).to_numpy()
            sample = tk.training_sample(kept.column("id").to_pylist(), sizes, splits,
                                        int(quantity_value(tr.sample_bytes)))
            texts = kept.column("text").take(pa.array(sample, pa.int64())).to_pylist()
            tok = tk.train_tokenizer(texts, tr.vocab_size, tr.min_frequency)
            sample_mb = int(sizes[sample].sum()) / 1e6
            tok_source = (f"trained: byte-level BPE, vocab {tok.get_vocab_size()}, on {len(sample)} documents "
                          f"({sample_mb:.1f} MB) of the training split")
        else:
            fs, path = resolve(spec.tokenizer.uri, ctx.base_dir, confine=not ctx.allow_outside_paths)
            tok = tk.load_tokenizer(path, fs)
            tok_source = f"loaded from {spec.tokenizer.uri}"
        tk.save_tokenizer(tok, tok_dir)
    eos, pad = tk.special_ids(tok)
    with timed("tokenize (Ray Data) and pack", total=kept.num_rows):
        ids = encode_on_ray(kept.column("text").combine_chunks(), tok.to_str(), progress=rep.advance)
        seqs, tokens_by_split = tk.pack(ids, splits, eos, pad, spec.tokenize.sequence_length)
        rep.advance(0, tokens=sum(tokens_by_split.values()), sequences=seqs.num_rows)
    tokens = int(sum(tokens_by_split.values()))

    # 6. publish
    languages = dict(Counter(x for x in kept.column("lang").to_pylist() if x).most_common())
    prog = dict(Counter(x for x in kept.column("prog_lang").to_pylist() if x).most_common())
    stats = {
        "documents": {"read": read, "kept": kept.num_rows},
        "dropped": counters,
        "languages": languages,
        "programmingLanguages": prog,
        "tokens": tokens,
        "sequences": seqs.num_rows,
    }
    props = {
        pub.PROP_DIGEST: digest,
        "fmforge.spec-digest": _spec_digest(spec),
        "fmforge.sources": json.dumps({r.name: r.digest for r in reads}, sort_keys=True),
        "fmforge.stats": json.dumps(stats, sort_keys=True),
        "fmforge.tokenizer": str(tok_dir),
        "fmforge.generation": str(ctx.generation),
    }
    with timed("publish"):
        table = kept.select([c for c in DOC_COLUMNS if c in kept.column_names])
        with warnings.catch_warnings():
            # pyiceberg warns that the overwrite's delete matched nothing on a table's first version
            warnings.filterwarnings("ignore", message="Delete operation did not match any records")
            published = pub.publish(cat, ctx.namespace, ctx.name, table, seqs, spec.publish.tags, props)
    card = {
        "name": ctx.name,
        "version": {"snapshotId": str(published.snapshot_id), "digest": digest, "createdAt": published.created_at},
        "tags": spec.publish.tags,
        "sources": [{"name": r.name, "uri": r.uri, "license": s.license, "files": r.files, "documents": r.documents,
                     "bytes": r.bytes, "digest": r.digest} for r, s in zip(reads, spec.sources)],
        "stats": stats,
        "qualityRules": dict(Counter(x for x in processed.column("quality_rule").to_pylist() if x).most_common()),
        "dedup": {"exact": n_exact, "exactRate": n_exact / max(reached_exact, 1), "fuzzy": n_fuzzy,
                  "fuzzyRate": n_fuzzy / max(reached_fuzzy, 1), "clusters": clusters,
                  "candidatePairs": candidates, "verifiedPairs": verified,
                  "params": spec.dedup.fuzzy.model_dump(by_alias=True)},
        "licenses": dict(Counter(kept.column("license").to_pylist()).most_common()),
        "piiRedacted": int(pc.sum(kept.column("pii")).as_py() or 0),
        "linesRemoved": {"lines": int(pc.sum(kept.column("lines_removed")).as_py() or 0),
                         "documents": int(pc.sum(pc.greater(pc.fill_null(kept.column("lines_removed"), 0), 0))
                                          .as_py() or 0)},
        "tokenizer": tok_source,
        "tokensBySplit": tokens_by_split,
        "sequenceLength": spec.tokenize.sequence_length,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "filters": [f.model_dump(by_alias=True) | ({"effectiveRules": effective_rules(f).model_dump(
            by_alias=True, exclude_none=True)} if f.type == "quality" else {}) for f in spec.filters],
    }
    md = pub.data_card(card, version_dir)
    rep.log("Published version", snapshot=published.snapshot_id, tags=",".join(spec.publish.tags) or None)
    return StageResult(
        status=_status(published, spec.publish.tags, stats, md, digest),
        digest=digest,
        message=f"published snapshot {published.snapshot_id} ({kept.num_rows}/{read} documents, {tokens} tokens)",
        lineage=[{"name": r.name, "uri": r.uri, "digest": r.digest} for r in reads],
    )


def _status(published: pub.Published, tags: list[str], stats: dict[str, Any], md: Path, digest: str) -> dict:
    return {
        "version": {"snapshotId": str(published.snapshot_id), "digest": digest, "createdAt": published.created_at},
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
    card = ctx.artifacts / digest.split(":", 1)[1][:16] / "datacard.md"
    card = card.resolve() if card.is_file() else None
    return StageResult(
        status={"version": {"snapshotId": str(existing.snapshot_id), "digest": digest,
                            "createdAt": existing.created_at},
                "tags": tags, "stats": stats, "table": existing.table,
                **({"dataCard": card.as_uri()} if card else {})},
        digest=digest,
        message=f"version {existing.snapshot_id} already published with this spec and these sources; nothing new",
        lineage=[{"name": r.name, "uri": r.uri, "digest": r.digest} for r in reads],
    )


def _spec_digest(spec: DataPileSpec) -> str:
    body = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _digest(spec: DataPileSpec, reads) -> str:
    """The version's digest: the spec (tags aside: retagging is not a new version) and the sources' content."""
    body = spec.model_dump(mode="json", by_alias=True)
    body.pop("publish", None)
    body.pop("resources", None)
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    for r in reads:
        h.update(f"{r.name}\0{r.digest}\n".encode())
    return "sha256:" + h.hexdigest()


__all__ = ["run", "fingerprint", "process_batch", "InvalidSpec"]
