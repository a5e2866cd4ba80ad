"""fmforge's Argo CD health checks, run the way Argo CD runs and tests its own.

Each kind's health_test.yaml (charts/fmforge/argocd/resource_customizations/fmforge.io/<Kind>/)
is run case by case in gopher-lua, Argo CD's Lua 5.1 interpreter, at the version Argo CD pins
(tests/luahealth), twice: with only the libraries Argo CD opens for a script from argocd-cm, and
with every library open, as Argo CD's own TestLuaHealthScript runs its built-in scripts. Also: the
cases cover what the issue asks of every kind, the test objects are valid fmforge objects, a
broken script fails the cases, and the chart's argocd-cm snippet is exactly these files.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from argocd import HEALTH, KINDS, Case, cases, evaluate, luahealth, script
from paths import ROOT
from tools import build

from fmforge.api.v1alpha1 import kind_info

CASES = cases()
MODES = {"argocd-cm": False, "open-libs": True}
# Every kind is tested on these (the done-when list of issue 12); Deployment's "succeeded" is Ready.
REQUIRED = ("no-status", "pending", "waiting", "running", "failed", "stale-generation", "deleting",
            "unexpected-types", "unexpected-field-types", "status-not-an-object")


@pytest.fixture(scope="module")
def runner():
    return luahealth()


@pytest.fixture(scope="module")
def results(runner) -> dict[tuple[str, str], dict]:
    """Every case in both modes, in two runs of the interpreter."""
    out = {}
    for mode, open_libs in MODES.items():
        got = evaluate(runner, [(script(c.kind), c.object()) for c in CASES], open_libs)
        out.update({(mode, c.id): r for c, r in zip(CASES, got, strict=True)})
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_health(results, case: Case, mode: str):
    assert results[(mode, case.id)] == {"status": case.status, "message": case.message}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_required_cases_and_no_stray_testdata(kind):
    inputs = {c.input_path for c in CASES if c.kind == kind}
    for name in REQUIRED + ("ready" if kind == "Deployment" else "succeeded",):
        assert f"testdata/{name}.yaml" in inputs, f"{kind} has no {name} case"
    on_disk = {f"testdata/{p.name}" for p in (HEALTH / kind / "testdata").iterdir()}
    assert on_disk == inputs, "every testdata file is a case and every case has its file"
    assert {p.name for p in (HEALTH / kind).iterdir()} == {"health.lua", "health_test.yaml", "testdata"}


def test_cases_cover_every_health_the_checks_give():
    assert {c.status for c in CASES} == {"Healthy", "Progressing", "Degraded", "Suspended", "Unknown"}
    assert {c.kind for c in CASES if c.status == "Suspended"} == {"ModelCard"}


@pytest.mark.parametrize("case", [c for c in CASES if not c.input_path.startswith("testdata/unexpected")
                                  and c.input_path != "testdata/status-not-an-object.yaml"
                                  and c.input_path != "testdata/unknown-phase.yaml"], ids=lambda c: c.id)
def test_case_object_is_a_valid_fmforge_object(case: Case):
    """The objects are what fmforge writes: spec and status validate against the API models."""
    obj = case.object()
    info = kind_info(case.kind)
    assert obj["apiVersion"] == "fmforge.io/v1alpha1" and obj["kind"] == case.kind
    info.spec.model_validate(obj["spec"])
    if "status" in obj:
        info.status.model_validate(obj["status"])


def test_a_broken_script_fails_the_cases(runner):
    """The cases can fail: a script that forgets stale generations and calls Failed healthy."""
    broken = {k: script(k).replace('Failed = "Degraded"', 'Failed = "Healthy"')
              .replace("observed < meta.generation", "false") for k in KINDS}
    assert all(broken[k] != script(k) for k in KINDS)
    got = evaluate(runner, [(broken[c.kind], c.object()) for c in CASES], False)
    wrong = {c.id for c, r in zip(CASES, got, strict=True) if r != {"status": c.status, "message": c.message}}
    for kind in KINDS:
        assert {f"{kind}/testdata/failed.yaml", f"{kind}/testdata/stale-generation.yaml"} <= wrong


def test_argocd_cm_mode_opens_only_argo_cds_libraries(runner):
    """Without open libraries the string library is absent, as in Argo CD: the checks must not use it."""
    uses_string = 'return {status = "Healthy", message = string.upper("x")}'
    closed, opened = (evaluate(runner, [(uses_string, {})], o)[0] for o in (False, True))
    assert "string" in closed["error"] or "nil" in closed["error"]
    assert opened == {"status": "Healthy", "message": "X"}


def test_script_errors_and_bad_returns_are_reported_as_argo_cd_does(runner):
    got = evaluate(runner, [("error('boom')", {}), ('return {status = "Fine"}', {}), ("return 1", {}),
                            ("while true do end", {})], False)
    assert "boom" in got[0]["error"] and "stack traceback" not in got[0]["error"]
    assert got[1] == {"status": "Unknown", "message": "Lua returned an invalid health status"}
    assert got[2] == {"error": "expect table output from Lua script, not number"}
    assert "deadline" in got[3]["error"]


# -- the chart's argocd-cm snippet --------------------------------------------------------------


def _render(*sets: str) -> list[dict]:
    helm = build("helm") / "helm"
    args = [str(helm), "template", "fmforge", str(ROOT / "charts" / "fmforge"), "--namespace", "fmforge-system"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_chart_snippet_is_the_health_files():
    [cm] = [d for d in _render("argocd.healthChecks=true") if d["metadata"]["name"] == "fmforge-argocd-health"]
    assert cm["data"] == {f"resource.customizations.health.fmforge.io_{k}": script(k) for k in KINDS}


def test_chart_snippet_is_off_by_default():
    assert not [d for d in _render() if d["metadata"]["name"].endswith("argocd-health")]
