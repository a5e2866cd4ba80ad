"""Stage inputs that used to fail with a traceback, or not at all, now fail with one line that
names the file (or field), the line where there is one, and the fix, as the right typed error
(issue 17, defect 7):

- TunedModel templates: format specs, conversions, huge widths, attribute and index access are
  refused before any record is read (and by the spec's model: tests/badmanifests.py);
- ModelCard prompts files: not UTF-8, empty, a line that is not JSON or lacks a field, an empty
  prompt, a prompt longer than the model's context less maxNewTokens;
- DataPile: a full, read-only or forbidden output (ENOSPC, EROFS, EACCES), in a Ray worker or
  on the driver, ends as one line without Ray's traceback or colour codes.
"""

from __future__ import annotations

import re

import pytest

from fmforge.api.v1alpha1.tunedmodel import TEMPLATE_RE2, TunedModelSpec, template_fields
from fmforge.stages.base import InvalidSpec
from fmforge.stages.tune import data as examples

# -- TunedModel templates ----------------------------------------------------------------------------

FIELD = "spec.data.promptTemplate"


@pytest.mark.parametrize("template, words", [
    ("Q: {question:d}", ["{question:d} at character 4", "format spec or conversion", "write {question}"]),
    ("Q: {question!r}", ["{question!r} at character 4", "write {question}"]),
    ("{question!x}", ["{question!x} at character 1", "write {question}"]),
    ("{question:99999999}", ["{question:99999999}", "format spec", "write {question}"]),
    ("{question:>{width}}", ["{question:>{width}", "nested"]),
    ("{a.b}", ["{a.b} at character 1", "attribute or an index", "like {question}"]),
    ("{a[0]}", ["{a[0]} at character 1", "attribute or an index"]),
    ("x {} y", ["{} at character 3", "names no field"]),
    ("{0}", ["{0}", "not a field name"]),
    ("{question", ["'{' at character 1 is never closed", "'{{'"]),
    ("a } b", ["single '}' at character 3", "'}}'"]),
])
def test_a_template_that_is_more_than_plain_fields_is_refused_naming_the_placeholder(template: str, words):
    with pytest.raises(InvalidSpec) as e:
        examples.check_template(template, FIELD)
    msg = str(e.value)
    assert msg.startswith(f"{FIELD}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    # the spec's model refuses it too, with the same words (what `fmforge validate` prints)
    spec = {"baseModel": {"uri": "file://m"}, "data": {"uri": "file://d.jsonl", "promptTemplate": template}}
    with pytest.raises(ValueError) as v:
        TunedModelSpec.model_validate(spec)
    [err] = v.value.errors()
    assert err["loc"] == ("data", "promptTemplate") and all(w in err["msg"] for w in words), err


@pytest.mark.parametrize("template, fields", [
    ("Question: {question}\nAnswer:", ["question"]),
    ("{{literal}} {a}}}{{{b}}}", ["a", "b"]),
    ("{größe} {_x1}", ["größe", "_x1"]),
    ("no placeholder", []),
])
def test_plain_templates_pass_and_fill(template: str, fields: list[str]):
    assert examples.check_template(template, FIELD) == fields
    rec = examples.Record({f: "v" for f in fields}, "f line 1", "k")
    assert examples.fill(template, rec, FIELD) == template.format_map({f: "v" for f in fields})


def test_the_crd_rule_accepts_every_template_the_model_accepts():
    """The CEL rule's regex (RE2, here read by Python's re: the pattern uses only what both read
    alike) is looser than the model's check, never stricter, and refuses what reaches the
    formatter."""
    import yaml
    from paths import ROOT

    crd = yaml.safe_load((ROOT / "crds" / "fmforge.io_tunedmodels.yaml").read_text())
    data = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["data"]
    for name in ("promptTemplate", "completionTemplate"):
        [rule] = data["properties"][name]["x-kubernetes-validations"]
        assert rule["rule"] == f"self.matches('{TEMPLATE_RE2}')"
    # CEL reads a backslash in a string literal as an escape (`\s` would make the CRD invalid)
    assert "\\" not in TEMPLATE_RE2
    samples = ["{question}", "{{x}}", "{{{a}}}", "{a}}}", "{größe}", "{ a }", "{a-b}", "x{{", "}}x", "{a}{b}",
               "{a:d}", "{a!r}", "{a:99999999}", "{a.b}", "{a[0]}", "{}", "{0}", "{a", "a}", "{{a}", "{a:{b}}",
               "{a:}", "{a!}"]
    for s in samples:
        try:
            template_fields(s)
            ok = True
        except ValueError:
            ok = False
        cel = re.match(TEMPLATE_RE2, s) is not None
        assert cel or not ok, f"the API server would refuse {s!r}, which fmforge validate accepts"
        if any(c in s for c in ":!.[") or s in ("{}", "{0}", "{a", "a}", "{{a}"):
            assert not cel, f"the API server would accept {s!r}"
