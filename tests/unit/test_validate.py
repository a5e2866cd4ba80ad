"""`fmforge validate`: every example is accepted; every bad manifest is rejected with its message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from badmanifests import BASE, CASES, Case
from paths import ROOT

from fmforge.api.manifests import load
from fmforge.cli import main

# examples/gitops/applications holds Argo CD Applications only, no fmforge objects:
# tests/cluster/test_gitops.py checks them against Argo CD's CRD.
# Not manifests of fmforge's: Argo CD Applications, and the node's Kustomize overlay of the
# quickstart (a kustomization only; tests/cluster/test_gitops.py renders it and validates that).
EXAMPLES = sorted({p.parent for p in (ROOT / "examples").rglob("*.yaml")}
                  - {ROOT / "examples" / "gitops" / "applications", ROOT / "examples" / "quickstart" / "node"})


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


# -- hostile or sloppy YAML and metadata, refused before anything runs -------------------------------

_PILE_SPEC = "spec:\n  sources: [{name: docs, uri: 'file://corpus/'}]\n"


def _one(tmp_path: Path, text: str):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return load([p])


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path):
    import time

    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = ("apiVersion: fmforge.io/v1alpha1\nkind: DataPile\nmetadata:\n  name: bomb\n  annotations:\n"
            + "".join(f"    {line}\n" for line in levels) + _PILE_SPEC)
    started = time.monotonic()
    r = _one(tmp_path, text)
    assert time.monotonic() - started < 5
    assert r.manifests == [] and "refused as an alias bomb" in r.errors[0].message


def test_a_few_aliases_are_fine(tmp_path: Path):
    text = ("apiVersion: fmforge.io/v1alpha1\nkind: DataPile\nmetadata:\n  name: ok\n  labels: &l {team: ml}\n"
            "spec:\n  sources: [{name: docs, uri: 'file://corpus/'}]\n  publish: {tags: [v1]}\n")
    assert _one(tmp_path, text).errors == []


def test_a_recursive_alias_is_refused(tmp_path: Path):
    text = "apiVersion: fmforge.io/v1alpha1\nkind: DataPile\nmetadata: &m\n  name: x\n  self: *m\n" + _PILE_SPEC
    r = _one(tmp_path, text)
    assert r.manifests == [] and "recursive" in r.errors[0].message


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path):
    text = ("apiVersion: fmforge.io/v1alpha1\nkind: DataPile\nmetadata:\n  name: dup\n" + _PILE_SPEC
            + "  sources: [{name: other, uri: 'file://x/'}]\n")
    r = _one(tmp_path, text)
    assert r.manifests == []
    assert (r.errors[0].line, r.errors[0].message.split(";")[0]) == (7, "duplicate key 'sources'")
    assert "already defined at line 6" in r.errors[0].message


@pytest.mark.parametrize("meta, field, message", [
    ({"namespace": "../../x"}, "metadata.namespace", "is not a valid namespace"),
    ({"namespace": "Team.A B"}, "metadata.namespace", "is not a valid namespace"),
    ({"labels": {"Team A": "x"}}, "metadata.labels", "the name part must be at most 63 characters"),
    ({"labels": {"example.com/team_": "y"}}, "metadata.labels", "the name part"),
    ({"labels": {"UPPER.example.com/team": "y"}}, "metadata.labels", "the prefix before '/' must be a DNS subdomain"),
    ({"labels": {"team": 1}}, "metadata.labels", "value of 'team' must be a string (got int)"),
    ({"labels": {"team": "x" * 64}}, "metadata.labels", "value of 'team' must be at most 63 characters"),
    ({"annotations": {"note": "x" * (256 * 1024)}}, "metadata.annotations", "Kubernetes allows at most 262144 bytes"),
    ({"annotations": {"n": 5}}, "metadata.annotations", "value of 'n' must be a string"),
    ({"colour": "blue"}, "metadata.colour", "unknown field"),
    ({"generateName": "pile-"}, "metadata.generateName", "need a fixed metadata.name"),
])
def test_metadata_is_validated_as_kubernetes_does(tmp_path: Path, meta: dict, field: str, message: str):
    doc = {"apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "metadata": {"name": "p", **meta},
           "spec": BASE["DataPile"]["spec"]}
    r = _one(tmp_path, yaml.safe_dump(doc))
    assert r.manifests == []
    assert any(e.field == field and message in e.message for e in r.errors), r.errors


def test_valid_metadata_passes(tmp_path: Path):
    doc = {"apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile",
           "metadata": {"name": "p", "namespace": "team-a", "labels": {"app.kubernetes.io/part-of": "fmforge",
                                                                        "tier": ""},
                        "annotations": {"fmforge.io/approved-by": "alice@example.com", "note": "x" * 1000}},
           "spec": BASE["DataPile"]["spec"]}
    assert _one(tmp_path, yaml.safe_dump(doc)).errors == []


def test_an_object_larger_than_kubernetes_stores_is_refused(tmp_path: Path, monkeypatch):
    # The models bound every field, so no valid object reaches etcd's 1.5 MiB; the check is the
    # last guard if a field is ever left unbounded. Here the limit is lowered to exercise it.
    from fmforge.api import manifests

    monkeypatch.setattr(manifests, "MAX_OBJECT_BYTES", 2000)
    doc = copy.deepcopy(BASE["DataPile"])
    doc["metadata"]["annotations"] = {"note": "x" * 3000}
    r = _one(tmp_path, yaml.safe_dump(doc))
    assert r.manifests == [] and any("Kubernetes stores at most 2000 bytes" in e.message for e in r.errors)
