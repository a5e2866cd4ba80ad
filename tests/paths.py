"""Paths the tests share (imported by name: tests/ is on sys.path through tests/conftest.py)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_DATA = ROOT / "tests" / "stages" / "data"
