"""Golden-YAML tests of the manifest builders: each `golden/CASE.input.yaml` (an fmforge object,
the operator settings, and what the builder is given besides) is rendered and compared, as text,
with `golden/CASE.expected.yaml`. Any change of a rendered object fails, so a change to what the
operator creates is seen and reviewed in the diff of the expected file.

After an intended change, regenerate the expected files and review the diff:

    FMFORGE_UPDATE_GOLDEN=1 python -m pytest -q tests/unit/test_golden.py
    git diff tests/unit/golden/
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from fmforge.api.v1alpha1 import KINDS, RayResources
from fmforge.api.v1alpha1.deployment import KServe
from fmforge.kube import builders
from fmforge.kube.settings import Settings

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FMFORGE_UPDATE_GOLDEN") == "1"
CASES = sorted(p.name.removesuffix(".input.yaml") for p in GOLDEN.glob("*.input.yaml"))


def render(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The children the builders make of the case's object, in the order the operator applies them."""
    obj, settings = case["object"], Settings.model_validate(case.get("settings") or {})
    spec = KINDS[obj["kind"]].spec.model_validate(obj["spec"])
    if case["builder"] == "inference_service":
        if spec.kserve is None:  # what deployment.decide does for target kserve
            spec = spec.model_copy(update={"kserve": KServe()})
        out = [builders.inference_service(obj, spec, case["model"]["uri"], case["model"]["digest"], settings)]
        if spec.kserve.expose == "route":
            out.append(builders.route(obj, spec))
        return out
    if case["builder"] == "rayjob":
        plan = builders.plan(obj, settings, case.get("inputs") or {})
        queue = getattr(getattr(spec, "ray", None), "queue", "") or ""
        return [builders.plan_configmap(obj, plan),
                builders.rayjob(obj, settings, getattr(spec, "resources", None) or RayResources(), queue)]
    raise AssertionError(f"unknown builder {case['builder']!r} in the golden input")


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people to review: no anchors for repeated values, multi-line strings (the
    plan's JSON) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=120)


def test_there_are_golden_cases():
    assert {"isvc-huggingface", "isvc-fmforge-route", "rayjob-tunedmodel-configmap"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_builder_renders_the_golden_yaml(case: str):
    rendered = dump(render(yaml.safe_load((GOLDEN / f"{case}.input.yaml").read_text())))
    expected = GOLDEN / f"{case}.expected.yaml"
    if UPDATE:
        expected.write_text(rendered)
        return
    assert expected.is_file(), (f"{expected} is missing; generate it with FMFORGE_UPDATE_GOLDEN=1 and review it "
                                f"before committing")
    assert rendered == expected.read_text(), (f"the rendered {case} differs from {expected.name}; if the change is "
                                              f"intended, regenerate with FMFORGE_UPDATE_GOLDEN=1 and review the diff")


def test_a_changed_field_is_caught():
    """The comparison is of every field: one changed value anywhere gives different text."""
    case = yaml.safe_load((GOLDEN / "isvc-fmforge-route.input.yaml").read_text())
    objs = render(case)
    objs[1]["spec"]["tls"]["termination"] = "passthrough"
    assert dump(objs) != (GOLDEN / "isvc-fmforge-route.expected.yaml").read_text()
