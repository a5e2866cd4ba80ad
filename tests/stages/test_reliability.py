"""The runner's guarantees under changed data, concurrency, crashes and signals, with real runs.

Each crash here is a real `kill -9` (or SIGTERM) of a real `fmforge run` process. To stop a run at
a chosen point, the process runs the console script's `entry()` with one stage function wrapped
(`_HOOK`): at that point it writes a marker file and then waits for the test, or kills itself.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from piles import SMALL

from fmforge.api.v1alpha1.datapile import DataPileSpec
from fmforge.cli import main
from fmforge.runtime.fingerprint import DigestCache, fingerprint, spec_uris
from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages import raysession
from fmforge.stages.datapile import publish as pub

# Wraps `module.attr` so that its `call`-th call first writes MARKER, then either waits for GO or
# kills the process with SIGKILL; then runs `fmforge ARGS...` through the console script's entry.
_HOOK = """
import importlib, os, signal, sys, time
module, attr, call, action, marker, go = sys.argv[1:7]
mod = importlib.import_module(module)
orig = getattr(mod, attr)
calls = [0]
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == int(call):
        open(marker, "w").write(str(os.getpid()))
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while not os.path.exists(go):
            time.sleep(0.05)
    return orig(*a, **k)
setattr(mod, attr, hooked)
sys.argv = ["fmforge", *sys.argv[7:]]
from fmforge.cli import entry
entry()
"""


def _workdir(tmp_path: Path, corpus: Path, manifest: dict | None = None) -> Path:
    d = tmp_path / "w"
    d.mkdir()
    shutil.copytree(corpus / "prose", d / "corpus" / "prose")
    shutil.copytree(corpus / "extra", d / "corpus" / "extra")
    (d / "pile.yaml").write_text(yaml.safe_dump(manifest or SMALL, sort_keys=False))
    return d


def _run(d: Path, **kw):
    return run_paths([d / "pile.yaml"], console=RunConsole(rich=False), **kw)


def _start(d: Path, hook: tuple[str, str, int, str] | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """`fmforge run d` in a process of its own; with `hook`, (module, attr, call, wait|kill)."""
    marker, go = d / "marker", d / "go"
    for p in (marker, go):
        p.unlink(missing_ok=True)
    args = ["run", str(d), "--progress", "plain"]
    if hook:
        cmd = [sys.executable, "-c", _HOOK, hook[0], hook[1], str(hook[2]), hook[3], str(marker), str(go), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "fmforge"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker, go


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the hook:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the run never reached the hook"
        time.sleep(0.05)


def _tables(d: Path):
    cat = pub.catalog(d / ".fmforge")
    docs, seqs = pub.table_names("default", "pydocs")
    return cat, cat.load_table(docs), cat.load_table(seqs)


def _seq_of(snap) -> int:
    return int(snap.summary.additional_properties["fmforge.sequences-snapshot-id"])


# -- 1. changed data ----------------------------------------------------------------------------


def _write_source(where: Path, fmt: str, text: str) -> None:
    """One source of `fmt` under `where` holding `text` (same length for both contents)."""
    where.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (where / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    elif fmt == "jsonl.gz":
        import gzip

        (where / "a.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": text}) + "\n").encode(), mtime=0))
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": [text]}), where / "a.parquet")
    elif fmt == "text":
        (where / "a.txt").write_text(text)
    else:
        (where / "a.py").write_text(f"# {text}\n")


@pytest.mark.parametrize("scheme", ["file", "pvc", "s3"])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "text", "code"])
def test_replaced_source_contents_change_the_fingerprint(tmp_path: Path, scheme: str, fmt: str, request,
                                                         monkeypatch):
    """What the runner's skip check sees: a source whose file was replaced by other contents of
    the same size, for every scheme and format."""
    base = tmp_path / "m"
    if scheme == "file":
        root, uri = base / "data", "file://data/"
    elif scheme == "pvc":
        monkeypatch.setenv("FMFORGE_PVC_ROOT", str(tmp_path / "pvc"))
        root, uri = tmp_path / "pvc" / "claim" / "data", "pvc://claim/data/"
    else:
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        bucket = f"b{abs(hash((fmt, tmp_path.name))) % 10**8}"
        root, uri = s3.root / bucket / "data", f"s3://{bucket}/data/"
    base.mkdir()
    spec = DataPileSpec.model_validate({"sources": [{"name": "s", "uri": uri, "format": fmt.split(".")[0]}]})
    uris = list(spec_uris(spec.model_dump(mode="json", by_alias=True, exclude_none=True)))
    cache = DigestCache(tmp_path / "fingerprints.json")
    _write_source(root, fmt, "the first text of this document")
    before = fingerprint(uris, base, cache)
    if scheme == "s3":
        time.sleep(1.1)  # S3 reports modification times in whole seconds
    _write_source(root, fmt, "the other text of this document")
    assert fingerprint(uris, base, cache) != before


def test_changed_data_makes_a_new_version_with_its_own_artifacts(tmp_path: Path, corpus: Path):
    d = _workdir(tmp_path, corpus)
    assert _run(d).ok
    state = StateDir(d / ".fmforge")
    v1 = state.read("DataPile", "pydocs")["status"]
    cat, docs, _ = _tables(d)
    v1_tok = Path(docs.snapshot_by_id(int(v1["version"]["snapshotId"])).summary.additional_properties[
        "fmforge.tokenizer"])
    v1_files = {p: p.read_bytes() for p in v1_tok.parent.rglob("*") if p.is_file()}

    # same spec, one source file's contents replaced
    extra = d / "corpus" / "extra" / "pii.jsonl"
    lines = extra.read_text().splitlines()
    extra.write_text("\n".join(lines[1:] + [json.dumps({"id": "new", "text": "A new document about the "
                                                        "interpreter's garbage collector and how reference "
                                                        "counting frees most objects at once."})]) + "\n")
    report = _run(d)
    assert [o.word for o in report.outcomes] == ["Succeeded"], report.outcomes
    v2 = state.read("DataPile", "pydocs")["status"]
    assert v2["version"]["snapshotId"] != v1["version"]["snapshotId"]
    cat, docs, _ = _tables(d)
    v2_tok = Path(docs.snapshot_by_id(int(v2["version"]["snapshotId"])).summary.additional_properties[
        "fmforge.tokenizer"])
    assert v2_tok != v1_tok and v2["dataCard"] != v1["dataCard"]
    # the first version's tokenizer and card are exactly as they were, and still describe it
    assert {p: p.read_bytes() for p in v1_tok.parent.rglob("*") if p.is_file()} == v1_files
    card = json.loads(Path(v1["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    assert card["version"]["snapshotId"] == v1["version"]["snapshotId"]
    old = pub.read_version(cat, "default", "pydocs", int(v1["version"]["snapshotId"]))
    assert "new" not in " ".join(old.column("id").to_pylist()) and old.num_rows == v1["stats"]["documents"]["kept"]
    # and an unchanged re-run is skipped again
    assert [o.word for o in _run(d).outcomes] == ["Skipped"]


def _bpe(path: Path, vocab: int, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def test_a_replaced_tokenizer_makes_a_new_version_recorded_as_a_uri(tmp_path: Path, corpus: Path, monkeypatch):
    """The version's digest covers a loaded tokenizer's content (it did not: a replaced tokenizer.json
    was skipped, and even --force reused the version with the old tokenizer), and the version
    records its tokenizer as a URI that resolves from any folder (it was a path relative to where
    the run started)."""
    texts = [p.read_text() for p in sorted((corpus / "prose").rglob("*.jsonl"))][:20]
    manifest = json.loads(json.dumps(SMALL))
    manifest["spec"]["tokenizer"] = {"uri": "file://tok/tokenizer.json"}
    d = _workdir(tmp_path, corpus, manifest)
    _bpe(d / "tok" / "tokenizer.json", 300, texts)
    monkeypatch.chdir(d.parent)  # a relative state dir, as `fmforge run w` from the folder above
    report = run_paths([Path("w") / "pile.yaml"], console=RunConsole(rich=False))
    assert [o.word for o in report.outcomes] == ["Succeeded"], report.outcomes
    state = StateDir(d / ".fmforge")
    v1 = state.read("DataPile", "pydocs")["status"]["version"]
    _bpe(d / "tok" / "tokenizer.json", 400, texts)
    assert [o.word for o in _run(d).outcomes] == ["Succeeded"]
    v2 = state.read("DataPile", "pydocs")["status"]["version"]
    assert v2["snapshotId"] != v1["snapshotId"] and v2["digest"] != v1["digest"]
    _, docs, _ = _tables(d)
    uri = docs.snapshot_by_id(int(v2["snapshotId"])).summary.additional_properties["fmforge.tokenizer"]
    assert uri.startswith("file:///")
    tok = json.loads((Path(uri.removeprefix("file://")) / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 400


# -- 3, 4. one run at a time; dead runs; signals ---------------------------------------------------


def test_a_second_run_on_the_same_state_dir_is_refused(tmp_path: Path, corpus: Path, capsys):
    d = _workdir(tmp_path, corpus)
    first, marker, go = _start(d, ("fmforge.stages.datapile.publish", "repair", 1, "wait"))
    try:
        _wait_for(marker, first)
        assert main(["run", str(d), "--progress", "plain"]) == 1
        err = capsys.readouterr().err
        assert f"is in use by another fmforge run (pid {first.pid} " in err and "nothing was run" in err
        go.touch()
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        first.kill()
    _, docs, seqs = _tables(d)
    assert len(docs.snapshots()) == len(seqs.snapshots()) == 1


def test_a_killed_run_is_reported_dead_and_the_next_run_takes_over(tmp_path: Path, corpus: Path, capsys):
    d = _workdir(tmp_path, corpus)
    run, marker, _ = _start(d, ("fmforge.stages.datapile.tokenize", "save_tokenizer", 1, "wait"))  # Ray is up by then
    _wait_for(marker, run)
    state = StateDir(d / ".fmforge")
    assert state.read("DataPile", "pydocs")["status"]["phase"] == "Running"
    assert main(["get", "datapile", "pydocs", "--state-dir", str(state.root), "-o", "json"]) == 0
    live = json.loads(capsys.readouterr().out)["status"]
    assert live["phase"] == "Running", "a live run is shown running"
    run.kill()
    run.wait()
    assert main(["get", "datapile", "pydocs", "--state-dir", str(state.root), "-o", "json"]) == 0
    dead = json.loads(capsys.readouterr().out)["status"]
    ready = next(c for c in dead["conditions"] if c["type"] == "Ready")
    assert dead["phase"] == "Failed" and ready["reason"] == "RunnerDied" and f"pid {run.pid} " in ready["message"]

    again, _, _ = _start(d)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "RunnerDied" in out + err, "the next run says what it took over"
    assert state.read("DataPile", "pydocs")["status"]["phase"] == "Succeeded"
    assert raysession.temp_dirs(state.root) == [], "Ray's files of both runs are removed"
    for pid in (run.pid, again.pid):
        assert raysession.processes_using(raysession.temp_dir(state.root, pid)) == [], "no Ray process is left"


def test_sigterm_ends_a_run_as_interrupted(tmp_path: Path, corpus: Path):
    d = _workdir(tmp_path, corpus)
    run, marker, _ = _start(d, ("fmforge.stages.datapile.tokenize", "save_tokenizer", 1, "wait"))
    _wait_for(marker, run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert "stopped by SIGTERM" in err
    for dump in ("Fatal Python error", "Stack trace", "*** SIGTERM", "Traceback"):
        assert dump not in err, err
    rec = StateDir(d / ".fmforge").read("DataPile", "pydocs")
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    assert rec["status"]["phase"] == "Failed" and ready["reason"] == "Interrupted"
    assert raysession.temp_dirs(d / ".fmforge") == []


# -- 5. a kill inside publish ---------------------------------------------------------------------


@pytest.mark.parametrize("call", [1, 2], ids=["before-the-commit-point", "between-the-ref-commits"])
def test_kill_inside_publish(tmp_path: Path, corpus: Path, call: int):
    d = _workdir(tmp_path, corpus)
    assert _run(d).ok
    v1 = StateDir(d / ".fmforge").read("DataPile", "pydocs")["status"]["version"]["snapshotId"]
    v2 = copy.deepcopy(SMALL)
    v2["spec"]["publish"]["tags"] = ["v2"]
    v2["spec"]["filters"][-1]["minWords"] = 30
    (d / "pile.yaml").write_text(yaml.safe_dump(v2, sort_keys=False))
    run, marker, _ = _start(d, ("fmforge.stages.datapile.publish", "promote", call, "kill"))
    run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL and marker.exists()

    cat, docs, seqs = _tables(d)
    assert docs.snapshot_by_name("v1").snapshot_id == int(v1)
    assert len(pub.read_version(cat, "default", "pydocs", "v1", which="sequences")) > 0
    staged = [s for s in docs.snapshots() if s.snapshot_id not in pub._reachable(docs)]
    orphan_files = [e.data_file.file_path for s in seqs.snapshots() if s.snapshot_id not in pub._reachable(seqs)
                    for m in s.manifests(seqs.io) for e in m.fetch_manifest_entry(seqs.io)
                    if e.snapshot_id == s.snapshot_id]
    if call == 1:
        # Nothing of v2 is visible: both tables' current snapshots are still v1's pair.
        assert docs.current_snapshot().snapshot_id == int(v1)
        assert seqs.current_snapshot().snapshot_id == _seq_of(docs.current_snapshot())
        assert docs.snapshot_by_name("v2") is None and len(staged) == 1 and orphan_files
    else:
        # The documents side is published; the sequences table is one version behind until repaired.
        assert docs.snapshot_by_name("v2").snapshot_id == docs.current_snapshot().snapshot_id
        assert seqs.current_snapshot().snapshot_id != _seq_of(docs.current_snapshot())

    report = _run(d)
    assert report.ok, report.outcomes
    cat, docs, seqs = _tables(d)
    for t in (docs, seqs):
        assert {s.snapshot_id for s in t.snapshots()} == pub._reachable(t), "no snapshot is left unreachable"
    assert seqs.current_snapshot().snapshot_id == _seq_of(docs.current_snapshot())
    assert docs.snapshot_by_name("v2").snapshot_id == docs.current_snapshot().snapshot_id
    assert seqs.snapshot_by_name("v2").snapshot_id == _seq_of(docs.current_snapshot())
    assert docs.snapshot_by_name("v1").snapshot_id == int(v1)
    for f in orphan_files:
        # before the commit point the staged snapshot was an orphan: its files go; after it, the
        # staged sequences snapshot belongs to the published version and is completed, not removed
        assert os.path.exists(f.removeprefix("file://")) == (call == 2)
    assert len(pub.read_version(cat, "default", "pydocs", "v2", which="sequences")) > 0


# -- a Ray worker killed mid-run -------------------------------------------------------------------


def _ray_workers_running(state_root: Path, pid: int, task: str) -> list[int]:
    """Pids of the worker processes of run `pid`'s Ray that are running `task` now: children of
    its raylet (whose command line names the run's Ray folder) titled `ray::<task>`."""
    raylets = set(raysession.processes_using(raysession.temp_dir(state_root, pid)))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            title = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid in raylets and title.startswith(f"ray::{task}".encode()):
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_run_is_retried_and_the_version_is_exact(tmp_path: Path, corpus: Path):
    """SIGKILL of a Ray worker while it processes a piece: Ray runs the task again, and the
    version is the same, document for document and sequence for sequence, as an undisturbed run."""
    pile = copy.deepcopy(SMALL)
    pile["spec"]["sources"].append({"name": "python-code", "uri": "file://corpus/code/", "format": "code",
                                    "include": ["*.py"], "license": "PSF-2.0"})
    (tmp_path / "calm").mkdir()
    (tmp_path / "killed").mkdir()
    calm = _workdir(tmp_path / "calm", corpus, pile)
    shutil.copytree(corpus / "code", calm / "corpus" / "code")
    assert _run(calm).ok
    d = _workdir(tmp_path / "killed", corpus, pile)
    shutil.copytree(corpus / "code", d / "corpus" / "code")
    # the driver waits at its first gather of the processed pieces (its fourth gather: reading
    # gathers the chunks' parts, their piece bounds and the scans of files read in parts); the
    # tasks run meanwhile
    run, marker, go = _start(d, ("fmforge.stages.datapile.workers", "gather", 4, "wait"))
    _wait_for(marker, run)
    state_root = d / ".fmforge"
    deadline = time.monotonic() + 60
    killed = []
    while not killed and time.monotonic() < deadline:
        for pid in _ray_workers_running(state_root, run.pid, "process_piece"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.01)
    go.touch()
    out, err = run.communicate(timeout=300)
    assert killed, "no worker was seen processing a piece"
    assert run.returncode == 0, out + err
    assert StateDir(state_root).read("DataPile", "pydocs")["status"]["phase"] == "Succeeded"
    for which in ("documents", "sequences"):
        a, b = (pub.read_version(pub.catalog(x / ".fmforge"), "default", "pydocs", which=which) for x in (calm, d))
        key = "id" if which == "documents" else "seq"
        assert a.sort_by(key).equals(b.sort_by(key)), which
