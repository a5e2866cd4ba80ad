"""docs/api.md against the CRDs in crds/: every field documented, defaults and rules as the API has them.

docs/api.md has a level-2 section per kind (`## DataPile`, …) and sections shared by every kind
(any other level-2 heading). Inside them, a heading that names a field path in backticks
(`### \\`spec.dedup.fuzzy\\``, or several: `### \\`status.model\\`, \\`status.adapter\\``) is followed
by a table whose first column names the fields under that path (`| \\`numPerm\\` | …`), and whose
third column is the default. A CRD field `spec.dedup.fuzzy.numPerm` is documented when a table under
a heading naming `spec.dedup.fuzzy` has a row for `numPerm`, in the kind's section or in a shared
one. List items are written with `[]`: the fields of `spec.sources` items are under `spec.sources[]`.

The CRDs are generated from the models (tests/unit/test_crds.py checks that), so these tests fail
when a field is added to a model without a word in docs/api.md, and when docs/api.md keeps a field
the API no longer has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from paths import ROOT

from fmforge.api.v1alpha1 import KINDS

API_MD = ROOT / "docs" / "api.md"
DESIGN_MD = ROOT / "docs" / "design.md"
QUICKSTART = ROOT / "examples" / "quickstart"
SECTIONS = ("spec", "status")


# -- the CRDs ------------------------------------------------------------------------------------


def _crds() -> dict[str, dict[str, Any]]:
    """kind → its CRD's openAPIV3Schema, from every file in crds/."""
    out = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


CRDS = _crds()


def _fields(node: dict[str, Any], path: str) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """(parent path, field name, schema, required) of every field under `node`, depth first."""
    required = set(node.get("required") or [])
    for name, sub in (node.get("properties") or {}).items():
        yield path, name, sub, name in required
        yield from _fields(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _fields(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _fields(node["additionalProperties"], f"{path}{{}}")


def crd_fields(kind: str) -> list[tuple[str, str, dict[str, Any], bool]]:
    schema = CRDS[kind]["properties"]
    return [f for section in SECTIONS for f in _fields(schema[section], section)]


def _rules(node: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """(path, message) of every CEL rule under `node`."""
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, rule["message"]
    for name, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _rules(node["items"], f"{path}[]")


# -- docs/api.md -----------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{2,6})\s+(.*?)\s*$")
_PATH = re.compile(r"`((?:spec|status)(?:[.\[][^`\s]*)?)`")
_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented() -> dict[str | None, dict[str, dict[str, list[list[str]]]]]:
    """section (a kind, or None for the shared sections) → parent path → field name → its rows' cells."""
    out: dict[str | None, dict[str, dict[str, list[list[str]]]]] = {}
    section: str | None = None
    paths: list[str] = []
    for line in API_MD.read_text().splitlines():
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2)
            if level == 2:
                section = title if title in KINDS else None
                paths = []
            else:
                paths = _PATH.findall(title)
            continue
        row = _ROW.match(line)
        if row and paths:
            for p in paths:
                out.setdefault(section, {}).setdefault(p, {}).setdefault(row.group(1), []).append(_cells(line))
    return out


DOCS = documented()


def rows_for(kind: str, parent: str, name: str) -> list[list[str]]:
    """The table rows documenting field `name` under `parent` for `kind` (its section, then the shared)."""
    rows: list[list[str]] = []
    for section in (kind, None):
        rows += DOCS.get(section, {}).get(parent, {}).get(name, [])
    return rows


def _default_of(cell: str) -> Any:
    """The value a Default cell stands for: `8192`, `"{prompt}"`, `[]` (backticks around YAML)."""
    m = re.fullmatch(r"`(.*)`", cell)
    if m is None:
        raise ValueError(f"not a backticked value: {cell!r}")
    return yaml.safe_load(m.group(1))


# -- the tests -------------------------------------------------------------------------------------


def test_crds_found():
    assert set(CRDS) == set(KINDS), f"crds/ has {sorted(CRDS)}; the API has {sorted(KINDS)}"


def test_every_crd_field_is_in_api_md():
    missing = [f"{kind}: {parent}.{name}"
               for kind in sorted(CRDS)
               for parent, name, _, _ in crd_fields(kind)
               if not rows_for(kind, parent, name)]
    assert not missing, (
        f"{len(missing)} CRD field(s) not documented in docs/api.md (add a row `| \\`NAME\\` | type | default | "
        f"meaning |` under a heading naming the parent path):\n  " + "\n  ".join(missing))


def test_api_md_documents_no_field_the_crds_lack():
    real = {kind: {(p, n) for p, n, _, _ in crd_fields(kind)} for kind in CRDS}
    anywhere = set().union(*real.values())
    stale = []
    for section, parents in DOCS.items():
        for parent, names in parents.items():
            for name in names:
                known = anywhere if section is None else real[section]
                if (parent, name) not in known:
                    stale.append(f"{section or 'shared'}: {parent}.{name}")
    assert not stale, "docs/api.md documents fields the CRDs do not have:\n  " + "\n  ".join(sorted(stale))


def test_defaults_and_required_fields_match_the_crds():
    wrong = []
    for kind in sorted(CRDS):
        for parent, name, schema, required in crd_fields(kind):
            rows = rows_for(kind, parent, name)
            if not rows or len(rows[0]) < 3:
                continue  # reported by the tests above, or not a Field | Type | Default table
            cells = [r[2] for r in rows]
            if required and parent.startswith("spec"):
                if not any(c == "required" for c in cells):
                    wrong.append(f"{kind}: {parent}.{name} is required, docs say {cells}")
            elif "default" in schema:
                want = schema["default"]
                got = []
                for c in cells:
                    try:
                        got.append(_default_of(c))
                    except (ValueError, yaml.YAMLError):
                        got.append(c)
                if want not in got:
                    wrong.append(f"{kind}: {parent}.{name} defaults to {want!r}, docs say {cells}")
    assert not wrong, "docs/api.md disagrees with the CRDs:\n  " + "\n  ".join(wrong)


def test_every_spec_rule_is_quoted():
    text = API_MD.read_text()
    missing = sorted({f"{kind}: {path}: {msg}"
                      for kind in sorted(CRDS)
                      for path, msg in _rules(CRDS[kind]["properties"]["spec"], "spec")
                      if msg not in text})
    assert not missing, "rules of the CRDs whose message docs/api.md does not quote:\n  " + "\n  ".join(missing)


def _examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", API_MD.read_text(), flags=re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    return [d for d in docs if str(d.get("apiVersion", "")).startswith("fmforge.io/")]


def _quickstart() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(QUICKSTART.glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_each_kind_has_an_example_taken_from_the_quickstart():
    examples = _examples()
    assert sorted(e["kind"] for e in examples) == sorted(KINDS), "one example manifest per kind"
    quickstart = _quickstart()
    for e in examples:
        key = (e["kind"], e["metadata"]["name"])
        assert key in quickstart, f"the example {key} is not in examples/quickstart"
        assert e == quickstart[key], f"the example {key} differs from examples/quickstart: copy it again"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_examples_are_valid(kind):
    for e in _examples():
        if e["kind"] == kind:
            KINDS[kind].spec.model_validate(e["spec"])


def test_design_md_names_what_exists():
    """The modules and files design.md names by path exist (operator/src/fmforge/... or the repo)."""
    text = DESIGN_MD.read_text()
    pkg = ROOT / "operator" / "src" / "fmforge"
    named = set(re.findall(r"`((?:[a-z0-9_]+/)+[a-z0-9_]+\.py)", text))
    gone = [n for n in sorted(named) if not (pkg / n).exists() and not (ROOT / n).exists()]
    assert not gone, "docs/design.md names files that do not exist: " + ", ".join(gone)
