"""The fmforge command line: exit codes, get, lineage, crds, version, help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paths import ROOT

from fmforge import __version__
from fmforge.cli import main
from fmforge.stages import STAGES


@pytest.fixture
def ran(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "qs"
    shutil.copytree(ROOT / "examples" / "quickstart", d, ignore=shutil.ignore_patterns("corpus", ".fmforge"))
    for kind in ("DataPile", "TrainingRun"):
        monkeypatch.setitem(STAGES, kind, "test_runner:ok_stage")
    monkeypatch.setitem(STAGES, "TunedModel", "test_runner:failing_stage")
    assert main(["run", str(d), "--progress", "plain"]) == 1  # the TunedModel fails, its readers wait
    return d / ".fmforge"


def test_run_exit_code_and_summary(tmp_path: Path, capsys, monkeypatch):
    d = tmp_path / "qs"
    shutil.copytree(ROOT / "examples" / "quickstart", d, ignore=shutil.ignore_patterns("corpus", ".fmforge"))
    for kind in ("DataPile", "TrainingRun"):
        monkeypatch.setitem(STAGES, kind, "test_runner:ok_stage")
    monkeypatch.setitem(STAGES, "TunedModel", "test_runner:failing_stage")  # never the real 135M tuning here
    assert main(["run", str(d), "--progress", "plain"]) == 1
    out, err = capsys.readouterr()
    assert "TunedModel/pydocs-qa: Failed: InvalidInput: source python-docs" in err
    assert "fmforge run: 2 succeeded, 1 failed, 2 waiting" in err
    # the summary table: one row per object, in run order, with its result and time
    table = out.splitlines()
    assert table[0].split() == ["OBJECT", "RESULT", "TIME", "DETAIL"]
    assert [row.split()[:2] for row in table[1:3]] == [["DataPile/pydocs", "Succeeded"],
                                                      ["TunedModel/pydocs-qa", "Failed"]]
    assert table[1].split()[2].endswith("s") and len(table) == 6


def test_get_table_has_the_printer_columns(ran: Path, capsys):
    assert main(["get", "datapile", "--state-dir", str(ran)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "VERSION", "TAGS", "DOCS", "TOKENS", "AGE"]
    assert out[1].split()[:2] == ["pydocs", "Succeeded"] and "v1" in out[1]


def test_get_all_kinds_and_short_names(ran: Path, capsys):
    assert main(["get", "--state-dir", str(ran)]) == 0
    out = capsys.readouterr().out
    for obj in ("datapile.fmforge.io/pydocs", "trainingrun.fmforge.io/pydocs-gpt", "deployment.fmforge.io/pydocs-qa"):
        assert obj in out
    assert main(["get", "tr", "--state-dir", str(ran)]) == 0
    assert "pydocs-gpt" in capsys.readouterr().out


def test_get_json_and_yaml_have_the_cr_shape(ran: Path, capsys):
    assert main(["get", "TrainingRun", "pydocs-gpt", "-o", "json", "--state-dir", str(ran)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["apiVersion"] == "fmforge.io/v1alpha1" and obj["kind"] == "TrainingRun"
    assert obj["status"]["phase"] == "Succeeded" and obj["status"]["observedGeneration"] == 1
    assert {c["type"] for c in obj["status"]["conditions"]} == {"Ready", "Reconciling", "Stalled"}
    assert "fmforge" not in obj
    assert main(["get", "-o", "yaml", "--state-dir", str(ran)]) == 0
    lst = yaml.safe_load(capsys.readouterr().out)
    assert lst["kind"] == "List" and len(lst["items"]) == 5


def test_get_errors(ran: Path, capsys):
    assert main(["get", "datapile", "nope", "--state-dir", str(ran)]) == 1
    assert "DataPile/nope not found" in capsys.readouterr().err
    assert main(["get", "widgets", "--state-dir", str(ran)]) == 2
    assert "unknown kind 'widgets'" in capsys.readouterr().err


def test_lineage_walks_to_the_pile(ran: Path, capsys):
    assert main(["lineage", "TrainingRun/pydocs-gpt", "--state-dir", str(ran)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TrainingRun/pydocs-gpt: Succeeded")
    assert "DataPile/pydocs: Succeeded" in out[1] and "tags v1" in out[1]
    assert main(["lineage", "pydocs-gpt", "--state-dir", str(ran)]) == 2


def test_crds_stdout_and_version(capsys):
    assert main(["crds", "--stdout"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert len(docs) == 5 and all(d["kind"] == "CustomResourceDefinition" for d in docs)
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_console_script_help_and_usage_errors():
    exe = Path(sys.executable).parent / "fmforge"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "validate" in r.stdout and "lineage" in r.stdout
    r = subprocess.run([exe, "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([exe, "validate"], capture_output=True, text=True)
    assert r.returncode == 2
    # the console script leaves through os._exit: exit codes and buffered output must survive it
    r = subprocess.run([exe, "version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout
    r = subprocess.run([exe, "validate", "/nonexistent/pile.yaml"], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file or directory" in r.stderr


def test_cli_does_not_import_the_operator_or_heavy_stacks():
    code = ("import sys; from fmforge.cli import main; main(['validate', '-q', sys.argv[1]]); "
            "bad = [m for m in ('kopf', 'kubernetes', 'torch', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "quickstart")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
