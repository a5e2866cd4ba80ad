"""The RayJob entrypoint (`python -m fmforge.runtime.job`) carries a stage's verdict.

The ModelCard stage runs for real, in the entrypoint's own process, from a plan shaped as the
operator writes it (`fmforge.kube.builders.plan`), on a tiny real model: a card that misses a
threshold ends with the verdict Rejected, a manual card with WaitingForApproval, each with exit
code 0 (the job did its work: the verdict is the result), and a bad input with exit code 2 and
the stage's own reason. On the old entrypoint the result had no verdict: a rejected card was a
plain success on a cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import tiny_gpt

from fmforge.stages.artifacts import model_digest


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_gpt(tmp_path_factory.mktemp("gpt"))


def _plan(tmp: Path, model: Path, threshold: dict, approval: str = "automatic", prompts: str | None = None,
          annotations: dict | None = None) -> Path:
    (tmp / "evals").mkdir(parents=True, exist_ok=True)
    (tmp / "evals" / "qa.jsonl").write_text(prompts if prompts is not None else "".join(
        json.dumps({"prompt": q, "expected": a}) + "\n" for q, a in (("def", "("), ("import", "os"))))
    plan = {
        "kind": "ModelCard", "name": "card", "namespace": "default", "generation": 3,
        "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"}, "approval": approval,
                 "benchmarks": [{"name": "qa", "type": "prompts", "uri": "file://evals/qa.jsonl", "metric": "contains",
                                 "maxNewTokens": 4, "threshold": threshold}]},
        "annotations": annotations or {},
        "inputs": {"TrainingRun/gpt": {"phase": "Succeeded",
                                       "model": {"uri": model.as_uri(), "digest": model_digest(model)}}},
        "artifacts": str(tmp / "artifacts"), "stateDir": str(tmp / "state"), "baseDir": str(tmp),
    }
    path = tmp / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def _entrypoint(plan: Path) -> tuple[int, dict]:
    result = plan.parent / "result.json"
    p = subprocess.run([sys.executable, "-m", "fmforge.runtime.job", "--plan", str(plan), "--result", str(result)],
                       capture_output=True, text=True, timeout=300)
    assert result.is_file(), p.stderr[-2000:]
    return p.returncode, json.loads(result.read_text())


def test_a_card_that_misses_its_threshold_is_rejected(tmp_path: Path, model: Path):
    code, out = _entrypoint(_plan(tmp_path, model, {"min": 1.5}))  # contains is at most 1: it cannot pass
    assert code == 0 and out["ok"] is True
    assert out["verdict"] == "Rejected" and "rejected: qa contains" in out["message"] and "(needs >= 1.5)" in \
        out["message"]
    assert out["status"]["approved"] is False and out["status"]["modelDigest"].startswith("sha256:")


def test_a_manual_card_waits_for_a_person_and_an_approval_of_its_digest_passes(tmp_path: Path, model: Path):
    code, out = _entrypoint(_plan(tmp_path / "a", model, {"min": 0.0}, approval="manual"))
    assert code == 0 and out["verdict"] == "WaitingForApproval"
    assert "kubectl annotate modelcard card fmforge.io/approved-by=NAME" in out["message"]
    digest = model_digest(model)
    code, out = _entrypoint(_plan(tmp_path / "b", model, {"min": 0.0}, approval="manual", annotations={
        "fmforge.io/approved-by": "ana", "fmforge.io/approved-digest": digest}))
    assert code == 0 and out["verdict"] == "Succeeded" and out["status"]["approvedBy"] == "ana"


def test_a_stage_that_refuses_its_input_exits_2_with_its_reason(tmp_path: Path, model: Path):
    code, out = _entrypoint(_plan(tmp_path, model, {"min": 0.0}, prompts="not json\n"))
    assert code == 2 and out["ok"] is False and out["reason"] in ("InvalidInput", "InvalidSpec")
    assert "qa.jsonl" in out["message"]
