"""CRD generation: drift against crds/ and the chart, structural schemas, rules present."""

from __future__ import annotations

import pytest
import yaml
from paths import ROOT

from fmforge.api.crdgen import render_crds
from fmforge.api.v1alpha1 import KINDS

RENDERED = render_crds()


def test_crds_dir_matches_the_models():
    on_disk = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert set(on_disk) == set(RENDERED), "run `make crds`"
    for name, text in RENDERED.items():
        assert on_disk[name] == text, f"crds/{name} drifted from the models: run `make crds`"


def test_chart_crds_equal_crds_dir():
    chart = {p.name: p.read_text() for p in (ROOT / "charts" / "fmforge" / "crds").glob("*.yaml")}
    crds = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert chart == crds, "charts/fmforge/crds differs from crds/: run `make crds`"


def _crds():
    return {yaml.safe_load(t)["spec"]["names"]["kind"]: yaml.safe_load(t) for t in RENDERED.values()}


def _walk(node, path="$"):
    yield path, node
    for k, v in (node.get("properties") or {}).items():
        yield from _walk(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_five_crds_with_names_and_category():
    crds = _crds()
    assert sorted(crds) == sorted(KINDS)
    short_names = {"DataPile": ["pile", "piles"], "TrainingRun": ["train", "tr"], "ModelCard": ["card", "mc"],
                   "TunedModel": ["tuned", "tm"], "Deployment": ["fmdeploy", "fmd"]}
    for kind, crd in crds.items():
        names = crd["spec"]["names"]
        assert names["categories"] == ["fmforge"]
        # `fmdeploy`: `kubectl get deploy` is apps/v1's, so fmforge's Deployment needs a name of its own.
        assert names["shortNames"] == short_names[kind], kind
        assert crd["spec"]["scope"] == "Namespaced"
        v = crd["spec"]["versions"][0]
        assert v["subresources"] == {"status": {}}
        assert any(c["jsonPath"] == ".status.phase" for c in v["additionalPrinterColumns"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural(kind):
    schema = _crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "oneOf" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        assert "title" not in node and "const" not in node, path
        if "default" in node:
            assert node.get("type") != "object", f"{path}: object defaults are expanded by the API server"
        if path.startswith("$.spec") and path != "$.spec" and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"
        if node.get("type") == "array":
            assert "maxItems" in node or "spec" not in path, f"{path}: CEL cost needs maxItems"


def _rules(kind):
    schema = _crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return [r["rule"] for _, n in _walk(schema) for r in n.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize(
    "kind,rule",
    [
        ("TunedModel", "has(self.baseModelRef) != has(self.baseModel)"),
        ("TrainingRun", "self.microBatchSize <= self.globalBatchSize"),
        ("ModelCard", "!has(self.min) || !has(self.max) || self.min <= self.max"),
        ("Deployment", "self.minReplicas <= self.maxReplicas"),
        ("DataPile", "self.numPerm % self.bands == 0"),
        ("DataPile", "self.metadata.name.size() <= 40"),
        ("DataPile", "!has(self.threshold) || self.type in ['hap']"),
    ],
)
def test_cel_rules(kind, rule):
    assert rule in _rules(kind)


def test_fuzzy_threshold_bounds():
    crd = _crds()["DataPile"]
    t = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["dedup"][
        "properties"]["fuzzy"]["properties"]["threshold"]
    assert t["minimum"] == 0 and t["exclusiveMinimum"] is True and t["maximum"] == 1


def test_enums_and_list_maps():
    spec = _crds()["DataPile"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["sources"]["x-kubernetes-list-type"] == "map"
    formats = spec["properties"]["sources"]["items"]["properties"]["format"]["enum"]
    assert formats == ["jsonl", "parquet", "text", "code"]
    assert spec["properties"]["publish"]["properties"]["tags"]["x-kubernetes-list-type"] == "set"
