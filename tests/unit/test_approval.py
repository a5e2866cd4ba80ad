"""ModelCard approval: bound to the model digest, the same rule for the stage, the CLI and the operator."""

from __future__ import annotations

from pathlib import Path

from fmforge.api.status import with_phase
from fmforge.api.v1alpha1.modelcard import APPROVED_BY, APPROVED_DIGEST, decide_approval
from fmforge.cli import main
from fmforge.runtime.approval import approval_annotations
from fmforge.runtime.state import StateDir

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_automatic_approves_only_when_every_threshold_passes():
    assert decide_approval("ModelCard/x", "automatic", True, A, {}).by == "automatic"
    d = decide_approval("ModelCard/x", "automatic", False, A, {})
    assert not d.approved and not d.waiting


def test_manual_needs_an_approval_of_exactly_this_digest():
    d = decide_approval("ModelCard/x", "manual", True, A, {})
    assert not d.approved and "fmforge approve ModelCard/x" in d.waiting and A in d.waiting
    assert f"{APPROVED_DIGEST}={A}" in d.waiting
    ok = decide_approval("ModelCard/x", "manual", True, A, {APPROVED_BY: "alice", APPROVED_DIGEST: A})
    assert ok.approved and ok.by == "alice"
    stale = decide_approval("ModelCard/x", "manual", True, B, {APPROVED_BY: "alice", APPROVED_DIGEST: A})
    assert not stale.approved and "approval by alice was for " + A in stale.waiting
    # an approval without a digest approves nothing
    assert not decide_approval("ModelCard/x", "manual", True, A, {APPROVED_BY: "alice"}).approved
    # a model that misses a threshold is not approved, whoever says so
    assert not decide_approval("ModelCard/x", "manual", False, A, {APPROVED_BY: "a", APPROVED_DIGEST: A}).approved


def _card(state: StateDir, passed: bool) -> None:
    status = {"results": [{"name": "ppl", "metric": "perplexity", "value": 9.0, "passed": passed}],
              "modelDigest": A, "approved": False}
    rec = {"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard",
           "metadata": {"name": "x", "namespace": "default", "generation": 1},
           "spec": {"approval": "manual"}, "status": with_phase(status, "Waiting", "WaitingForApproval", "w", 1)}
    state.write(rec)


def test_fmforge_approve(tmp_path: Path, capsys):
    state = StateDir(tmp_path / ".fmforge")
    assert main(["approve", "ModelCard/x", "--by", "alice", "--state-dir", str(state.root)]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["approve", "TrainingRun/x", "--by", "alice", "--state-dir", str(state.root)]) == 2
    _card(state, passed=False)
    assert main(["approve", "ModelCard/x", "--by", "alice", "--state-dir", str(state.root)]) == 1
    assert "cannot be approved" in capsys.readouterr().err
    _card(state, passed=True)
    assert main(["approve", "mc/x", "--by", "alice", "--state-dir", str(state.root)]) == 0
    rec = state.read("ModelCard", "x")
    assert rec["status"]["phase"] == "Succeeded" and rec["status"]["approvedBy"] == "alice"
    assert approval_annotations(rec) == {APPROVED_BY: "alice", APPROVED_DIGEST: A}


def test_fmforge_approve_pins_the_reviewed_digest_and_refuses_a_model_that_moved_on(tmp_path: Path, capsys):
    state = StateDir(tmp_path / ".fmforge")
    _card(state, passed=True)
    args = ["approve", "ModelCard/x", "--by", "alice", "--state-dir", str(state.root)]
    assert main([*args, "--digest", B]) == 1
    err = capsys.readouterr().err
    assert f"evaluated model {A}, not the {B} you reviewed" in err and f"--digest {A}" in err
    assert state.read("ModelCard", "x")["status"]["phase"] == "Waiting"
    # the card's producer has made another model since the card evaluated A
    state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "gpt"},
                 "spec": {}, "status": {"phase": "Succeeded", "model": {"uri": "file:///m", "digest": B}}})
    rec = state.read("ModelCard", "x")
    rec["spec"]["modelRef"] = {"kind": "TrainingRun", "name": "gpt"}
    state.write(rec)
    assert main([*args, "--digest", A]) == 1
    assert f"TrainingRun/gpt has made {B} since" in capsys.readouterr().err
    state.write({**state.read("TrainingRun", "gpt"), "status": {"phase": "Succeeded", "model": {"digest": A}}})
    assert main([*args, "--digest", A]) == 0
    assert state.read("ModelCard", "x")["status"]["approvedBy"] == "alice"
