"""`fmforge validate`: every example is accepted; every bad manifest is rejected with its message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from badmanifests import BASE, CASES, Case
from paths import ROOT

from fmforge.api.manifests import load
from fmforge.cli import main

EXAMPLES = sorted({p.parent for p in (ROOT / "examples").rglob("*.yaml")})


def test_the_table_is_big_enough():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind", sorted(BASE))
def test_base_manifests_are_valid(tmp_path: Path, kind: str):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(BASE[kind]))
    r = load([p])
    assert r.errors == []
    assert [m.kind for m in r.manifests] == [kind]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_manifest_is_rejected(tmp_path: Path, case: Case, capsys):
    p = tmp_path / f"{case.id}.yaml"
    p.write_text(yaml.safe_dump(case.manifest(), sort_keys=False))
    r = load([p])
    assert r.manifests == []
    assert r.errors, "expected an error"
    fields = [e.field for e in r.errors]
    assert case.field in fields, f"errors name {fields}"
    err = next(e for e in r.errors if e.field == case.field)
    assert case.message in err.message
    assert err.path == str(p) and err.line is not None
    # and through the command line: exit 1, the error on stderr in file:line: object: field: message form
    assert main(["validate", str(p)]) == 1
    out = capsys.readouterr().err
    assert f"{p}:" in out and case.field in out and case.message in out


@pytest.mark.parametrize("directory", EXAMPLES, ids=lambda d: str(d.relative_to(ROOT)))
def test_examples_are_valid(directory: Path, capsys):
    assert main(["validate", str(directory)]) == 0
    assert "valid" in capsys.readouterr().out


def test_quickstart_has_the_five_kinds():
    r = load([ROOT / "examples" / "quickstart"])
    assert r.errors == []
    assert sorted(m.kind for m in r.manifests) == sorted(
        ["DataPile", "TrainingRun", "TunedModel", "ModelCard", "Deployment"]
    )


def test_error_points_at_the_line_of_the_field(tmp_path: Path):
    p = tmp_path / "m.yaml"
    p.write_text(
        "apiVersion: fmforge.io/v1alpha1\nkind: TrainingRun\nmetadata:\n  name: x\nspec:\n"
        "  dataPileRef: {name: pydocs}\n  training:\n    maxSteps: -5\n"
    )
    [e] = load([p]).errors
    assert (e.line, e.obj, e.field) == (8, "TrainingRun/x", "spec.training.maxSteps")
    assert str(e).startswith(f"{p}:8: TrainingRun/x: spec.training.maxSteps: must be greater than or equal to 1")


def test_invalid_yaml_and_missing_path(tmp_path: Path):
    p = tmp_path / "broken.yaml"
    p.write_text("apiVersion: [unclosed\n")
    r = load([p, tmp_path / "nope"])
    msgs = [str(e) for e in r.errors]
    assert any("not valid YAML" in m for m in msgs)
    assert any("no such file or directory" in m for m in msgs)


def test_other_api_groups_are_skipped(tmp_path: Path, capsys):
    p = tmp_path / "mixed.yaml"
    p.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                                     BASE["Deployment"]]))
    assert main(["validate", str(p)]) == 0
    err = capsys.readouterr().err
    assert "v1 ConfigMap" in err and "skipped" in err


def test_duplicate_objects_are_rejected(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text(yaml.safe_dump_all([BASE["Deployment"], BASE["Deployment"]]))
    [e] = load([p]).errors
    assert "duplicate object" in e.message
