"""The quickstart end to end: `examples/quickstart` run by the local runner through all five
kinds (pile → train → tune → card → deploy), then one request answered by the served model.

The manifests are the quickstart's own, with smaller settings so that the chain runs in minutes
on two cores: a cut-down corpus, a 1024-token BPE and 64-token sequences, a 2-layer model
trained for 40 steps, thresholds for that model (held-out perplexity below the uniform guess,
answers recorded but not required). Every status is checked, and the lineage from the endpoint
back to the sources' digests. Prints the seconds each stage took.
"""

from __future__ import annotations

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
    "TunedModel": {"training": {"epochs": 3, "learningRate": 1.0e-2, "microBatchSize": 8}},
}


def quickstart_port(root: Path) -> int:
    return yaml.safe_load((root / "deployment.yaml").read_text())["spec"]["kserve"]["port"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(ROOT / "examples" / "quickstart", root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".fmforge", "corpus"))
    subprocess.run([sys.executable, str(root / "build-corpus.py"), "--out", str(root / "corpus"), "--max-files", "70"],
                   check=True, capture_output=True)
    port = free_port()
    for f in root.glob("*.yaml"):
        m = yaml.safe_load(f.read_text())
        for key, value in SMALL.get(m["kind"], {}).items():
            m["spec"][key] = value
        if m["kind"] == "ModelCard":
            m["spec"]["benchmarks"][0]["threshold"] = {"max": 1024}  # below a uniform guess over the vocabulary
            m["spec"]["benchmarks"][0]["maxSamples"] = 64
            m["spec"]["benchmarks"][1]["threshold"] = {"min": 0.0}
        if m["kind"] == "Deployment":
            m["spec"]["kserve"]["port"] = port
        f.write_text(yaml.safe_dump(m, sort_keys=False))
    return root


def test_the_chain_from_sources_to_an_answer(quickstart: Path, capsys):
    report = run_paths([quickstart], console=RunConsole(rich=False))
    assert report.ok, (report.errors, report.outcomes)
    took = {o.key: round(o.seconds, 1) for o in report.outcomes}
    assert [o.key.split("/")[0] for o in report.outcomes] == ["DataPile", "TrainingRun", "TunedModel", "ModelCard",
                                                               "Deployment"]
    state = StateDir(quickstart / ".fmforge")
    pile, run, tuned, card, dep = (state.read(*k.split("/")) ["status"] for k in
                                   ("DataPile/pydocs", "TrainingRun/pydocs-gpt", "TunedModel/pydocs-qa",
                                    "ModelCard/pydocs-qa", "Deployment/pydocs-qa"))
    # each link names exactly what it used
    assert run["dataPile"]["snapshotId"] == pile["version"]["snapshotId"] and run["dataPile"]["tag"] == "v1"
    assert tuned["base"]["digest"] == run["model"]["digest"] and tuned["base"]["uri"] == run["model"]["uri"]
    assert tuned["validation"]["after"]["loss"] < tuned["validation"]["before"]["loss"]
    assert card["approved"] is True and card["modelDigest"] == tuned["model"]["digest"]
    assert dep["servedModel"] == {"uri": tuned["model"]["uri"], "digest": tuned["model"]["digest"],
                                  "modelCard": "pydocs-qa"}
    model_dir = Path(tuned["model"]["uri"].removeprefix("file://"))
    assert model_digest(model_dir) == tuned["model"]["digest"]
    # the lineage printed from the endpoint back to the sources and their content digests
    capsys.readouterr()
    assert fmforge(["lineage", "Deployment/pydocs-qa", "--state-dir", str(state.root)]) == 0
    lineage = capsys.readouterr().out
    for needle in ("TunedModel/pydocs-qa", "TrainingRun/pydocs-gpt", f"snapshot {pile['version']['snapshotId']}",
                   "source python-docs", "source tuningData", tuned["data"]["digest"]):
        assert needle in lineage, lineage
    # one request answered by the served model, over HTTP (on a new port: the stage's server
    # has just left its own, which the kernel may still hold for a while)
    assert dep["url"] == f"http://127.0.0.1:{quickstart_port(quickstart)}"
    port = free_port()
    proc = start_server("pydocs-qa", model_dir, port, quickstart / "server.log")
    try:
        body = json.dumps({"model": "pydocs-qa", "prompt": "Question: Which keyword defines a function?\nAnswer:",
                           "max_tokens": 8}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/openai/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        stop_server(proc)
    assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] >= 1
    print(json.dumps({"secondsByStage": took}))
