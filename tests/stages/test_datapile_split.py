"""A large file read in parts by several tasks gives what reading it whole gives: the same
documents with the same ids, the same drops, the same source digest; and in the stage, the same
version (digest, documents, sequences, counters) whether one task or many read the file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from piles import MINI, expected_dedup

from fmforge.api.v1alpha1.datapile import DataPileSpec, Source
from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.datapile import publish as pub
from fmforge.stages.datapile import workers as wk
from fmforge.stages.datapile.sources import FilesRead, list_source, read_files, read_source, scan_file, summarize


def _records(corpus: Path) -> list[dict]:
    """The test corpus's prose records and code files as records, with what a reader must count:
    a text that is not a string, one over maxDocumentBytes, and a line long enough to span
    several planned part starts."""
    recs = [json.loads(line) for f in sorted((corpus / "prose").glob("*.jsonl")) for line in f.open()]
    recs += [{"text": p.read_text(errors="replace")} for p in sorted((corpus / "code").rglob("*.py"))]
    recs.insert(7, {"text": None})
    recs.insert(20, {"text": "é" * 1_500_000})  # 3 MB of UTF-8: over the 2Mi default, dropped as tooLarge
    recs.insert(40, {"text": "long line " * 60_000})
    return recs


def _write_jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines.insert(3, "")  # an empty line: skipped, but counted in the line numbers (the ids)
    path.write_text("\n".join(lines))  # no newline after the last line


def _write_parquet(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array([r["text"] for r in recs], pa.large_string())}), path,
                   row_group_size=40)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_parts_read_what_the_whole_file_holds(corpus: Path, tmp_path: Path, fmt: str):
    recs = _records(corpus)
    (_write_jsonl if fmt == "jsonl" else _write_parquet)(tmp_path / "data" / f"big.{fmt}", recs)
    source = Source(name="big", uri="file://data/", format=fmt, invalid_text="skip")
    listed = list_source(source, tmp_path)
    (path, rel, size), = listed.files
    target = float(wk.cost_of(size, False)) / 12  # about 12 parts
    chunks = wk.plan_chunks([listed], target)
    assert len(chunks) >= 10 and all(c.parts is not None and c.parts[1] - c.parts[0] == 1 for c in chunks)
    scan = scan_file(source, listed.fs, listed.files[0], chunks[0].parts[2])
    split = [wk.read_chunk(c, target, scan if wk.needs_scan(c) else None) for c in chunks]

    whole, whole_read = read_files(source, listed.fs, listed.files)
    docs = pa.concat_tables([d for d, _, _ in split])
    assert docs.equals(whole), "same documents, ids and order"
    assert docs.num_rows == len(recs) - 2
    scanned = FilesRead(0, {}, [(scan.rel, scan.sha256, scan.size)])
    by_parts = summarize(listed, [r for _, r, _ in split] + [scanned])
    assert by_parts == summarize(listed, [whole_read]), "same digest, documents, bytes and drops"
    assert by_parts.dropped == {"invalidText": 1, "tooLarge": 1}
    if fmt == "jsonl":
        # the long line spans planned starts: those parts merge into the one holding it
        assert 2 <= len(scan.starts) - 1 < chunks[0].parts[2]
        assert scan.starts[-1] == size and all(a < b for a, b in zip(scan.starts, scan.starts[1:], strict=False))

    # one task reading every part cuts the same pieces as many tasks reading one part each
    one, = wk.plan_chunks([listed], target, parts_per_chunk=1_000)
    docs_one, read_one, bounds_one = wk.read_chunk(one, target, scan)
    assert docs_one.equals(whole) and read_one.dropped == by_parts.dropped
    offsets, pieces = 0, []
    for d, _, bounds in split:
        pieces += [(offsets + a, offsets + b) for a, b in zip(bounds, bounds[1:], strict=False)]
        offsets += d.num_rows
    assert list(zip(bounds_one, bounds_one[1:], strict=False)) == pieces
    assert len(pieces) >= 5


def _run(d: Path, manifest: dict) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "pile.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    report = run_paths([d / "pile.yaml"], console=RunConsole(rich=False))
    assert report.ok, report.outcomes
    return StateDir(d / ".fmforge").read("DataPile", "mini")["status"]


def test_a_file_read_by_many_tasks_makes_the_version_one_task_makes(corpus: Path, tmp_path: Path, monkeypatch):
    """The stage on one large JSON lines file: read in parts by a task each, and read whole by one
    task (the same planner, every part in one chunk). Same version digest, documents, sequences
    and counters; the documents are those (and have the ids) of reading the file in this process."""
    recs = [r for r in _records(corpus) if isinstance(r["text"], str) and len(r["text"]) < 1_000_000]
    m = json.loads(json.dumps(MINI))
    m["spec"]["sources"] = [{"name": "big", "uri": "file://data/", "format": "jsonl"}]
    # fuzzy dedup with verify: its second pass fetches the candidate pairs' signatures from the pieces
    m["spec"]["dedup"]["fuzzy"] = {"enabled": True, "numPerm": 112, "bands": 14, "shingleSize": 5, "verify": True,
                                   "threshold": 0.7}
    plan = wk.plan_chunks
    planned = {}

    def recording(name: str, parts_per_chunk: int):
        def planner(listed, target):
            planned[name] = plan(listed, target, parts_per_chunk=parts_per_chunk)
            return planned[name]
        return planner

    status, tables = {}, {}
    for name, per_chunk in (("split", 1), ("whole", 1_000_000)):
        d = tmp_path / name
        _write_jsonl(d / "data" / "big.jsonl", recs)
        monkeypatch.setattr(wk, "plan_chunks", recording(name, per_chunk))
        status[name] = _run(d, m)
        cat = pub.catalog(d / ".fmforge")
        tables[name] = (pub.read_version(cat, "default", "mini", "v1").sort_by("id"),
                        pub.read_version(cat, "default", "mini", "v1", which="sequences").sort_by("seq"))
    assert len(planned["split"]) >= 8 and len(planned["whole"]) == 1
    assert status["split"]["version"]["digest"] == status["whole"]["version"]["digest"]
    assert status["split"]["stats"] | {"stepSeconds": 0} == status["whole"]["stats"] | {"stepSeconds": 0}
    docs, seqs = tables["split"]
    assert docs.select(["id", "text", "split"]).equals(tables["whole"][0].select(["id", "text", "split"]))
    assert seqs.equals(tables["whole"][1])
    assert status["split"]["stats"]["documents"]["kept"] > 100 and seqs.num_rows > 100

    # the ids and texts are those of reading the whole file in this process (the old reader)
    whole, read = read_source(Source(name="big", uri="file://data/", format="jsonl"), tmp_path / "split")
    texts = dict(zip(whole.column("id").to_pylist(), whole.column("text").to_pylist(), strict=True))
    assert all(texts[i] == t for i, t in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist(),
                                             strict=True))
    card = json.loads(Path(status["split"]["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    assert card["sources"][0]["digest"] == read.digest and card["sources"][0]["documents"] == read.documents

    # and what it kept is what the steps keep over the whole file in this process
    kept, exact, fuzzy, edges = expected_dedup(DataPileSpec.model_validate(m["spec"]), whole)
    assert kept == sorted(docs.column("id").to_pylist())
    dropped = status["split"]["stats"]["dropped"]
    assert (dropped["duplicateExact"], dropped["duplicateFuzzy"]) == (len(exact), len(fuzzy))
    assert len(fuzzy) > 0 and card["dedup"]["verifiedPairs"] == edges < card["dedup"]["candidatePairs"]


def test_gzip_and_small_files_stay_whole(tmp_path: Path):
    src = Source(name="z", uri="file://data/", format="jsonl")
    (tmp_path / "data").mkdir()
    for name in ("a.jsonl.gz", "b.jsonl"):
        (tmp_path / "data" / name).write_bytes(b"")
    listed = list_source(src, tmp_path)
    # sizes as the listing would find them for a 10 MiB gzip file and a small one
    listed.files = [(p, r, 10 << 20 if r.endswith(".gz") else 1000) for p, r, _ in listed.files]
    chunks = wk.plan_chunks([listed], 1 << 20)
    assert [c.parts for c in chunks] == [None, None]
    text = Source(name="t", uri="file://data/", format="text")
    listed.source = text
    assert all(c.parts is None for c in wk.plan_chunks([listed], 1 << 20))
