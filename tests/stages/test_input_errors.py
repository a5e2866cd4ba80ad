"""Stage inputs that used to fail with a traceback, or not at all, now fail with one line that
names the file (or field), the line where there is one, and the fix, as the right typed error
(issue 17, defect 7):

- TunedModel templates: format specs, conversions, huge widths, attribute and index access are
  refused before any record is read (and by the spec's model: tests/badmanifests.py);
- ModelCard prompts files: not UTF-8, empty, a line that is not JSON or lacks a field, an empty
  prompt, a prompt longer than the model's context less maxNewTokens;
- DataPile: a full, read-only or forbidden output (ENOSPC, EROFS, EACCES), in a Ray worker or
  on the driver, ends as one line without Ray's traceback or colour codes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fmforge.api.v1alpha1.tunedmodel import TEMPLATE_RE2, TunedModelSpec, template_fields
from fmforge.stages.base import InvalidSpec
from fmforge.stages.tune import data as examples

# -- TunedModel templates ----------------------------------------------------------------------------

FIELD = "spec.data.promptTemplate"


@pytest.mark.parametrize("template, words", [
    ("Q: {question:d}", ["{question:d} at character 4", "format spec or conversion", "write {question}"]),
    ("Q: {question!r}", ["{question!r} at character 4", "write {question}"]),
    ("{question!x}", ["{question!x} at character 1", "write {question}"]),
    ("{question:99999999}", ["{question:99999999}", "format spec", "write {question}"]),
    ("{question:>{width}}", ["{question:>{width}", "nested"]),
    ("{a.b}", ["{a.b} at character 1", "attribute or an index", "like {question}"]),
    ("{a[0]}", ["{a[0]} at character 1", "attribute or an index"]),
    ("x {} y", ["{} at character 3", "names no field"]),
    ("{0}", ["{0}", "not a field name"]),
    ("{question", ["'{' at character 1 is never closed", "'{{'"]),
    ("a } b", ["single '}' at character 3", "'}}'"]),
])
def test_a_template_that_is_more_than_plain_fields_is_refused_naming_the_placeholder(template: str, words):
    with pytest.raises(InvalidSpec) as e:
        examples.check_template(template, FIELD)
    msg = str(e.value)
    assert msg.startswith(f"{FIELD}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    # the spec's model refuses it too, with the same words (what `fmforge validate` prints)
    spec = {"baseModel": {"uri": "file://m"}, "data": {"uri": "file://d.jsonl", "promptTemplate": template}}
    with pytest.raises(ValueError) as v:
        TunedModelSpec.model_validate(spec)
    [err] = v.value.errors()
    assert err["loc"] == ("data", "promptTemplate") and all(w in err["msg"] for w in words), err


@pytest.mark.parametrize("template, fields", [
    ("Question: {question}\nAnswer:", ["question"]),
    ("{{literal}} {a}}}{{{b}}}", ["a", "b"]),
    ("{größe} {_x1}", ["größe", "_x1"]),
    ("no placeholder", []),
])
def test_plain_templates_pass_and_fill(template: str, fields: list[str]):
    assert examples.check_template(template, FIELD) == fields
    rec = examples.Record({f: "v" for f in fields}, "f line 1", "k")
    assert examples.fill(template, rec, FIELD) == template.format_map({f: "v" for f in fields})


def test_the_crd_rule_accepts_every_template_the_model_accepts():
    """The CEL rule's regex (RE2, here read by Python's re: the pattern uses only what both read
    alike) is looser than the model's check, never stricter, and refuses what reaches the
    formatter."""
    import yaml
    from paths import ROOT

    crd = yaml.safe_load((ROOT / "crds" / "fmforge.io_tunedmodels.yaml").read_text())
    data = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["data"]
    for name in ("promptTemplate", "completionTemplate"):
        [rule] = data["properties"][name]["x-kubernetes-validations"]
        assert rule["rule"] == f"self.matches('{TEMPLATE_RE2}')"
    # CEL reads a backslash in a string literal as an escape (`\s` would make the CRD invalid)
    assert "\\" not in TEMPLATE_RE2
    samples = ["{question}", "{{x}}", "{{{a}}}", "{a}}}", "{größe}", "{ a }", "{a-b}", "x{{", "}}x", "{a}{b}",
               "{a:d}", "{a!r}", "{a:99999999}", "{a.b}", "{a[0]}", "{}", "{0}", "{a", "a}", "{{a}", "{a:{b}}",
               "{a:}", "{a!}"]
    for s in samples:
        try:
            template_fields(s)
            ok = True
        except ValueError:
            ok = False
        cel = re.match(TEMPLATE_RE2, s) is not None
        assert cel or not ok, f"the API server would refuse {s!r}, which fmforge validate accepts"
        if any(c in s for c in ":!.[") or s in ("{}", "{0}", "{a", "a}", "{{a}"):
            assert not cel, f"the API server would accept {s!r}"


# -- ModelCard prompts files -------------------------------------------------------------------------

#: The test model's context: 64 positions, 8 of them kept for the answer.
CONTEXT, NEW_TOKENS = 64, 8


@pytest.fixture(scope="module")
def card_ws(tmp_path_factory):
    """A folder with a TrainingRun record whose model is a tiny GPT-2 (64 positions, random
    weights: every case here fails before a token is generated) and its byte-level BPE."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from fmforge.runtime.state import StateDir
    from fmforge.stages.artifacts import model_digest

    root = tmp_path_factory.mktemp("card")
    out = root / "model"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(topics.values())[:40], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    digest = model_digest(out)
    StateDir(root / ".fmforge").write({
        "apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "gpt", "generation": 1},
        "spec": {}, "status": {"phase": "Succeeded", "model": {"uri": out.as_uri(), "digest": digest}},
        "fmforge": {"artifactDigest": digest}})
    return root


def _card(root, name: str, body: bytes, **benchmark) -> tuple[str, str, str]:
    """Run a ModelCard whose prompts benchmark reads `body` (as prompts.jsonl): the outcome's word,
    and the Ready condition's reason and message."""
    import yaml

    from fmforge.runtime.local import run_paths
    from fmforge.runtime.progress import RunConsole
    from fmforge.runtime.state import StateDir

    (root / f"{name}.jsonl").write_bytes(body)
    manifest = {"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard", "metadata": {"name": name},
                "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"},
                         "benchmarks": [{"name": "qa", "type": "prompts", "uri": f"file://{name}.jsonl",
                                         "metric": "contains", "maxNewTokens": NEW_TOKENS,
                                         "threshold": {"min": 0.0}, **benchmark}],
                         "card": {"description": "A test model.", "license": "apache-2.0", "owners": ["tests"]}}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    report = run_paths([root / f"{name}.yaml"], state_dir=root / ".fmforge", console=RunConsole(rich=False))
    assert not report.errors, report.errors
    rec = StateDir(root / ".fmforge").read("ModelCard", name)
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    return report.outcomes[0].word, ready["reason"], ready["message"]


GOOD = b'{"prompt": "What is a list?", "expected": "sequence"}\n'


@pytest.mark.parametrize("name, body, reason, words", [
    ("latin1", GOOD + '{"prompt": "Qu\'est-ce qu\'une liste ? Réponse :", "expected": "x"}\n'.encode("latin-1"),
     "InvalidInput", ["file://latin1.jsonl line 2: not UTF-8 text", "byte 0xe9", "save the file as UTF-8"]),
    ("empty", b"", "InvalidInput", ["file://empty.jsonl: no prompts in the file (empty)",
                                   '{"prompt": "...", "expected": "..."}']),
    ("blank", b"\n  \n", "InvalidInput", ["file://blank.jsonl: no prompts in the file (blank lines only)"]),
    ("notjson", GOOD + b"prompt: what is a dict?\n", "InvalidInput",
     ["file://notjson.jsonl line 2: not valid JSON", "each line must be an object like"]),
    ("array", GOOD + b'["What is a dict?", "mapping"]\n', "InvalidInput",
     ["file://array.jsonl line 2: a JSON array, not an object"]),
    ("noexpected", GOOD + GOOD + b'{"prompt": "What is a dict?", "answer": "mapping"}\n', "InvalidInput",
     ['file://noexpected.jsonl line 3: no "expected" field', "'answer', 'prompt'"]),
    ("notstring", b'{"prompt": "How many?", "expected": 3}\n', "InvalidInput",
     ['file://notstring.jsonl line 1: "expected" is a JSON number, not a string', "as a string"]),
    ("emptyprompt", GOOD + b'{"prompt": "  ", "expected": "mapping"}\n', "InvalidInput",
     ["file://emptyprompt.jsonl line 2: the prompt is empty", "remove the line"]),
    ("long", GOOD + b"\n" + json.dumps({"prompt": "word " * 80, "expected": "x"}).encode() + b"\n", "InvalidInput",
     ["file://long.jsonl line 3: the prompt is", f"the model reads {CONTEXT}, {NEW_TOKENS} of them kept for the "
      f"answer (maxNewTokens), so a prompt may have {CONTEXT - NEW_TOKENS}", "shorten the prompt or lower "
      "maxNewTokens"]),
])
def test_a_broken_prompts_file_fails_naming_the_file_the_line_and_the_fix(card_ws, name, body, reason, words):
    word, got, msg = _card(card_ws, name, body)
    assert word == "Failed" and got == reason, (got, msg)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_max_new_tokens_that_fill_the_context_is_a_spec_error(card_ws):
    word, reason, msg = _card(card_ws, "toomany", GOOD, maxNewTokens=CONTEXT)
    assert word == "Failed" and reason == "InvalidSpec", msg
    assert msg == (f"spec.benchmarks[0].maxNewTokens: {CONTEXT} new tokens leave no room for a prompt in the "
                   f"{CONTEXT} tokens the model reads; set maxNewTokens below {CONTEXT}")


def test_a_prompt_that_just_fits_is_answered(card_ws):
    """The bound is exact: a prompt of context - maxNewTokens tokens is measured (the model
    generates up to the context's last position)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(card_ws / "model")
    words = "list " * (CONTEXT - NEW_TOKENS)
    ids = tok(words)["input_ids"][:CONTEXT - NEW_TOKENS]
    prompt = tok.decode(ids)
    assert len(tok(prompt)["input_ids"]) == CONTEXT - NEW_TOKENS
    word, reason, msg = _card(card_ws, "fits", json.dumps({"prompt": prompt, "expected": "x"}).encode() + b"\n")
    assert word == "Succeeded", (reason, msg)


# -- DataPile: a disk that refuses the pile's files -------------------------------------------------

WAREHOUSE_FIX = "point the catalog's warehouse elsewhere"


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str, readonly: bool = False):
    """A tmpfs of `size` mounted at `path` (read-only if asked), unmounted afterwards: a real
    full or read-only disk, not a mock. Root only; skipped elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    options = f"size={size},mode=0755" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "fmforge-test", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        # lazy: a Ray worker still holding a file open must not keep the mount (or fail the test)
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def _pile_dir(root: Path) -> Path:
    """A DataPile folder: 300 documents of made-up words (about 600 KB, 150 KB or more of Parquet)
    and a manifest without filters, fuzzy dedup or categorizer, for speed."""
    import random

    import yaml

    rng = random.Random(7)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    (root / "data").mkdir(parents=True)
    with (root / "data" / "docs.jsonl").open("w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(300))}) + "\n")
    pile = {"apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "metadata": {"name": "full"},
            "spec": {"sources": [{"name": "words", "uri": "file://data/", "format": "jsonl"}],
                     "categorize": {"naturalLanguage": {"enabled": False}, "programmingLanguage": {"enabled": False}},
                     "filters": [], "dedup": {"exact": True, "fuzzy": {"enabled": False}},
                     "tokenizer": {"train": {"vocabSize": 300}}, "tokenize": {"sequenceLength": 64},
                     "publish": {"tags": ["v1"]}, "resources": {"workers": 1, "cpusPerWorker": 1}}}
    (root / "pile.yaml").write_text(yaml.safe_dump(pile, sort_keys=False))
    return root / "pile.yaml"


def _run_pile(manifest: Path) -> tuple[str, str, str]:
    """Run the DataPile: its outcome's word, and its Ready condition's reason and message."""
    from fmforge.runtime.local import run_paths
    from fmforge.runtime.progress import RunConsole
    from fmforge.runtime.state import StateDir

    state = manifest.parent / ".fmforge"
    report = run_paths([manifest], state_dir=state, console=RunConsole(rich=False))
    assert not report.errors, report.errors
    ready = next(c for c in StateDir(state).read("DataPile", "full")["status"]["conditions"] if c["type"] == "Ready")
    return report.outcomes[0].word, ready["reason"], ready["message"]


def _one_clean_line(msg: str) -> None:
    assert "\n" not in msg and "\x1b" not in msg and "Traceback" not in msg and "ray::" not in msg, msg
    assert len(msg) < 300, msg


@pytest.mark.parametrize("where", ["worker", "driver"])
def test_a_full_warehouse_fails_in_one_line(tmp_path: Path, monkeypatch, where: str):
    """The warehouse on a 64 KiB tmpfs: the tables' metadata fits and the Ray task writing the
    first Parquet file finds the disk full (worker); or the disk is full before the run, and the
    driver creating the tables finds it so (driver)."""
    manifest = _pile_dir(tmp_path / "w")
    with tiny_filesystem(tmp_path / "full", "64k") as full:
        if where == "driver":
            with contextlib.suppress(OSError), (full / "filler").open("wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        monkeypatch.setenv("FMFORGE_CATALOG", json.dumps(
            {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": full.as_uri()}))
        word, reason, msg = _run_pile(manifest)
    assert word == "Failed" and reason == "OutputUnwritable", msg
    _one_clean_line(msg)
    if where == "worker":
        # the file the task was writing, under the warehouse
        assert re.fullmatch(rf"no space left on device writing {re.escape(str(full))}/default/full_\w+/data/"
                            rf"fmforge-[-0-9a-f]+/000000\.parquet: free space or {WAREHOUSE_FIX}", msg), msg
    else:
        assert msg == f"no space left on device writing the pile's tables in {full}: free space or {WAREHOUSE_FIX}"


def test_a_read_only_warehouse_fails_in_one_line(tmp_path: Path, monkeypatch):
    manifest = _pile_dir(tmp_path / "w")
    with tiny_filesystem(tmp_path / "ro", "64k", readonly=True) as ro:
        monkeypatch.setenv("FMFORGE_CATALOG", json.dumps(
            {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": ro.as_uri()}))
        word, reason, msg = _run_pile(manifest)
    assert word == "Failed" and reason == "OutputUnwritable", msg
    _one_clean_line(msg)
    assert msg == f"read-only file system writing {ro}/default: remount it read-write or {WAREHOUSE_FIX}"


def test_a_refused_write_in_a_ray_task_comes_back_as_one_line(tmp_path: Path):
    """What no test run as root can make for real (a quota, a forbidden folder: root writes
    anywhere), raised in a Ray task: gather unwraps RayTaskError to its cause."""
    from fmforge.stages import raysession
    from fmforge.stages.base import OutputError
    from fmforge.stages.datapile import workers as wk

    def refuse(code: int, path: str | None):
        # defined here, so that Ray ships it by value (the workers cannot import a test module)
        raise OSError(code, os.strerror(code), path)

    cases = [
        (errno.EDQUOT, "/lake/piles/x.parquet",
         f"disk quota exceeded writing /lake/piles/x.parquet: free space within the quota or {WAREHOUSE_FIX}"),
        (errno.EACCES, "/lake/piles/x.parquet",
         f"permission denied writing /lake/piles/x.parquet: let user {os.geteuid()} write there or {WAREHOUSE_FIX}"),
        (errno.ENOSPC, None, f"no space left on device writing the pile's files: free space or {WAREHOUSE_FIX}"),
    ]
    raysession.start(tmp_path, 1)
    try:
        for code, path, message in cases:
            with pytest.raises(OutputError) as e:
                wk.gather([wk.remote(refuse).remote(code, path)])
            assert str(e.value) == message and e.value.reason == "OutputUnwritable"
    finally:
        raysession.shutdown()


def test_the_tokenizer_on_a_full_disk_is_an_oserror_naming_its_file(tmp_path: Path):
    """tokenizers (Rust) reports a full disk as a plain Exception; save_tokenizer makes it the
    OSError it is, which the stage then reports in one line like any other refused write."""
    from tokenizers import Tokenizer, models

    from fmforge.stages.datapile import tokenize as tk

    with tiny_filesystem(tmp_path / "full", "16k") as full:
        with contextlib.suppress(OSError), (full / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(OSError) as e:
            tk.save_tokenizer(Tokenizer(models.BPE()), full / "tok")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(full / "tok" / "tokenizer.json")


def test_a_refused_write_on_the_driver_names_the_fix_of_its_place(tmp_path: Path):
    """The warehouse's files: point the warehouse elsewhere; the state directory's (the
    tokenizer, the data card): another state directory."""
    from types import SimpleNamespace

    from fmforge.stages.datapile import Work, _refused_write

    state = tmp_path / ".fmforge"
    cat = SimpleNamespace(properties={"warehouse": f"file://{tmp_path}/lake"})
    w = Work(SimpleNamespace(state_dir=state), None, cat=cat)
    assert str(_refused_write(w, errno.ENOSPC, f"{tmp_path}/lake/default/t/metadata/x.json")) == \
        f"no space left on device writing {tmp_path}/lake/default/t/metadata/x.json: free space or {WAREHOUSE_FIX}"
    tok = f"{state}/artifacts/DataPile/p/abc/tokenizer/tokenizer.json"
    assert str(_refused_write(w, errno.ENOSPC, tok)) == \
        f"no space left on device writing {tok}: free space or use another state directory"
