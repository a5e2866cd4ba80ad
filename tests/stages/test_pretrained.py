"""Starting from pretrained models, through the local runner: tuning in a chat template, and
continued pretraining.

The pretrained models are small and made here: a tiny llama trained on standard-library sources
and written as a GGUF file (tests/tinymodel.py: Q8_0 matrices, a byte-level BPE with the ChatML
tokens and template), and a tiny llama the TrainingRun stage trains from scratch on a small pile.

- TunedModel `data.format: chat` from the GGUF file: the held-out loss falls, the merged model
  reloads with the chat template, the base's digest is the file's; a base without a template is
  refused; the loss mask covers exactly the assistant's turn;
- TrainingRun `model.init`: continuing a trained model starts at its loss, not at a random
  model's; a GGUF model continues on a pile tokenized with its own tokenizer (DataPile
  `tokenizer.uri` naming the file); a pile of another vocabulary is refused before training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from localrun import Quiet, Workspace, path_of
from paths import ROOT
from piles import MINI
from tinymodel import tiny_gpt

from fmforge.stages.artifacts import TRAINING_LOG, model_digest

QA = ROOT / "examples" / "quickstart" / "tuning" / "qa.jsonl"
TINY = {"layers": 2, "hidden": 64, "heads": 4}
#: The pile with the GGUF model's tokenizer (its vocabulary, so that the model can continue on it).
GGUF_PILE = copy.deepcopy(MINI)
GGUF_PILE["metadata"]["name"] = "mini-gguf"
GGUF_PILE["spec"]["tokenizer"] = {"uri": "file://base.gguf"}


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def ready(record: dict) -> dict:
    return next(c for c in record["status"]["conditions"] if c["type"] == "Ready")


def chat_tuning(name: str, base: dict, **data) -> dict:
    return {"apiVersion": "fmforge.io/v1alpha1", "kind": "TunedModel", "metadata": {"name": name},
            "spec": {**base, "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                     "data": {"uri": "file://qa.jsonl", "promptTemplate": "{question}",
                              "completionTemplate": " {answer}", "format": "chat", "validationFraction": 0.2,
                              **data},
                     "training": {"epochs": 3, "learningRate": 1.0e-2, "microBatchSize": 8},
                     "resources": {"workers": 1}}}


def training_run(name: str, pile: str, init: dict | None = None, **training) -> dict:
    model = {"init": init} if init else {"config": TINY}
    return {"apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
            "spec": {"dataPileRef": {"name": pile, "tag": "v1"}, "model": model,
                     "training": {"maxSteps": 30, "globalBatchSize": 8, "microBatchSize": 8, "learningRate": 3.0e-3,
                                  "warmupSteps": 3, **training},
                     "resources": {"workers": 1, "cpusPerWorker": 1}}}


@pytest.fixture(scope="module")
def ws(corpus: Path, gguf_file: Path, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("pretrained")
    shutil.copytree(corpus, root / "corpus")
    shutil.copy(QA, root / "qa.jsonl")
    shutil.copy(gguf_file, root / "base.gguf")
    (root / "pile.yaml").write_text(yaml.safe_dump(MINI, sort_keys=False))
    (root / "pile-gguf.yaml").write_text(yaml.safe_dump(GGUF_PILE, sort_keys=False))
    return Workspace(root)


# -- tuning in a chat template ---------------------------------------------------------------------


def test_chat_lora_from_a_gguf_file_lowers_the_heldout_loss_and_reloads(ws: Workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outcome, rec = ws.run_one(chat_tuning("chat", {"baseModel": {"uri": "file://base.gguf"}}))
    assert outcome.word == "Succeeded", outcome.message
    st = rec["status"]
    assert st["base"] == {"uri": "file://base.gguf", "digest": sha256(ws.root / "base.gguf")}
    before, after = st["validation"]["before"]["loss"], st["validation"]["after"]["loss"]
    assert after < 0.9 * before, (before, after)
    model_dir = path_of(st["model"]["uri"])
    assert model_digest(model_dir) == st["model"]["digest"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert "<|im_start|>assistant" in tok.chat_template  # the template travels with the tuned model
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) == st["model"]["parameters"]
    log = json.loads((model_dir / TRAINING_LOG).read_text())
    assert log["base"] == st["base"]
    assert rec["fmforge"]["lineage"][0] == {"name": "baseModel", **st["base"]}


def test_chat_examples_score_exactly_the_assistant_turn(ws: Workspace):
    """The labels of a chat example: -100 under the template's user turn and the assistant's
    header, the answer's tokens and the end of turn after them; the completion template's
    leading space is not part of the answer."""
    from transformers import AutoTokenizer

    from fmforge.stages import models
    from fmforge.stages.base import StageContext
    from fmforge.stages.tune import data as examples

    ctx = StageContext(kind="TunedModel", name="t", namespace="default", generation=1, spec=None, inputs={},
                       base_dir=ws.root, artifacts=ws.root / "a", state_dir=ws.state.root, reporter=Quiet())
    tok = AutoTokenizer.from_pretrained(models.load(ctx, "file://base.gguf", "spec.baseModel.uri").path)
    rec = examples.Record({"question": "Which keyword defines a function?", "answer": "def"}, "qa.jsonl line 1", "k")
    [ex] = examples.encode_chat([rec], tok, "{question}", " {answer}", 128)
    scored = [i for i, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != -100]
    assert tok.decode(scored) == "def<|im_end|>"
    prompt = ex["input_ids"][:len(ex["input_ids"]) - len(scored)]
    assert tok.decode(prompt) == ("<|im_start|>user\nWhich keyword defines a function?<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert ex["labels"][-len(scored):] == scored


def test_chat_format_needs_a_base_with_a_chat_template(ws: Workspace):
    plain = tiny_gpt(ws.root / "plain", positions=128)
    outcome, rec = ws.run_one(chat_tuning("plain-chat", {"baseModel": {"uri": "file://plain"}}))
    assert outcome.word == "Failed" and ready(rec)["reason"] == "InvalidSpec", outcome.message
    assert rec["status"]["message"].startswith("spec.data.format: format chat needs a model with a chat template, "
                                               "and the tokenizer of file://plain has none")
    assert not (ws.state.artifacts_dir("TunedModel", "plain-chat") / "attempts").exists()
    assert plain.is_dir()


# -- continued pretraining -------------------------------------------------------------------------


def test_continued_pretraining_starts_at_the_base_models_loss(ws: Workspace):
    """A model trained from scratch, then continued on the same pile: the continuation's first
    loss is near the scratch model's validation loss (the base's perplexity on the pile), far
    below a random model's first loss."""
    ws.base = ("pile.yaml",)
    report = ws.run(training_run("scratch", "mini", maxSteps=40, learningRate=1.0e-2))
    assert report.ok, report.outcomes
    scratch = ws.record("TrainingRun", "scratch")["status"]
    report = ws.run(training_run("cont", "mini", init={"modelRef": {"kind": "TrainingRun", "name": "scratch"}},
                                 maxSteps=5, learningRate=1.0e-4, warmupSteps=0))
    assert report.ok, report.outcomes
    rec = ws.record("TrainingRun", "cont")
    cont = rec["status"]
    scratch_curve = json.loads((path_of(scratch["model"]["uri"]) / TRAINING_LOG).read_text())["lossCurve"]
    cont_log = json.loads((path_of(cont["model"]["uri"]) / TRAINING_LOG).read_text())
    first = cont_log["lossCurve"][0]["loss"]
    # (40 steps take the scratch model from 6.2, ln 512, to about 5.3)
    assert first < scratch_curve[0]["loss"] - 0.5, (first, scratch_curve[0]["loss"])
    assert abs(first - scratch_curve[-1]["loss"]) < 0.3, (first, scratch_curve[-1]["loss"])
    assert abs(first - scratch["validationLoss"]) < 0.5, (first, scratch["validationLoss"])
    assert cont["base"] == {"uri": scratch["model"]["uri"], "digest": scratch["model"]["digest"]}
    assert cont_log["base"] == {"digest": scratch["model"]["digest"], "ref": "TrainingRun/scratch"}
    assert cont["message"].startswith("continued TrainingRun/scratch: trained")
    assert cont["model"]["parameters"] == scratch["model"]["parameters"]


def test_a_gguf_model_continues_on_a_pile_of_its_own_tokenizer(ws: Workspace):
    """DataPile tokenizer.uri naming the GGUF file: the pile has the model's vocabulary, and the
    model continues on it; the model's tokenizer, chat template included, is saved with it."""
    from transformers import AutoTokenizer

    ws.base = ("pile-gguf.yaml",)
    report = ws.run(training_run("gguf-cont", "mini-gguf", init={"uri": "file://base.gguf"}, maxSteps=4))
    assert report.ok, report.outcomes
    st = ws.record("TrainingRun", "gguf-cont")["status"]
    assert st["base"] == {"uri": "file://base.gguf", "digest": sha256(ws.root / "base.gguf")}
    pile = ws.record("DataPile", "mini-gguf")["status"]
    assert "loaded from file://base.gguf" in path_of(pile["dataCard"]).read_text()
    # it started where the GGUF model is on this text, not at a random model's ln 512 = 6.24
    first = json.loads((path_of(st["model"]["uri"]) / TRAINING_LOG).read_text())["lossCurve"][0]["loss"]
    assert first < 5.7, first
    tok = AutoTokenizer.from_pretrained(path_of(st["model"]["uri"]))
    assert tok.chat_template and len(tok) == 512


def test_a_pile_of_another_vocabulary_is_refused_before_training(ws: Workspace):
    ws.base = ("pile.yaml",)
    report = ws.run(training_run("mismatch", "mini", init={"uri": "file://base.gguf"}))
    rec = ws.record("TrainingRun", "mismatch")
    assert ready(rec)["reason"] == "InvalidSpec", report.outcomes
    message = rec["status"]["message"]
    assert message.startswith("spec.dataPileRef: DataPile mini version ")
    assert "was tokenized with another vocabulary than the model of spec.model.init (file://base.gguf)" in message
    assert message.endswith("publish the pile with tokenizer.uri naming that model, then train on that version")
    assert not (ws.state.artifacts_dir("TrainingRun", "mismatch") / "attempts").exists()
