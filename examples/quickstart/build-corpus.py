#!/usr/bin/env python3
"""Build the quickstart corpus from text that ships with Python and with the machine.

Writes, next to this script (or under --out):

  corpus/prose/topics.jsonl       Python's documentation topics (pydoc_data), one per line
  corpus/prose/modules.jsonl      the docstrings of the standard-library modules
  corpus/code/<tree>/*.py         standard-library sources, from every Python 3 tree found
                                  (this interpreter's and the system's: two patch releases of
                                  one library give natural exact and near duplicates)
  corpus/licenses/*.txt           Python's LICENSE and the system's common licence texts

Run by `make quickstart` and by the stage tests; idempotent (a stamp file records the options).
Nothing here is invented text: the corpus is what the machine already has.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pkgutil
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stdlib_trees() -> list[Path]:
    """Standard-library directories of every Python 3.x install on the machine, this one first."""
    trees = [Path(sysconfig.get_paths()["stdlib"])]
    for cand in sorted(Path("/usr/lib").glob("python3.*")):
        if cand.is_dir() and (cand / "os.py").exists() and cand.resolve() not in [t.resolve() for t in trees]:
            trees.append(cand)
    return trees


def write_prose(out: Path) -> int:
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with (out / "topics.jsonl").open("w") as f:
        for name in sorted(topics):
            f.write(json.dumps({"id": f"topic:{name}", "title": name, "text": topics[name]}) + "\n")
            n += 1
    with (out / "modules.jsonl").open("w") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names):
            if mod.startswith("_") or mod in ("antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"):
                continue
            try:
                doc = importlib.import_module(mod).__doc__
            except Exception:  # a module that cannot import here simply has no docstring to give
                continue
            if doc and len(doc) > 200:
                f.write(json.dumps({"id": f"module:{mod}", "title": mod, "text": doc.strip()}) + "\n")
                n += 1
    return n


_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def write_code(out: Path, max_files: int | None, recursive: bool = False, tests: bool = False) -> int:
    n = 0
    skip = _SKIP - {"test", "tests"} if tests else _SKIP
    for tree in stdlib_trees():
        label = f"python{tree.name.removeprefix('python')}-{hashlib.sha256(str(tree).encode()).hexdigest()[:6]}"
        dest = out / label
        files = sorted(p for p in (tree.rglob("*.py") if recursive else tree.glob("*.py"))
                       if p.is_file() and not skip & set(p.relative_to(tree).parts[:-1]))
        for p in files[:max_files]:
            target = dest / p.relative_to(tree)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
            n += 1
    return n


def write_licenses(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.exists():
        shutil.copyfile(py_license, out / "Python-LICENSE.txt")
        n += 1
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        for p in sorted(common.iterdir()):
            if p.is_file() and not p.is_symlink():
                shutil.copyfile(p, out / f"{p.name}.txt")
                n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "corpus", help="where to write (default: %(default)s)")
    ap.add_argument("--max-files", type=int, default=None,
                    help="at most this many source files per standard-library tree (default: all)")
    ap.add_argument("--recursive", action="store_true",
                    help="the standard library's packages too, not only its top-level modules (a larger corpus)")
    ap.add_argument("--with-tests", action="store_true",
                    help="with --recursive: the standard library's own test suites too (the largest corpus)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = ap.parse_args()
    stamp = args.out / ".stamp"
    key = json.dumps({"max_files": args.max_files, "recursive": args.recursive, "tests": args.with_tests,
                      "trees": [str(t) for t in stdlib_trees()], "v": 1})
    if stamp.exists() and stamp.read_text() == key and not args.force:
        print(f"Corpus is up to date in {args.out}")
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    prose = write_prose(args.out / "prose")
    code = write_code(args.out / "code", args.max_files, args.recursive, args.with_tests)
    lic = write_licenses(args.out / "licenses")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    stamp.write_text(key)
    print(f"Built corpus in {args.out}: {prose} prose documents, {code} source files, "
          f"{lic} licence texts, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
