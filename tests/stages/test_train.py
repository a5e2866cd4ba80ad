"""The TrainingRun and ModelCard stages for real: Ray Train (TorchTrainer, DDP over two CPU
workers), transformers models trained from scratch on a small pile read from Iceberg, worker
processes killed mid-run, cards rendered and approved.

One small pile (Python's docs and sources, no filters, a 512-token BPE, 64-token sequences) is
published once for the module; the runs are tiny (2 layers, 64 hidden, tens of steps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from faults import worker_killed_after_checkpoint
from localrun import Workspace
from paths import ROOT
from piles import MINI

from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.stages.artifacts import TRAINING_LOG, model_digest
from fmforge.stages.datapile import publish as pub
from fmforge.stages.raytrain import RUN_RECORD, latest_checkpoint

PILE = MINI
TINY = {"layers": 2, "hidden": 64, "heads": 4}


def training_run(name: str, family: str = "llama", workers: int = 2, **training) -> dict:
    arch = "encoder" if family == "bert" else "decoder"
    return {
        "apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
        "spec": {"dataPileRef": {"name": "mini", "tag": "v1"},
                 "model": {"architecture": arch, "family": family, "config": TINY},
                 "training": {"maxSteps": 30, "globalBatchSize": 16, "microBatchSize": 4, "learningRate": 3.0e-3,
                              "warmupSteps": 3, **training},
                 "resources": {"workers": workers, "cpusPerWorker": 1}},
    }


def model_card(name: str, model: str, benchmarks: list[dict], approval: str = "automatic") -> dict:
    return {"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard", "metadata": {"name": name},
            "spec": {"modelRef": {"kind": "TrainingRun", "name": model}, "benchmarks": benchmarks,
                     "card": {"description": "A test model.", "license": "apache-2.0", "owners": ["tests"]},
                     "approval": approval}}


PERPLEXITY = {"name": "heldout", "type": "perplexity", "dataPileRef": {"name": "mini", "tag": "v1"},
              "maxSamples": 48, "threshold": {"max": 400}}


@pytest.fixture(scope="module")
def ws(corpus: Path, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("train")
    shutil.copytree(corpus, root / "corpus")  # file:// URIs may not leave the manifest folder
    (root / "pile.yaml").write_text(yaml.safe_dump(PILE, sort_keys=False))
    w = Workspace(root, base=("pile.yaml",))
    report = w.run()
    assert report.ok, report.outcomes
    return w


def outcome(report, key: str):
    return next(o for o in report.outcomes if o.key == key)


def ready(record: dict) -> dict:
    return next(c for c in record["status"]["conditions"] if c["type"] == "Ready")


def model_dir(record: dict) -> Path:
    return Path(record["status"]["model"]["uri"].removeprefix("file://"))


@pytest.fixture(scope="module")
def decoder(ws: Workspace) -> dict:
    report = ws.run(training_run("dec", checkpointEvery=10))
    assert outcome(report, "TrainingRun/dec").word == "Succeeded", report.outcomes
    return ws.record("TrainingRun", "dec")


def test_decoder_learns_and_reloads(ws: Workspace, decoder: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = decoder["status"]
    curve = json.loads((model_dir(decoder) / TRAINING_LOG).read_text())["lossCurve"]
    assert [p["step"] for p in curve] == list(range(1, 31))
    first, last = curve[0]["loss"], sum(p["loss"] for p in curve[-5:]) / 5
    assert last < first - 0.5, f"loss fell from {first:.3f} to only {last:.3f}"
    assert st["progress"]["step"] == 30 and st["progress"]["loss"] == pytest.approx(curve[-1]["loss"])
    # fp32 on CPUs, and said so
    assert st["precision"] == "fp32" and "fp32" in decoder["status"]["message"]
    # lineage: the snapshot trained on, not just the tag
    pile = ws.record("DataPile", "mini")["status"]
    assert st["dataPile"]["snapshotId"] == pile["version"]["snapshotId"] and st["dataPile"]["tag"] == "v1"
    assert st["dataPile"]["digest"] == pile["version"]["digest"]
    assert st["model"]["generation"] == 1 and st["model"]["specDigest"].startswith("sha256:")
    assert 0 < st["validationLoss"] < first
    # a Hugging Face model directory any transformers user can load, with the digest recorded
    d = model_dir(decoder)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (d / f).is_file(), f
    assert model_digest(d) == st["model"]["digest"] and d.name == st["model"]["digest"][7:23]
    model = AutoModelForCausalLM.from_pretrained(d)
    assert sum(p.numel() for p in model.parameters()) == st["model"]["parameters"]
    assert model.config._attn_implementation == "sdpa"
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok("def main(", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8


def test_card_passes_and_fails_thresholds(ws: Workspace, decoder: dict, tmp_path: Path):
    (ws.root / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "def main(", "expected": ""}, {"prompt": "import os\n", "expected": ""}]) + "\n")
    prompts = {"name": "qa", "type": "prompts", "uri": "file://qa.jsonl", "metric": "contains", "maxNewTokens": 4,
               "threshold": {"min": 1.0}}
    # the whole validation split (no maxSamples): the same sequences the training run's
    # validation loss is measured on, so the two must agree closely
    whole = {k: v for k, v in PERPLEXITY.items() if k != "maxSamples"}
    good = model_card("dec-good", "dec", [whole, prompts])
    bad = model_card("dec-bad", "dec", [dict(PERPLEXITY, threshold={"max": 1.5})])
    report = ws.run(good, bad)
    assert outcome(report, "ModelCard/dec-good").word == "Succeeded", report.outcomes
    assert outcome(report, "ModelCard/dec-bad").word == "Failed"

    st = ws.record("ModelCard", "dec-good")["status"]
    assert st["approved"] is True and st["approvedBy"] == "automatic"
    assert st["modelDigest"] == decoder["status"]["model"]["digest"]
    ppl = next(r for r in st["results"] if r["name"] == "heldout")
    seqs = pub.read_version(pub.catalog(ws.state.root), "default", "mini", "v1", which="sequences")
    validation = sum(1 for s in seqs.column("split").to_pylist() if s == "validation")
    assert ppl["passed"] and 1.0 < ppl["value"] < 400 and ppl["samples"] == validation
    # the same model on the same sequences: the training run's own validation loss
    assert abs(ppl["value"] - math.exp(decoder["status"]["validationLoss"])) / ppl["value"] < 0.02
    assert next(r for r in st["results"] if r["name"] == "qa")["value"] == 1.0  # "" is in every answer

    rec = ws.record("ModelCard", "dec-bad")
    assert ready(rec)["reason"] == "Rejected" and "heldout" in ready(rec)["message"]
    assert rec["status"]["approved"] is False and rec["status"]["results"][0]["passed"] is False

    # the card: YAML front matter whose model-index matches the status, JSON, loss curve PNG
    md = Path(st["card"]["uri"].removeprefix("file://"))
    text = md.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["datasets"] == ["mini"]
    metrics = {m["name"]: m["value"] for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {r["name"]: r["value"] for r in st["results"]}
    for section in ("## Intended use", "## Limitations", "## Training data", "## Training procedure",
                    "## Evaluation results", "![Training loss](loss_curve.png)"):
        assert section in text
    assert ws.record("DataPile", "mini")["status"]["dataCard"] in text
    assert (md.parent / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = json.loads((md.parent / "card.json").read_text())
    assert card["results"][0]["value"] == st["results"][0]["value"]


def test_manual_approval_is_bound_to_the_model_digest(ws: Workspace):
    from fmforge.cli import main

    run = training_run("appr", family="gpt2", workers=1, maxSteps=3, globalBatchSize=4)
    card = model_card("appr", "appr", [dict(PERPLEXITY, maxSamples=8, threshold={"max": 10000})], approval="manual")
    report = ws.run(run, card)
    assert outcome(report, "ModelCard/appr").word == "Waiting", report.outcomes
    rec = ws.record("ModelCard", "appr")
    first = rec["status"]["modelDigest"]
    assert rec["status"]["phase"] == "Waiting" and ready(rec)["reason"] == "WaitingForApproval"
    assert "fmforge approve ModelCard/appr" in rec["status"]["message"] and first in rec["status"]["message"]
    assert rec["status"]["approved"] is False

    # a second run neither re-evaluates nor approves: it still waits
    assert outcome(ws.run(run, card), "ModelCard/appr").word == "Waiting"
    assert main(["approve", "ModelCard/appr", "--by", "alice", "--state-dir", str(ws.state.root)]) == 0
    rec = ws.record("ModelCard", "appr")
    assert rec["status"]["phase"] == "Succeeded" and rec["status"]["approved"] is True
    assert rec["status"]["approvedBy"] == "alice"
    # the card a reviewer reads says so too
    first_card = Path(rec["status"]["card"]["uri"].removeprefix("file://"))
    assert "approved by alice" in first_card.read_text()
    assert json.loads((first_card.parent / "card.json").read_text())["approval"]["by"] == "alice"
    assert outcome(ws.run(run, card), "ModelCard/appr").word == "Skipped"

    # a new model (the run's spec changed) needs a new approval
    report = ws.run(dict(run, spec={**run["spec"], "training": {**run["spec"]["training"], "maxSteps": 4}}), card)
    assert outcome(report, "TrainingRun/appr").word == "Succeeded"
    assert outcome(report, "ModelCard/appr").word == "Waiting"
    rec = ws.record("ModelCard", "appr")
    assert rec["status"]["modelDigest"] != first and rec["status"]["approved"] is False
    assert "approval by alice was for " + first in rec["status"]["message"]
    # both evaluations are kept: the new card lists the first as history
    md = Path(rec["status"]["card"]["uri"].removeprefix("file://"))
    history = json.loads((md.parent / "card.json").read_text())["history"]
    assert [h["modelDigest"] for h in history] == [first]
    assert Path(history[0]["card"].removeprefix("file://"), "card.json").is_file()


def test_encoder_learns_and_predicts_masked_tokens(ws: Workspace):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run = training_run("enc", family="bert", workers=1, maxSteps=30, learningRate=2.0e-3, maskProbability=0.15)
    card = model_card("enc", "enc", [
        {"name": "masked", "type": "maskedTokens", "dataPileRef": {"name": "mini", "tag": "v1"}, "maxSamples": 48,
         "threshold": {"min": 0.05}},
        dict(PERPLEXITY, threshold={"max": 400})])
    report = ws.run(run, card)
    assert outcome(report, "TrainingRun/enc").word == "Succeeded", report.outcomes
    assert outcome(report, "ModelCard/enc").word == "Succeeded", report.outcomes
    rec = ws.record("TrainingRun", "enc")
    curve = json.loads((model_dir(rec) / TRAINING_LOG).read_text())["lossCurve"]
    first, last = curve[0]["loss"], sum(p["loss"] for p in curve[-5:]) / 5
    assert last < first - 0.5, f"masked-LM loss fell from {first:.3f} to only {last:.3f}"
    model = AutoModelForMaskedLM.from_pretrained(model_dir(rec))
    tok = AutoTokenizer.from_pretrained(model_dir(rec))
    assert tok.mask_token == "<|mask|>" and model.config.vocab_size == len(tok)
    enc = tok(f"import {tok.mask_token}", return_tensors="pt")
    logits = model(**enc).logits
    assert logits.shape[-1] == len(tok)
    acc = next(r for r in ws.record("ModelCard", "enc")["status"]["results"] if r["name"] == "masked")
    assert acc["metric"] == "accuracy" and 0.05 <= acc["value"] <= 1.0 and acc["passed"]


def _run_killing(ws: Workspace, manifest: dict, step: int):
    """Run `manifest`, its rank-0 worker killed right after it reported its checkpoint of `step`;
    the report, the killed pids, and the run's checkpoint folder."""
    root = ws.state.root / "artifacts" / "TrainingRun" / manifest["metadata"]["name"]
    before = set(root.rglob("checkpoint-*"))
    with worker_killed_after_checkpoint(step) as killed:
        report = ws.run(manifest)
    new = [p for p in root.rglob(f"checkpoint-{step:08d}") if p not in before]
    return report, killed, new[0].parent.parent if new else None


def run_record(checkpoints: Path) -> dict:
    """The attempt's record of its last run (times, restarts, resumption): beside its checkpoints."""
    return json.loads((checkpoints.parent / RUN_RECORD).read_text())


def test_killed_run_keeps_the_previous_model_and_resumes(ws: Workspace, decoder: dict):
    run = training_run("dec", maxSteps=16, checkpointEvery=4)
    run["spec"]["faultTolerance"] = {"maxFailures": 0}
    report, killed, checkpoints = _run_killing(ws, run, step=8)
    assert killed, "no Ray Train worker reached the checkpoint to be killed after"
    assert outcome(report, "TrainingRun/dec").word == "Failed"
    rec = ws.record("TrainingRun", "dec")
    # the previous model stays in the status, intact and loadable
    assert rec["status"]["model"] == decoder["status"]["model"]
    assert model_digest(model_dir(rec)) == decoder["status"]["model"]["digest"]
    assert "resumes from the last checkpoint" in rec["status"]["message"]
    assert "maxFailures (0)" in rec["status"]["message"]
    # killed right after its checkpoint of step 8 was whole in storage: that is the last one
    assert latest_checkpoint(checkpoints / "train").name == "checkpoint-00000008"

    # started again, with more failures allowed (what a user would change): the same training
    # resumes from its last checkpoint, not from step 0
    run["spec"]["faultTolerance"] = {"maxFailures": 2}
    report = ws.run(run)
    assert outcome(report, "TrainingRun/dec").word == "Succeeded", report.outcomes
    rec = ws.record("TrainingRun", "dec")
    assert rec["metadata"]["generation"] == 3
    assert rec["status"]["progress"]["resumedFromStep"] == 8
    assert rec["status"]["model"]["digest"] != decoder["status"]["model"]["digest"]
    final = torch.load(checkpoints / "train" / "checkpoint-00000016" / "state.pt", weights_only=True)
    assert final["step"] == 16
    # AdamW counted every step: its state came back from the checkpoint with the model
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {16}
    curve = json.loads((model_dir(rec) / TRAINING_LOG).read_text())["lossCurve"]
    assert [p["step"] for p in curve] == list(range(1, 17))
    assert run_record(checkpoints)["resumedFromStep"] == 8


def test_worker_killed_mid_run_recovers_within_max_failures(ws: Workspace):
    run = training_run("ft", maxSteps=12, checkpointEvery=4)
    run["spec"]["faultTolerance"] = {"maxFailures": 1}
    report, killed, checkpoints = _run_killing(ws, run, step=4)
    assert killed
    assert outcome(report, "TrainingRun/ft").word == "Succeeded", report.outcomes
    st = ws.record("TrainingRun", "ft")["status"]
    assert st["progress"]["step"] == 12 and st["progress"]["resumedFromStep"] == 4
    assert run_record(checkpoints)["restarts"] == 1
    curve = json.loads((model_dir(ws.record("TrainingRun", "ft")) / TRAINING_LOG).read_text())["lossCurve"]
    assert [p["step"] for p in curve] == list(range(1, 13))


def test_the_same_training_twice_makes_the_same_model(ws: Workspace):
    """Two runs of one TrainingRun on one pile version, each from step 0 (the first one's
    checkpoints removed): the same model, byte for byte, so the same digest; nothing in the
    model directory records times, paths or restarts."""
    run = training_run("twice", maxSteps=6, checkpointEvery=3)
    assert outcome(ws.run(run), "TrainingRun/twice").word == "Succeeded"
    first = ws.record("TrainingRun", "twice")["status"]
    shutil.rmtree(ws.state.root / "artifacts" / "TrainingRun" / "twice" / "attempts")
    report = run_paths([ws.put(run)], state_dir=ws.state.root, console=RunConsole(rich=False), force=True)
    assert outcome(report, "TrainingRun/twice").word == "Succeeded", report.outcomes
    second = ws.record("TrainingRun", "twice")["status"]
    assert "resumedFromStep" not in second["progress"]  # trained again from step 0
    assert second["model"]["digest"] == first["model"]["digest"]
    # no times, no restart count, no path but the pile version's data card (as its record says)
    log = (model_dir({"status": second}) / TRAINING_LOG).read_text()
    assert "unixTime" not in log and '"seconds"' not in log and '"restarts"' not in log
    assert str(ws.root) not in log.replace(second["dataPile"].get("dataCard", ""), "")


@pytest.mark.parametrize("change, field, words", [
    ({"dataPileRef": {"name": "mini", "tag": "v9"}}, "InvalidSpec", ["no version tagged 'v9'", "v1"]),
    ({"model": {"family": "llama", "config": {"layers": 2, "hidden": 36, "heads": 4}}}, "InvalidSpec",
     ["even head size"]),
    ({"model": {"family": "gpt2", "config": {"layers": 2, "hidden": 64, "heads": 4, "contextLength": 32}}},
     "InvalidSpec", ["contextLength", "64"]),
    ({"training": {"maxSteps": 5, "globalBatchSize": 12, "microBatchSize": 4}}, "InvalidSpec",
     ["multiple of microBatchSize x workers"]),
])
def test_bad_training_input_fails_before_training(ws: Workspace, change, field, words):
    run = training_run("bad")
    run["spec"].update(change)
    started = time.monotonic()
    report = ws.run(run)
    rec = ws.record("TrainingRun", "bad")
    assert outcome(report, "TrainingRun/bad").word == "Failed"
    assert ready(rec)["reason"] == field
    for w in words:
        assert w in ready(rec)["message"]
    assert not list((ws.state.root / "artifacts" / "TrainingRun" / "bad").rglob("checkpoint-*")), \
        "no training may start"
    assert time.monotonic() - started < 60


def test_broken_prompts_file_is_refused(ws: Workspace, decoder: dict):
    (ws.root / "broken.jsonl").write_text('{"prompt": "a", "expected": "b"}\n{"prompt": "c", expected: "d"}\n')
    card = model_card("broken", "dec", [{"name": "qa", "type": "prompts", "uri": "file://broken.jsonl",
                                         "threshold": {"min": 0.5}}])
    report = ws.run(card)
    assert outcome(report, "ModelCard/broken").word == "Failed"
    msg = ready(ws.record("ModelCard", "broken"))["message"]
    assert "broken.jsonl line 2: not valid JSON" in msg and '"expected"' in msg


def test_rayjob_entrypoint_runs_both_stages(ws: Workspace, tmp_path: Path):
    """`python -m fmforge.runtime.job --plan` runs the same stages, from plan files."""
    pile = ws.record("DataPile", "mini")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator" / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    train = training_run("job", family="gpt2", workers=1, maxSteps=3, globalBatchSize=4)
    plan = {"kind": "TrainingRun", "name": "job", "namespace": "default", "generation": 1, "spec": train["spec"],
            "inputs": {"DataPile/mini": pile}, "artifacts": str(tmp_path / "train"),
            "stateDir": str(ws.state.root), "baseDir": str(ws.root)}
    (tmp_path / "train.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-m", "fmforge.runtime.job", "--plan", str(tmp_path / "train.json"),
                        "--result", str(tmp_path / "train-result.json")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "train-result.json").read_text())
    assert result["ok"] and result["status"]["dataPile"]["snapshotId"] == pile["status"]["version"]["snapshotId"]
    assert result["digest"] == result["status"]["model"]["digest"]

    card = model_card("job", "job", [dict(PERPLEXITY, maxSamples=8, threshold={"max": 10000})])
    plan = {"kind": "ModelCard", "name": "job", "namespace": "default", "generation": 1, "spec": card["spec"],
            "inputs": {"TrainingRun/job": {"status": result["status"]}, "DataPile/mini": pile},
            "artifacts": str(tmp_path / "card"), "stateDir": str(ws.state.root), "baseDir": str(ws.root)}
    (tmp_path / "card.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-m", "fmforge.runtime.job", "--plan", str(tmp_path / "card.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ok"] and out["status"]["approved"] is True
    assert out["status"]["modelDigest"] == result["status"]["model"]["digest"]
