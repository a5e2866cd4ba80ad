"""The Helm chart: lint, render, restricted security context, least-privilege RBAC."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from paths import ROOT
from tools import build

CHART = ROOT / "charts" / "fmforge"


@pytest.fixture(scope="module")
def helm():
    return build("helm") / "helm"


def _template(helm, *sets):
    args = [str(helm), "template", "fmforge", str(CHART), "--namespace", "fmforge-system"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_helm_lint(helm):
    r = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def test_values_schema_rejects_bad_values(helm):
    r = subprocess.run([str(helm), "template", "x", str(CHART), "--set", "logLevel=loud"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "logLevel" in r.stderr
    json.loads((CHART / "values.schema.json").read_text())


def test_operator_deployment_is_restricted(helm):
    docs = _template(helm)
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "runAsUser" not in pod["securityContext"], "no fixed UID: OpenShift assigns one"
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert "runAsUser" not in sc
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "readinessProbe" in c
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}}, "values.yaml's resources, as they are"
    assert all(p["containerPort"] >= 1024 for p in c["ports"])
    assert not any("hostPath" in v for v in pod["volumes"])
    assert c["command"] == ["fmforge"] and c["args"] == ["operator"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FMFORGE_CONFIG"] == "/etc/fmforge/config.yaml" and env["FMFORGE_HEALTH_PORT"] == "8080"
    assert env["FMFORGE_METRICS_PORT"] == "9090" and env["FMFORGE_LOG_FORMAT"] == "json"


def test_every_setting_the_chart_passes_is_read_by_the_operator(helm):
    from fmforge.cli import build_parser
    from fmforge.kube.settings import Settings

    docs = _template(helm, "config.jobs.activeDeadlineSeconds=600")
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    cli = (ROOT / "operator" / "src" / "fmforge" / "cli.py").read_text()
    for e in c["env"]:
        if e["name"].startswith("FMFORGE_"):
            assert f'"{e["name"]}"' in cli, f"{e['name']} is set by the chart and read by nothing"
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    assert args.command == "operator"
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    cfg = Settings.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))  # extra=forbid: no unread key
    assert cfg.jobs.active_deadline_seconds == 600 and cfg.catalog.uri.startswith("sqlite:////mnt/pvc/")


def test_rbac_is_least_privilege(helm):
    # Cluster-wide: one ClusterRole; watching namespaces: one Role in each and no ClusterRole.
    expected = {(): [("ClusterRole", None)], ("watchNamespaces={team-a,team-b}",): [("Role", "team-a"),
                                                                                      ("Role", "team-b")]}
    for sets, kinds in expected.items():
        docs = _template(helm, *sets)
        roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
        assert sorted((r["kind"], r["metadata"].get("namespace")) for r in roles) == kinds
        for role in roles:
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], f"wildcard in {rule}"
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            groups = {g for r in role["rules"] for g in r["apiGroups"]}
            assert {"fmforge.io", "ray.io", "serving.kserve.io"} <= groups
            # the operator only reads its own kinds and writes their status
            [own] = [r for r in role["rules"] if r["resources"][0] == "datapiles"]
            assert own["verbs"] == ["list", "watch"]
            secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
            assert secrets == [], "the operator does not read secrets"
            # the Route of expose: route: applied and deleted, never read or watched, and no
            # custom hosts (routes/custom-host)
            [routes] = [r for r in role["rules"] if "route.openshift.io" in r["apiGroups"]]
            assert routes["resources"] == ["routes"] and routes["verbs"] == ["create", "patch", "delete"]


def test_watch_namespaces_give_roles_not_cluster_roles(helm):
    docs = _template(helm, "watchNamespaces={team-a,team-b}")
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and kinds.count("Role") == 2 and kinds.count("RoleBinding") == 2
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["operator", "--namespace=team-a", "--namespace=team-b"]


def test_config_and_metrics(helm):
    docs = _template(helm, "config.storageUri=s3://models/fmforge")
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["storageUri"] == "s3://models/fmforge" and cfg["catalog"]["type"] == "sql"
    [svc] = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["ports"][0]["name"] == "metrics"
