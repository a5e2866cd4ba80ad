"""The layer rules of docs/design.md ("Layers"), checked by import-linter."""

import subprocess
import sys
from pathlib import Path

from paths import ROOT


def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe)], cwd=ROOT / "operator", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and ", 0 broken" in r.stdout
