"""The DataPile stage for real: Ray Data, lingua, alt-profanity-check, rensa, tokenizers, Iceberg."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from paths import STAGE_DATA as DATA
from piles import PILE, expected_dedup

from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.datapile import dedup as dd
from fmforge.stages.datapile import publish as pub
from fmforge.stages.datapile import tokenize as tk


def write(d: Path, manifest: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "pile.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return d / "pile.yaml"


@pytest.fixture(scope="module")
def first_run(corpus: Path, tmp_path_factory):
    d = corpus.parent
    path = write(d, PILE)
    report = run_paths([path], console=RunConsole(rich=False))
    assert report.ok, report.outcomes
    state = StateDir(d / ".fmforge")
    return d, state, state.read("DataPile", "pydocs")


def docs_of(state: StateDir, ref=None) -> pa.Table:
    return pub.read_version(pub.catalog(state.root), "default", "pydocs", ref)


def test_counters_add_up(first_run):
    _, _, rec = first_run
    st = rec["status"]["stats"]
    assert st["documents"]["read"] == st["documents"]["kept"] + sum(st["dropped"].values())
    for reason in ("language", "hap", "license", "duplicateExact", "duplicateFuzzy"):
        assert st["dropped"][reason] > 0, reason
    assert rec["status"]["phase"] == "Succeeded"
    assert st["tokens"] > 10_000 and st["sequences"] > 10


def test_exact_duplicates_all_go(first_run):
    _, state, _ = first_run
    docs = docs_of(state, "v1")
    h = dd.content_hashes(docs.column("text"))
    assert len(np.unique(h, axis=0)) == docs.num_rows


def _shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    w = re.sub(r"\s+", " ", text.lower()).strip().split(" ")
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def test_known_near_duplicates_go(first_run, corpus: Path):
    _, state, _ = first_run
    trees = sorted((corpus / "code").iterdir())
    assert len(trees) == 2, "two standard-library trees give the near duplicates"
    near = []
    for a in sorted(trees[0].glob("*.py")):
        b = trees[1] / a.name
        if b.exists():
            ta, tb = a.read_text(errors="replace"), b.read_text(errors="replace")
            if ta != tb:
                sa, sb = _shingles(ta), _shingles(tb)
                if len(sa & sb) / len(sa | sb) >= 0.9:
                    near.append(a.name)
    assert near, "the two trees must differ in some files"
    docs = docs_of(state, "v1")
    paths = [p for p, s in zip(docs.column("path").to_pylist(), docs.column("source").to_pylist(), strict=True)
             if s == "python-code"]
    for name in near:
        assert sum(p.endswith("/" + name) for p in paths) <= 1, f"both copies of {name} survived"


def test_hap_pii_and_licenses(first_run):
    _, state, _ = first_run
    docs = docs_of(state, "v1")
    texts = "\n".join(docs.column("text").to_pylist())
    assert "fucking idiot" not in texts and "worthless crap" not in texts
    assert "reference counting handles most objects" in texts.lower()  # the clean line stays
    assert "jane.doe@example.org" not in texts and "<EMAIL>" in texts
    assert "4111 1111 1111 1111" not in texts and "<CREDIT_CARD>" in texts and "<IBAN>" in texts
    assert "<IP_ADDRESS>" in texts and "192.0.2.15" in texts, "documentation addresses are not personal"
    assert "1234 5678 9012 3456" in texts, "a number failing Luhn is not a card"
    lic = dict(zip(docs.column("path").to_pylist(), docs.column("license").to_pylist(), strict=True))
    assert not any(p.startswith("GPL") for p in lic), "GPL texts are outside the allow-list"
    assert lic.get("Apache-2.0.txt") == "Apache-2.0"


def test_languages_on_labelled_samples():
    from fmforge.stages.datapile.annotate import natural_language

    rows = [json.loads(line) for line in (DATA / "languages.jsonl").read_text().splitlines()]
    codes, conf = natural_language([r["text"] for r in rows], 0.3)
    assert codes == [r["lang"] for r in rows]
    assert (conf > 0.3).all()


def test_programming_languages():
    from fmforge.stages.datapile.annotate import programming_language

    assert programming_language("a/b/util.py", "import os\n") == "python"
    assert programming_language("main.c", "int main(void) { return 0; }\n") == "c"
    assert programming_language("build", "#!/bin/bash\nset -e\necho hi\n") == "bash"


def test_lexer_index_agrees_with_pygments():
    from pygments.lexers import get_lexer_for_filename
    from pygments.util import ClassNotFound

    from fmforge.stages.datapile.annotate import _lexer_for_name

    names = ["util.py", "test_os.py", "x.pyi", "main.c", "a.h", "Dockerfile", "CMakeLists.txt", "notes.txt",
             "ls.1", "style.css.j2", "FooSpec.hs", "lib.rs", "index.html", "Makefile", "run.sh", ".bashrc",
             "x.unknownext", "README", "q.sql", "a.googlesql.sql", "x.xbm", "k.kt", "app.tsx", "conf.yaml"]
    for name in names:
        try:
            expected = get_lexer_for_filename(name).name.lower()
        except ClassNotFound:
            expected = None
        assert _lexer_for_name(name) == expected, name


def test_tags_resolve_to_the_right_snapshot(first_run):
    _, state, rec = first_run
    cat = pub.catalog(state.root)
    docs_name, seq_name = pub.table_names("default", "pydocs")
    t = cat.load_table(docs_name)
    sid = int(rec["status"]["version"]["snapshotId"])
    assert t.snapshot_by_name("v1").snapshot_id == sid
    props = t.snapshot_by_id(sid).summary.additional_properties
    assert props[pub.PROP_DIGEST] == rec["status"]["version"]["digest"]
    assert json.loads(props["fmforge.stats"])["documents"]["kept"] == rec["status"]["stats"]["documents"]["kept"]
    assert docs_of(state, "v1").num_rows == rec["status"]["stats"]["documents"]["kept"]
    seqs = pub.read_version(cat, "default", "pydocs", "v1", which="sequences")
    assert seqs.num_rows == rec["status"]["stats"]["sequences"]
    assert set(seqs.column("split").to_pylist()) == {"train", "validation"}
    assert all(len(x) == 128 for x in seqs.column("input_ids").to_pylist()[:5])


def test_sequences_have_document_boundaries(first_run):
    _, state, rec = first_run
    art = Path(rec["status"]["dataCard"].removeprefix("file://")).parent
    tok = tk.load_tokenizer(art / "tokenizer")
    eos = tok.token_to_id(tk.EOS)
    seqs = pub.read_version(pub.catalog(state.root), "default", "pydocs", "v1", which="sequences")
    flat = np.concatenate([np.asarray(x) for x in seqs.column("input_ids").to_pylist()])
    assert (flat == eos).sum() >= rec["status"]["stats"]["documents"]["kept"]
    assert tok.get_vocab_size() == 2048


def test_tokenizer_trains_on_a_bounded_sample(first_run):
    _, _, rec = first_run
    card = json.loads(Path(rec["status"]["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    m = re.search(r"on (\d+) documents \(([\d.]+) MB\) of the training split", card["tokenizer"])
    assert m, card["tokenizer"]
    assert 0 < int(m.group(1)) < rec["status"]["stats"]["documents"]["kept"]
    assert 1.0 <= float(m.group(2)) <= 1.6, "stops at the first document past 1Mi"


def test_training_sample_is_stable_and_bounded():
    ids = [f"{i * 2654435761 % 2**32:08x}" for i in range(200)]
    sizes = np.array([5 * (10 + i) for i in range(200)])
    splits = np.array(["validation" if i % 10 == 0 else "train" for i in range(200)], dtype=object)
    a = tk.training_sample(ids, sizes, splits, 5_000)
    assert a == tk.training_sample(list(ids), sizes.copy(), splits.copy(), 5_000)
    assert all(splits[i] == "train" for i in a)
    size = int(sizes[a].sum())
    assert 5_000 <= size < 5_000 + sizes.max()
    # the documents left out all come after the budget was reached, in id order
    order = sorted((ids[i], i) for i in range(200) if splits[i] == "train")
    taken = [i for _, i in order[:len(a)]]
    assert sorted(taken) == a
    assert a != list(range(len(a))), "taken in id-hash order, not file order"
    assert tk.training_sample(ids, sizes, splits, 0) == [i for i in range(200) if splits[i] == "train"]
    only_val = np.array(["validation"] * 200, dtype=object)
    assert len(tk.training_sample(ids, sizes, only_val, 0)) == 200


def test_pack_lays_documents_end_to_end_with_eos():
    ids = pa.array([[1, 2, 3], [4], [], [5, 6], [7]], pa.list_(pa.int32()))
    splits = np.array(["train", "train", "train", "validation", "train"], dtype=object)
    seqs, tokens = tk.pack(ids, splits, eos=0, pad=9, seq_len=3)
    rows = seqs.to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    # train: 1 2 3 EOS 4 EOS EOS 7 EOS -> three full rows; validation: 5 6 EOS -> one
    assert [r["input_ids"] for r in train] == [[1, 2, 3], [0, 4, 0], [0, 7, 0]]
    assert [r["length"] for r in train] == [3, 3, 3]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["input_ids"] for r in val] == [[5, 6, 0]] and val[0]["length"] == 3
    assert tokens == {"train": 9, "validation": 3}
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    short, _ = tk.pack(pa.array([[1, 2]], pa.list_(pa.int32())), np.array(["train"], dtype=object), 0, 9, 4)
    assert short.to_pylist()[0]["input_ids"] == [1, 2, 0, 9] and short.to_pylist()[0]["length"] == 3


def test_sequences_hold_exactly_the_kept_documents(first_run):
    """Each piece's sequences, cut at EOS, are the token ids of that piece's kept documents of
    the split, each once: nothing lost, nothing duplicated, no document across two pieces."""
    _, state, rec = first_run
    tok = tk.load_tokenizer(Path(rec["status"]["dataCard"].removeprefix("file://")).parent / "tokenizer")
    eos, pad = tk.special_ids(tok)
    cat = pub.catalog(state.root)
    docs = pub.read_version(cat, "default", "pydocs", "v1")
    seqs = pub.read_version(cat, "default", "pydocs", "v1", which="sequences").sort_by("seq")
    pairs = list(zip(docs.column("text").to_pylist(), docs.column("split").to_pylist(), strict=True))
    want = {split: sorted(tuple(tok.encode(t, add_special_tokens=False).ids) for t, sp in pairs if sp == split)
            for split in ("train", "validation")}
    got: dict[str, list] = {"train": [], "validation": []}
    pieces = {}
    for row in seqs.to_pylist():
        pieces.setdefault((row["seq"] >> 32, row["split"]), []).append(row["input_ids"][:row["length"]])
    for (_, split), rows in pieces.items():
        flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
        assert flat[-1] == eos, "a piece's last sequence ends at a document boundary"
        cuts = np.flatnonzero(flat == eos)
        got[split] += [tuple(x) for x in np.split(flat[:cuts[-1]], cuts[:-1] + 1)]
        assert all(len(r) == 128 for r in rows[:-1]), "only the last sequence of a piece is short"
    got = {k: sorted(tuple(t for t in doc if t != eos) for doc in v) for k, v in got.items()}
    assert got == want
    assert pad not in np.concatenate([np.asarray(r[:rec_len]) for r, rec_len in
                                      zip(seqs.column("input_ids").to_pylist(), seqs.column("length").to_pylist(),
                                          strict=True)])


def test_data_card(first_run):
    _, _, rec = first_run
    md = Path(rec["status"]["dataCard"].removeprefix("file://"))
    text = md.read_text()
    for heading in ("## Sources", "## What each step dropped", "## Deduplication", "## Languages",
                    "## Licences of kept documents"):
        assert heading in text
    card = json.loads((md.parent / "datacard.json").read_text())
    assert card["version"]["snapshotId"] == rec["status"]["version"]["snapshotId"]
    assert {s["name"] for s in card["sources"]} == {"python-docs", "python-code", "licenses", "extra"}
    assert all(s["digest"].startswith("sha256:") for s in card["sources"])
    # the trained byte-level BPE is encoded by tiktoken, every piece checked against tokenizers
    enc = card["encoder"]
    assert enc["encoder"] == "tiktoken" and enc["fellBack"] == 0 and enc["why"] == "", enc
    assert enc["documentsChecked"] >= sum(enc["pieces"].values()) > 0
    assert "- Encoder: tiktoken" in text


def test_rerun_unchanged_publishes_nothing(first_run):
    d, state, rec = first_run
    cat = pub.catalog(state.root)
    before = len(cat.load_table(pub.table_names("default", "pydocs")[0]).snapshots())
    # --force runs the stage even though the runner would skip it; the stage finds the version
    report = run_paths([d / "pile.yaml"], console=RunConsole(rich=False), force=True)
    assert report.ok
    assert "already published" in report.outcomes[0].message
    assert len(cat.load_table(pub.table_names("default", "pydocs")[0]).snapshots()) == before
    again = state.read("DataPile", "pydocs")
    assert again["status"]["version"] == rec["status"]["version"]
    # the sources the version was made from, with their digests, in the status (the lineage a
    # cluster reads) as in the record, on the run that published and on the one that found it
    sources = rec["status"]["sources"]
    assert sources and all(s["digest"].startswith("sha256:") and s["uri"] for s in sources), sources
    assert sources == rec["fmforge"]["lineage"] == again["status"]["sources"]


def test_retag_publishes_no_new_snapshot(first_run):
    """Changing only publish.tags moves tags onto the same version: no new snapshot."""
    d, state, rec = first_run
    cat = pub.catalog(state.root)
    docs_name = pub.table_names("default", "pydocs")[0]
    before = len(cat.load_table(docs_name).snapshots())
    m = yaml.safe_load((d / "pile.yaml").read_text())
    m["spec"]["publish"]["tags"] = ["v1", "stable"]
    write(d, m)
    report = run_paths([d / "pile.yaml"], console=RunConsole(rich=False))
    assert report.ok and report.outcomes[0].word == "Succeeded"
    t = pub.catalog(state.root).load_table(docs_name)
    assert len(t.snapshots()) == before
    sid = int(rec["status"]["version"]["snapshotId"])
    assert t.snapshot_by_name("stable").snapshot_id == sid == t.snapshot_by_name("v1").snapshot_id
    assert state.read("DataPile", "pydocs")["status"]["tags"] == ["stable", "v1"]


def test_keep_dropped_publishes_each_dropped_document_with_its_reason(corpus: Path, tmp_path: Path):
    """publish.keepDropped: a third table of the same version holds every document a filter or
    dedup dropped, with the reason (and for a duplicate, the document it duplicates); its counts
    are the status's counters. A version made without it has no such table."""
    import shutil

    from piles import SMALL

    d = tmp_path / "w"
    shutil.copytree(corpus, d / "corpus")
    m = copy.deepcopy(SMALL)
    m["spec"]["publish"]["keepDropped"] = True
    assert run_paths([write(d, m)], console=RunConsole(rich=False)).ok
    state = StateDir(d / ".fmforge")
    st = state.read("DataPile", "pydocs")["status"]
    cat = pub.catalog(state.root)
    dropped = pub.read_version(cat, "default", "pydocs", "v1", which="dropped")
    docs = pub.read_version(cat, "default", "pydocs", "v1")
    counts = Counter(dropped.column("reason").to_pylist())
    assert counts == {k: v for k, v in st["stats"]["dropped"].items() if v}
    assert counts["duplicateExact"] > 0 and counts["quality"] > 0
    assert not set(dropped.column("id").to_pylist()) & set(docs.column("id").to_pylist())
    text = dict(zip(docs.column("id").to_pylist() + dropped.column("id").to_pylist(),
                    docs.column("text").to_pylist() + dropped.column("text").to_pylist(), strict=True))
    for row in dropped.to_pylist():
        if row["reason"] == "duplicateExact":
            a, b = dd.normalize(pa.array([row["text"], text[row["duplicate_of"]]])).to_pylist()
            assert a == b and row["duplicate_of"] < row["id"], "the copy with the smallest id stays"
        elif row["reason"] == "quality":
            assert row["rule"] and row["duplicate_of"] is None
    card = json.loads(Path(st["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    assert card["droppedTable"] == "default.pydocs_dropped"
    assert card["stats"]["stepSeconds"]["quality"] > 0 and card["stats"]["stepSeconds"]["minhash"] > 0
    assert st["stats"]["stepSeconds"] == card["stats"]["stepSeconds"]

    # the same pile without it is another version, with no dropped table
    m["spec"]["publish"]["keepDropped"] = False
    assert run_paths([write(d, m)], console=RunConsole(rich=False)).ok
    with pytest.raises(KeyError, match="keepDropped"):
        pub.read_version(pub.catalog(state.root), "default", "pydocs", "v1", which="dropped")


def test_pieces_and_partitions_do_not_change_what_is_kept(first_run):
    """The same steps in this process, over the whole corpus as one table and one shuffle
    partition (the shape of the pipeline before it streamed), keep exactly the documents and
    count exactly the drops of the Ray run, which cut the corpus into pieces (and its larger JSON
    lines file into parts). That the shuffle's partitions do not change the pairs:
    test_band_partitions_follow_the_rows_not_the_pairs."""
    from fmforge.api.v1alpha1.datapile import DataPileSpec
    from fmforge.stages.datapile.sources import read_source

    d, state, rec = first_run
    spec = DataPileSpec.model_validate(PILE["spec"])
    kept, exact, fuzzy, _ = expected_dedup(spec, pa.concat_tables([read_source(s, d)[0] for s in spec.sources]))
    assert kept == sorted(docs_of(state, "v1").column("id").to_pylist())
    dropped = rec["status"]["stats"]["dropped"]
    assert (dropped["duplicateExact"], dropped["duplicateFuzzy"]) == (len(exact), len(fuzzy))
    assert rec["status"]["stats"]["sequences"] > 0 and len(state.read("DataPile", "pydocs")) > 0


def test_band_partitions_follow_the_rows_not_the_pairs():
    """The shuffle's partitions are sized by the band rows (not the CPUs), and whatever their
    number the candidate pairs are the same; with verify, the second pass over the candidate
    pairs' signatures keeps exactly the pairs whose estimated similarity reaches the threshold."""
    from fmforge.stages.datapile import workers as wk

    per = wk.BAND_ROWS_PER_PARTITION
    assert [wk.band_partitions(r) for r in (0, 1, per, per + 1, 10 * per)] == [1, 1, 1, 2, 10]
    assert wk.band_partitions(10**12) == wk.MAX_PARTITIONS

    rng = np.random.default_rng(3)
    n, num_perm, bands = 3000, 112, 14
    sig = rng.integers(0, 2**63, size=(n, num_perm), dtype=np.uint64)
    for i, changed in ((i, 0.1 if i % 2 else 0.5) for i in range(200)):  # near copies of documents 1000..1199
        sig[i] = sig[1000 + i]
        at = rng.random(num_perm) < changed
        sig[i, at] = rng.integers(0, 2**63, size=int(at.sum()), dtype=np.uint64)
    ids = pa.array([f"{(i * 7919) % n:05d}" for i in range(n)])
    table = pa.table({"id": ids, "minhash": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), num_perm)})
    pieces = [table.slice(a, 750) for a in range(0, n, 750)]
    results = {}
    for parts in (1, 3, 8):
        split = [wk.band_piece(p, np.ones(p.num_rows, dtype=bool), bands, parts) for p in pieces]
        split = [[s] if parts == 1 else list(s) for s in split]
        out = [wk.pairs_of_bands(*[s[k] for s in split]) for k in range(parts)]
        pairs = pa.concat_tables([o[0] for o in out]).group_by(["a", "b"]).aggregate([])
        results[parts] = (sorted(zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True)),
                          sum(o[1] for o in out))
    assert results[1] == results[3] == results[8]
    pairs_list, _ = results[1]
    assert len(pairs_list) >= 100

    pairs = pa.table({"a": [a for a, _ in pairs_list], "b": [b for _, b in pairs_list]})
    involved = pc.unique(pa.concat_arrays([pairs.column("a").combine_chunks(), pairs.column("b").combine_chunks()]))
    sigs = [wk.piece_signatures(p, involved) for p in pieces]
    assert sum(s.num_rows for s in sigs) == len(involved) < n
    kept = wk.verify_pairs(0.8, pairs, *sigs)
    row = {x: i for i, x in enumerate(ids.to_pylist())}
    want = [(a, b) for a, b in pairs_list if (sig[row[a]] == sig[row[b]]).mean() >= 0.8]
    assert sorted(zip(kept.column("a").to_pylist(), kept.column("b").to_pylist(), strict=True)) == want
    assert 0 < len(want) < len(pairs_list), "some candidates pass, some do not"



def test_hashes_do_not_depend_on_where_a_batch_ends(corpus: Path):
    """A document's exact hash and shingles are the same whichever batch holds it and wherever
    in the batch it sits (pyarrow's whitespace split once kept a trailing newline of a batch's
    last text, depending on the memory after its buffer); words are trimmed, no empty word at
    either end."""
    from fmforge.api.v1alpha1.datapile import Source
    from fmforge.stages.datapile.sources import read_source

    assert dd.words(pa.array(["  A b \n", "x", "", " \t"])).to_pylist() == [["a", "b"], ["x"], [""], [""]]
    texts = pa.concat_tables([read_source(Source(name=n, uri=f"file://corpus/{n}/", format=f), corpus.parent)[0]
                              for n, f in (("prose", "jsonl"), ("code", "code"))]).column("text")
    texts = pa.array([t + "\n" for t in texts.to_pylist()], pa.large_string())  # every text ends in a newline
    whole = dd.content_hashes(texts)
    one = np.concatenate([dd.content_hashes(pa.array([t], pa.large_string())) for t in texts.to_pylist()])
    assert (whole == one).all()
    for width in (7, 50):
        cut = np.concatenate([dd.content_hashes(texts.slice(a, width)) for a in range(0, len(texts), width)])
        assert (cut == whole).all(), f"batches of {width}"
