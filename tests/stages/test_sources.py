"""Reading a DataPile's sources: bad values, sizes, link loops, empty files and paths that leave the
manifest's folder. No Ray here: these are decided while the sources are read, before Ray starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmforge.api.v1alpha1.datapile import Source
from fmforge.stages.base import InputError, InvalidSpec
from fmforge.stages.datapile.sources import read_source

GOOD = "The interpreter keeps a reference count for every object and frees it when the count drops."
BAD_VALUES = [None, 12345, True, {"nested": "text"}, ["a", "list"]]


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_values_that_are_not_text_are_skipped_and_counted(tmp_path: Path):
    _jsonl(tmp_path / "d" / "a.jsonl", [{"text": GOOD}, *({"text": v} for v in BAD_VALUES)])
    table, read = read_source(Source(name="s", uri="file://d/"), tmp_path)
    assert table.column("text").to_pylist() == [GOOD], "no value is turned into text"
    assert read.documents == 1 and read.dropped == {"invalidText": len(BAD_VALUES)}


def test_values_that_are_not_text_fail_when_asked(tmp_path: Path):
    _jsonl(tmp_path / "d" / "a.jsonl", [{"text": GOOD}, {"text": None}])
    with pytest.raises(InputError, match=r"a.jsonl line 2: 'text' is null, not text; fix the data, or set invalidText"):
        read_source(Source(name="s", uri="file://d/", invalidText="fail"), tmp_path)


def test_parquet_nulls_and_columns_that_are_not_text(tmp_path: Path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": [GOOD, None], "n": [1, 2]}), tmp_path / "d" / "a.parquet")
    table, read = read_source(Source(name="s", uri="file://d/", format="parquet"), tmp_path)
    assert table.column("text").to_pylist() == [GOOD] and read.dropped == {"invalidText": 1}
    with pytest.raises(InputError, match="column 'n' holds int64, not text"):
        read_source(Source(name="s", uri="file://d/", format="parquet", textField="n"), tmp_path)


@pytest.mark.parametrize("fmt", ["jsonl", "text", "parquet"])
def test_documents_over_the_size_limit_are_dropped_at_read(tmp_path: Path, fmt: str):
    big = "word " * 300_000  # 1.5 MB on one line
    d = tmp_path / "d"
    d.mkdir()
    if fmt == "jsonl":
        _jsonl(d / "a.jsonl", [{"text": GOOD}, {"text": big}])
    elif fmt == "text":
        (d / "a.txt").write_text(GOOD)
        (d / "b.txt").write_text(big)
    else:
        pq.write_table(pa.table({"text": [GOOD, big]}), d / "a.parquet")
    table, read = read_source(Source(name="s", uri="file://d/", format=fmt, maxDocumentBytes="1Mi"), tmp_path)
    assert table.column("text").to_pylist() == [GOOD] and read.dropped == {"tooLarge": 1}
    _, read = read_source(Source(name="s", uri="file://d/", format=fmt, maxDocumentBytes="2Mi"), tmp_path)
    assert read.documents == 2 and read.dropped == {}


def test_a_directory_link_loop_reads_each_file_once(tmp_path: Path):
    tree = tmp_path / "code"
    (tree / "pkg" / "sub").mkdir(parents=True)
    for i, p in enumerate(["a.py", "pkg/b.py", "pkg/sub/c.py"]):
        (tree / p).write_text(f"def f{i}():\n    return {i}\n")
    (tree / "pkg" / "sub" / "loop").symlink_to(tree, target_is_directory=True)
    (tree / "pkg" / "up").symlink_to(tree / "pkg", target_is_directory=True)
    (tmp_path / "secret.py").write_text("password = 'hunter2'\n")
    (tree / "outside.py").symlink_to(tmp_path / "secret.py")
    (tree / "alias.py").symlink_to(tree / "a.py")
    table, read = read_source(Source(name="s", uri="file://code/", format="code"), tmp_path)
    assert sorted(table.column("path").to_pylist()) == ["a.py", "alias.py", "pkg/b.py", "pkg/sub/c.py"]
    assert "hunter2" not in "".join(table.column("text").to_pylist())


def test_an_empty_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("")
    with pytest.raises(InputError, match=r"source s: its 1 jsonl file\(s\) under file://d/ hold no documents"):
        read_source(Source(name="s", uri="file://d/"), tmp_path)


@pytest.mark.parametrize("uri", ["file://../outside/", "file:///etc/", "file://link/"])
def test_file_uris_stay_inside_the_manifests_folder(tmp_path: Path, uri: str):
    base = tmp_path / "m"
    base.mkdir()
    _jsonl(tmp_path / "outside" / "a.jsonl", [{"text": GOOD}])
    (base / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(InvalidSpec, match="outside the manifest's folder .* --allow-outside-paths"):
        read_source(Source(name="s", uri=uri), base)
    if uri != "file:///etc/":
        table, _ = read_source(Source(name="s", uri=uri), base, confine=False)
        assert table.column("text").to_pylist() == [GOOD]


def test_pvc_paths_stay_inside_their_claim(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FMFORGE_PVC_ROOT", str(tmp_path))
    _jsonl(tmp_path / "claim" / "d" / "a.jsonl", [{"text": GOOD}])
    table, _ = read_source(Source(name="s", uri="pvc://claim/d/"), tmp_path)
    assert table.num_rows == 1
    with pytest.raises(InvalidSpec, match="PATH inside the claim"):
        read_source(Source(name="s", uri="pvc://claim/../../etc/"), tmp_path)


def test_the_runner_refuses_paths_outside_unless_allowed(tmp_path: Path):
    """Through `fmforge run`: the object fails with the fix in its message, before Ray starts."""
    from fmforge.runtime.local import run_paths
    from fmforge.runtime.progress import RunConsole

    base = tmp_path / "m"
    base.mkdir()
    _jsonl(tmp_path / "outside" / "a.jsonl", [{"text": GOOD}])
    (base / "pile.yaml").write_text(json.dumps({
        "apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "metadata": {"name": "p"},
        "spec": {"sources": [{"name": "s", "uri": f"file://{os.path.relpath(tmp_path / 'outside', base)}/"}]}}))
    report = run_paths([base / "pile.yaml"], console=RunConsole(rich=False))
    assert [o.word for o in report.outcomes] == ["Failed"]
    assert "InvalidSpec" in report.outcomes[0].message and "--allow-outside-paths" in report.outcomes[0].message
