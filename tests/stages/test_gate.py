"""The Deployment's governance gate, locally: the rule the operator applies, and the bytes served
are the bytes approved.

`approval_gate` is one pure function for the local stage and the reconciler: a card opens it only
when it is done for its generation, approved, and evaluated exactly the served digest. The old
local gate looked at `approved` and the digest alone, so a card that had failed since still let a
model through; and it served the model directory without checking its bytes, so a flipped byte in
the weights was served under the approved digest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tinymodel import tiny_gpt

from fmforge.api.status import with_phase
from fmforge.api.v1alpha1.modelcard import approval_gate
from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.artifacts import model_digest


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_gpt(tmp_path_factory.mktemp("gpt"))


def _records(state: StateDir, model_dir: Path, digest: str, phase: str = "Succeeded") -> None:
    state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun",
                 "metadata": {"name": "gpt", "generation": 1},
                 "spec": {}, "status": {"phase": "Succeeded", "model": {"uri": model_dir.as_uri(), "digest": digest}},
                 "fmforge": {"artifactDigest": digest}})
    status = with_phase({"approved": True, "approvedBy": "automatic", "modelDigest": digest}, phase,
                        "Approved" if phase == "Succeeded" else "StageFailed", "…", 1)
    state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard",
                 "metadata": {"name": "card", "generation": 1},
                 "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"}}, "status": status,
                 "fmforge": {"artifactDigest": "sha256:card"}})


def _deploy(d: Path) -> list:
    (d / "deploy.yaml").write_text(yaml.safe_dump({
        "apiVersion": "fmforge.io/v1alpha1", "kind": "Deployment", "metadata": {"name": "gpt"},
        "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"}, "kserve": {"port": 18080}}}))
    report = run_paths([d / "deploy.yaml"], console=RunConsole(rich=False))
    assert not report.errors, report.errors
    return report.outcomes


def test_the_gate_opens_only_for_a_ready_approved_card_of_the_digest():
    ok = {"metadata": {"generation": 2}, "status": with_phase({"approved": True, "modelDigest": "sha256:a"},
                                                              "Succeeded", "Approved", "", 2)}
    assert approval_gate("TrainingRun/gpt", "sha256:a", {"c": ok}).card == "c"
    assert approval_gate("TrainingRun/gpt", "sha256:b", {"c": ok}).card is None
    stale = {**ok, "metadata": {"generation": 3}}  # the card's spec changed: its status is of generation 2
    gate = approval_gate("TrainingRun/gpt", "sha256:a", {"c": stale})
    assert gate.card is None and "ModelCard/c is Succeeded" in gate.message
    failed = {"metadata": {"generation": 2}, "status": with_phase(ok["status"], "Failed", "StageFailed", "oom", 2)}
    gate = approval_gate("TrainingRun/gpt", "sha256:a", {"c": failed})
    assert gate.card is None and "ModelCard/c is Failed (oom)" in gate.message
    assert approval_gate("TrainingRun/gpt", "sha256:a", {}).reason == "WaitingForApprovedModelCard"


def test_a_card_that_failed_since_keeps_the_model_from_being_served(model: Path, tmp_path: Path):
    state = StateDir(tmp_path / ".fmforge")
    _records(state, model, model_digest(model), phase="Failed")
    assert [o.word for o in _deploy(tmp_path)] == ["Waiting"]
    st = state.read("Deployment", "gpt")["status"]
    assert "ModelCard/card is Failed" in st["message"]


def test_a_flipped_byte_in_the_weights_is_refused_before_serving(model: Path, tmp_path: Path):
    import shutil

    copy = shutil.copytree(model, tmp_path / "gpt")
    digest = model_digest(copy)
    state = StateDir(tmp_path / ".fmforge")
    _records(state, copy, digest)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    [outcome] = _deploy(tmp_path)
    assert outcome.word == "Failed" and "changed after it was made" in outcome.message and digest in outcome.message
    assert "servedModel" not in state.read("Deployment", "gpt")["status"]
