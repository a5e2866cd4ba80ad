"""DataPile: nothing lost when a run fails half-way, and clear errors for bad input."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from piles import SMALL

from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.datapile import datacard as dc
from fmforge.stages.datapile import publish as pub
from fmforge.stages.datapile import tokenize as tk


def _dir(tmp_path: Path, corpus: Path) -> Path:
    """A folder with the manifest's data inside it (file:// URIs may not leave the folder)."""
    d = tmp_path / "w"
    d.mkdir()
    shutil.copytree(corpus, d / "corpus")
    return d


def _run(d: Path, manifest: dict, **kw):
    (d / "pile.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return run_paths([d / "pile.yaml"], console=RunConsole(rich=False), **kw)


def _snapshots(state: StateDir) -> list[int]:
    t = pub.catalog(state.root).load_table(pub.table_names("default", "pydocs")[0])
    return [s.snapshot_id for s in t.snapshots()]


@pytest.mark.parametrize("where", ["commit", "write", "promote"])
def test_failure_half_way_keeps_the_previous_version(tmp_path: Path, corpus: Path, monkeypatch, where: str):
    d = _dir(tmp_path, corpus)
    assert _run(d, SMALL).ok
    state = StateDir(d / ".fmforge")
    v1 = state.read("DataPile", "pydocs")["status"]
    v1_rows = pub.read_version(pub.catalog(state.root), "default", "pydocs", "v1").num_rows
    module = dc if where == "write" else pub
    real = getattr(module, where)
    calls = []

    def boom(*a, **k):
        calls.append(where)
        if len(calls) == (2 if where == "commit" else 1):
            raise RuntimeError(f"injected failure in {where}")
        return real(*a, **k)

    # A new spec (tag v2, another filter setting) whose run fails after the workers wrote its
    # files: when the sequences table's snapshot is staged but not the documents' (commit), when
    # both are staged and the data card is being written (write), or when the documents' refs
    # are about to move (promote). A version nobody can read yet has no card to lack.
    monkeypatch.setattr(module, where, boom)
    v2 = copy.deepcopy(SMALL)
    v2["spec"]["publish"]["tags"] = ["v1", "v2"]
    v2["spec"]["filters"][-1]["minWords"] = 30
    report = _run(d, v2)
    assert not report.ok and "injected failure" in report.outcomes[0].message
    rec = state.read("DataPile", "pydocs")
    assert rec["status"]["phase"] == "Failed"
    assert rec["status"]["version"] == v1["version"], "the status keeps the last published version"
    cat = pub.catalog(state.root)
    t = cat.load_table(pub.table_names("default", "pydocs")[0])
    assert t.snapshot_by_name("v1").snapshot_id == int(v1["version"]["snapshotId"])
    assert t.snapshot_by_name("v2") is None
    assert pub.read_version(cat, "default", "pydocs", "v1").num_rows == v1_rows
    # a later good run publishes v2 and moves v1 along
    monkeypatch.undo()
    assert _run(d, v2).ok
    t = pub.catalog(state.root).load_table(pub.table_names("default", "pydocs")[0])
    new = state.read("DataPile", "pydocs")["status"]
    assert t.snapshot_by_name("v2").snapshot_id == int(new["version"]["snapshotId"]) != int(v1["version"]["snapshotId"])
    # the failed attempt's files are gone: every attempt folder left holds files of a snapshot
    for which, (on_disk, referenced) in _attempt_folders(state).items():
        assert on_disk == referenced and len(on_disk) == 2, which
    # the old version stays readable by snapshot id
    old = pub.read_version(pub.catalog(state.root), "default", "pydocs", int(v1["version"]["snapshotId"]))
    assert old.num_rows == v1_rows
    # one snapshot per version and table: v1 an append, v2 an overwrite (no separate delete)
    for name in pub.table_names("default", "pydocs"):
        snaps = pub.catalog(state.root).load_table(name).snapshots()
        assert [s.summary.operation.value for s in snaps] == ["append", "overwrite"], name


def _attempt_folders(state: StateDir) -> dict[str, tuple[set[str], set[str]]]:
    """Per table: the attempt folders in its data folder, and those its snapshots' files are in."""
    out = {}
    for which in ("documents", "sequences"):
        t = pub.catalog(state.root).load_table(pub.table_name("default", "pydocs", which))
        data = Path(t.location().removeprefix("file://")) / "data"
        on_disk = {p.name for p in data.iterdir() if p.name.startswith(pub.ATTEMPT_PREFIX)}
        referenced = {e.data_file.file_path.rsplit("/", 2)[-2] for snap in t.snapshots()
                      for m in snap.manifests(t.io) for e in m.fetch_manifest_entry(t.io)}
        out[which] = on_disk, referenced
    return out


def _fail_message(d: Path, manifest: dict) -> str:
    report = _run(d, manifest)
    assert not report.ok
    [o] = report.outcomes
    rec = StateDir(d / ".fmforge").read("DataPile", "pydocs")
    assert rec["status"]["phase"] == "Failed"
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidInput"
    return o.message


def test_missing_source_path(tmp_path: Path, corpus: Path):
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"][0]["uri"] = "file://corpus/nope/"
    msg = _fail_message(_dir(tmp_path, corpus), m)
    assert "source python-docs: file://corpus/nope/ does not exist" in msg and "fix the uri" in msg


def test_wrong_text_field(tmp_path: Path, corpus: Path):
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"][0]["textField"] = "body"
    msg = _fail_message(_dir(tmp_path, corpus), m)
    assert "has no field 'body'" in msg and "set textField" in msg and "modules.jsonl" in msg


def test_unreadable_json_line(tmp_path: Path, corpus: Path):
    d = _dir(tmp_path, corpus)
    (d / "broken").mkdir()
    (d / "broken" / "x.jsonl").write_text('{"text": "fine"}\n{not json\n')
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"] = [{"name": "broken", "uri": "file://broken/", "format": "jsonl"}]
    msg = _fail_message(d, m)
    assert "source broken: x.jsonl line 2 is not JSON" in msg
    (d / "broken" / "x.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    msg = _fail_message(d, m)
    assert "source broken: x.jsonl line 2 is not UTF-8 text" in msg and "re-encode" in msg


def test_missing_or_repeated_id_field_values(tmp_path: Path, corpus: Path):
    """Two records with the same idField value (or none) would be one document id: the run fails
    naming the file and what to fix, instead of dropping or publishing both."""
    d = _dir(tmp_path, corpus)
    (d / "ids").mkdir()
    text = "a sentence of plain English words that is long enough to be kept by the length filter here"
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"] = [{"name": "ids", "uri": "file://ids/", "format": "jsonl", "idField": "doc"}]
    (d / "ids" / "x.jsonl").write_text(json.dumps({"doc": "a", "text": text}) + "\n"
                                       + json.dumps({"text": text + " too"}) + "\n")
    msg = _fail_message(d, m)
    assert "source ids: x.jsonl line 2 has no value for idField 'doc'" in msg and "remove idField" in msg
    (d / "ids" / "x.jsonl").write_text(json.dumps({"doc": "a", "text": text}) + "\n"
                                       + json.dumps({"doc": "a", "text": text + " too"}) + "\n")
    msg = _fail_message(d, m)
    assert "source ids: document ids repeat (1 of them;" in msg and "2 times in x.jsonl" in msg and "not unique" in msg
    pq.write_table(pa.table({"text": [text]}), d / "ids" / "y.parquet")
    m["spec"]["sources"][0]["format"] = "parquet"
    msg = _fail_message(d, m)
    assert "y.parquet has no column 'doc' for idField" in msg


@pytest.mark.parametrize("name,fmt,expect", [
    ("x.jsonl.gz", "jsonl", "x.jsonl.gz is not a readable gzip file"),
    ("x.parquet", "parquet", "x.parquet is not a readable Parquet file"),
])
def test_corrupt_file(tmp_path: Path, corpus: Path, name: str, fmt: str, expect: str):
    d = _dir(tmp_path, corpus)
    (d / "broken").mkdir()
    (d / "broken" / name).write_bytes(b"PAR1 this is neither gzip nor parquet")
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"] = [{"name": "broken", "uri": "file://broken/", "format": fmt}]
    msg = _fail_message(d, m)
    assert f"source broken: {expect}" in msg and "fix or remove it" in msg


def test_empty_pile_after_filtering(tmp_path: Path, corpus: Path):
    m = copy.deepcopy(SMALL)
    m["spec"]["filters"] = [{"type": "length", "minWords": 1_000_000}]
    msg = _fail_message(_dir(tmp_path, corpus), m)
    assert "no documents left after filtering" in msg and "length:" in msg and "loosen the filters" in msg


def test_tokenizer_loaded_from_a_uri(tmp_path: Path, corpus: Path):
    """tokenizer.uri instead of training: the first run's tokenizer, loaded by the second."""
    d = _dir(tmp_path, corpus)
    assert _run(d, SMALL).ok
    art = Path(StateDir(d / ".fmforge").read("DataPile", "pydocs")["status"]["dataCard"].removeprefix("file://")).parent
    m = copy.deepcopy(SMALL)
    m["metadata"] = {"name": "reuse"}
    m["spec"]["tokenizer"] = {"uri": f"file://{art / 'tokenizer'}"}
    assert _run(d, m).ok
    rec = StateDir(d / ".fmforge").read("DataPile", "reuse")
    card = json.loads((Path(rec["status"]["dataCard"].removeprefix("file://")).parent / "datacard.json").read_text())
    assert card["tokenizer"].startswith("loaded from file://")
    tok = tk.load_tokenizer(Path(rec["status"]["dataCard"].removeprefix("file://")).parent / "tokenizer")
    assert tok.get_vocab_size() == 2048


def test_tokenizer_loaded_from_s3(tmp_path: Path, corpus: Path, s3_server, monkeypatch):
    """tokenizer.uri on s3:// (a real S3 server): the tokenizer is read through the S3
    filesystem, not as a local path."""
    import pyarrow.fs as pafs

    from fmforge.stages.uris import s3_filesystem

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    d = _dir(tmp_path, corpus)
    assert _run(d, SMALL).ok
    art = Path(StateDir(d / ".fmforge").read("DataPile", "pydocs")["status"]["dataCard"].removeprefix("file://")).parent
    (s3_server.root / "models").mkdir()
    pafs.copy_files(str(art / "tokenizer"), "models/tok", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_filesystem())
    m = copy.deepcopy(SMALL)
    m["metadata"] = {"name": "reuse"}
    m["spec"]["tokenizer"] = {"uri": "s3://models/tok"}
    report = _run(d, m)
    assert report.ok, report.outcomes
    card = json.loads((Path(StateDir(d / ".fmforge").read("DataPile", "reuse")["status"]["dataCard"]
                            .removeprefix("file://")).parent / "datacard.json").read_text())
    assert card["tokenizer"] == "loaded from s3://models/tok"
    m["spec"]["tokenizer"] = {"uri": "s3://models/nothing"}
    report = _run(d, m)
    assert not report.ok and "no readable tokenizer.json at models/nothing" in report.outcomes[0].message


def test_formats_gz_parquet_text(tmp_path: Path, corpus: Path):
    d = _dir(tmp_path, corpus)
    rows = [json.loads(x) for x in (corpus / "prose" / "topics.jsonl").read_text().splitlines()][:40]
    (d / "gz").mkdir()
    with gzip.open(d / "gz" / "topics.jsonl.gz", "wt") as f:
        for r in rows[:20]:
            f.write(json.dumps({"body": r["text"], "key": r["id"]}) + "\n")
    (d / "pq").mkdir()
    pq.write_table(pa.table({"content": [r["text"] for r in rows[20:]]}), d / "pq" / "part-0.parquet")
    m = copy.deepcopy(SMALL)
    m["spec"]["filters"] = []
    m["spec"]["dedup"] = {"exact": True, "fuzzy": {"enabled": False}}
    m["spec"]["tokenizer"] = {"train": {"vocabSize": 512}}
    m["spec"]["sources"] = [
        {"name": "gz", "uri": "file://gz/", "format": "jsonl", "textField": "body", "idField": "key"},
        {"name": "pq", "uri": "file://pq/", "format": "parquet", "textField": "content"},
        {"name": "lic", "uri": "file://corpus/licenses/", "format": "text", "include": ["Apache*"]},
    ]
    assert _run(d, m).ok
    st = StateDir(d / ".fmforge").read("DataPile", "pydocs")["status"]["stats"]
    assert st["documents"]["read"] == 41


def test_uri_schemes_resolve(tmp_path: Path, monkeypatch):
    """file:// is relative to the manifest, pvc:// is the mounted claim, s3:// is pyarrow's S3
    (read from a real S3 server in test_s3_sources_read_like_files)."""
    import pyarrow.fs as pafs

    from fmforge.stages.uris import locate

    fs, path = locate("file://corpus/prose/", tmp_path)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str((tmp_path / "corpus/prose").resolve())
    assert locate("file:///abs/data", tmp_path, confine=False)[1] == "/abs/data"
    monkeypatch.setenv("FMFORGE_PVC_ROOT", str(tmp_path / "pvc"))
    assert locate("pvc://datasets/raw/docs", tmp_path)[1] == str(tmp_path / "pvc" / "datasets/raw/docs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = locate("s3://bucket/prefix/", tmp_path)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/prefix"
    assert fs.region == "eu-west-1"
    # pkg:// is a directory inside an installed package
    fs, path = locate("pkg://pyarrow/include", tmp_path)
    assert Path(path).is_dir() and Path(path).parent.name == "pyarrow"


def test_rayjob_entrypoint_runs_the_same_stage(tmp_path: Path, corpus: Path):
    """`python -m fmforge.runtime.job --plan` (what a RayJob runs) publishes like `fmforge run`."""
    import subprocess
    import sys

    from fmforge.api.v1alpha1 import DataPileSpec

    d = _dir(tmp_path, corpus)
    spec = DataPileSpec.model_validate(SMALL["spec"]).model_dump(mode="json", by_alias=True)
    plan = {"kind": "DataPile", "name": "pydocs", "namespace": "team-a", "generation": 3, "spec": spec,
            "baseDir": str(d), "artifacts": str(d / "artifacts" / "g3"), "stateDir": str(d / "state")}
    (d / "plan.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-m", "fmforge.runtime.job", "--plan", str(d / "plan.json"),
                        "--result", str(d / "result.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((d / "result.json").read_text())
    assert result["ok"] and result["status"]["tags"] == ["v1"]
    sid = int(result["status"]["version"]["snapshotId"])
    cat = pub.catalog(d / "state")
    assert cat.load_table("team-a.pydocs_documents").snapshot_by_name("v1").snapshot_id == sid
    # a bad plan is a StageError: exit 2, no retry
    bad = dict(plan, spec={**spec, "sources": [{"name": "x", "uri": "file://nope/", "format": "jsonl"}]})
    (d / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "fmforge.runtime.job", "--plan", str(d / "bad.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and json.loads(r.stdout)["reason"] == "InvalidInput"


def test_catalog_is_configurable(tmp_path: Path, monkeypatch):
    """FMFORGE_CATALOG (pyiceberg properties as JSON) picks the catalog, as on a cluster."""
    db = tmp_path / "elsewhere" / "catalog.db"
    db.parent.mkdir()
    monkeypatch.setenv("FMFORGE_CATALOG", json.dumps(
        {"type": "sql", "uri": f"sqlite:///{db}", "warehouse": f"file://{tmp_path / 'wh'}"}))
    cat = pub.catalog(tmp_path / "state")
    cat.create_namespace("team-b")
    assert db.exists() and not (tmp_path / "state" / "catalog").exists()
    monkeypatch.delenv("FMFORGE_CATALOG")
    pub.catalog(tmp_path / "state")
    assert (tmp_path / "state" / "catalog" / "catalog.db").exists()


def test_pile_published_to_an_s3_warehouse(tmp_path: Path, corpus: Path, s3_server, monkeypatch):
    """The cluster set-up: a catalog from FMFORGE_CATALOG whose warehouse is in S3 (the data and
    metadata files go through the S3 API); two versions, both readable by tag."""
    (s3_server.root / "lake").mkdir()  # the bucket
    monkeypatch.setenv("FMFORGE_CATALOG", json.dumps({
        "type": "sql", "uri": f"sqlite:///{tmp_path / 'catalog.db'}", "warehouse": "s3://lake/piles",
        "s3.endpoint": s3_server.endpoint, "s3.access-key-id": s3_server.access_key,
        "s3.secret-access-key": s3_server.secret_key, "s3.region": "us-east-1"}))
    d = _dir(tmp_path, corpus)
    assert _run(d, SMALL).ok
    # what a run killed before it committed leaves: an attempt folder no snapshot refers to
    left = s3_server.root / "lake" / "piles" / "default" / "pydocs_documents" / "data" / "fmforge-0123-dead"
    left.mkdir(parents=True)
    (left / "000000.parquet").write_bytes(b"PAR1 not committed")
    v2 = copy.deepcopy(SMALL)
    v2["spec"]["publish"]["tags"] = ["v2"]
    v2["spec"]["filters"][-1]["minWords"] = 30
    assert _run(d, v2).ok
    assert not left.exists(), "the next run removes it through the catalog's S3 settings"
    state = StateDir(d / ".fmforge")
    cat = pub.catalog(state.root)
    kept = state.read("DataPile", "pydocs")["status"]["stats"]["documents"]["kept"]
    assert pub.read_version(cat, "default", "pydocs", "v2").num_rows == kept
    assert pub.read_version(cat, "default", "pydocs", "v1").num_rows >= kept
    files = [p for p in (s3_server.root / "lake" / "piles").rglob("*.parquet")]
    assert len(files) >= 4, "both versions' documents and sequences are objects in the bucket"
    assert not (state.root / "catalog").exists()


def test_console_script_run_stops_its_ray(tmp_path: Path, corpus: Path):
    """`fmforge run` (the console script, which leaves through os._exit) shuts its Ray down,
    removes Ray's files, and keeps its exit code and output."""
    from fmforge.stages import raysession

    d = tmp_path / "cli"
    d.mkdir()
    shutil.copytree(corpus, d / "corpus")
    m = copy.deepcopy(SMALL)
    (d / "pile.yaml").write_text(yaml.safe_dump(m))
    exe = Path(sys.executable).parent / "fmforge"
    proc = subprocess.Popen([str(exe), "run", str(d), "--progress", "plain"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "Succeeded" in out + err and "1 succeeded" in out + err
    ray_tmp = raysession.temp_dir(d / ".fmforge", proc.pid)
    assert raysession.processes_using(ray_tmp) == [], "the run left Ray processes behind"
    assert raysession.temp_dirs(d / ".fmforge") == [], "Ray's files are removed"


def test_s3_sources_read_like_files(tmp_path: Path, corpus: Path, s3_server, monkeypatch):
    """The same pile from s3:// (a real S3 server, objects PUT through the S3 API) and from
    file:// reads, keeps and digests the same documents; a missing prefix fails clearly."""
    import pyarrow.fs as pafs

    from fmforge.stages import raysession
    from fmforge.stages.uris import s3_filesystem

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    # The Ray workers read the sources with the credentials of their environment, which they
    # take from this process when Ray starts: start a Ray that has them.
    raysession.shutdown()
    (s3_server.root / "piles").mkdir()  # the bucket
    s3 = s3_filesystem()
    for sub in ("prose", "extra"):
        pafs.copy_files(str(corpus / sub), f"piles/raw/{sub}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
    assert {i.path for i in s3.get_file_info(pafs.FileSelector("piles/raw/extra"))} >= {"piles/raw/extra/pii.jsonl"}

    local = _dir(tmp_path, corpus)
    assert _run(local, SMALL).ok
    remote = tmp_path / "s3"
    remote.mkdir()
    m = copy.deepcopy(SMALL)
    m["spec"]["sources"] = [dict(src, uri=src["uri"].replace("file://corpus/", "s3://piles/raw/"))
                            for src in SMALL["spec"]["sources"]]
    report = _run(remote, m)
    assert report.ok, report.outcomes
    a = StateDir(local / ".fmforge").read("DataPile", "pydocs")["status"]
    b = StateDir(remote / ".fmforge").read("DataPile", "pydocs")["status"]
    # the workers' seconds differ from run to run; everything else is the same
    assert {k: v for k, v in b["stats"].items() if k != "stepSeconds"} == \
        {k: v for k, v in a["stats"].items() if k != "stepSeconds"}
    card = json.loads(Path(b["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    assert [s["uri"] for s in card["sources"]] == ["s3://piles/raw/prose/", "s3://piles/raw/extra/"]
    local_card = json.loads(Path(a["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    assert [s["digest"] for s in card["sources"]] == [s["digest"] for s in local_card["sources"]]

    m["spec"]["sources"][0]["uri"] = "s3://piles/nothing-here/"
    report = _run(remote, m)
    assert not report.ok
    assert "python-docs" in report.outcomes[0].message and "s3://piles/nothing-here/" in report.outcomes[0].message

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    raysession.shutdown()
    m["spec"]["sources"][0]["uri"] = "s3://piles/raw/prose/"
    report = _run(remote, m)
    assert not report.ok and "check the credentials" in report.outcomes[0].message
    rec = StateDir(remote / ".fmforge").read("DataPile", "pydocs")
    assert rec["status"]["version"] == b["version"], "a failed run keeps the last version"
