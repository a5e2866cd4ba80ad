"""Scale helpers shared by the DataPile benchmark and the driver-memory test (imported by name:
tests/ is on sys.path through tests/conftest.py; the benchmark puts it there itself).

- `distinct_copies`: a corpus N times larger made of N distinct copies of a quickstart corpus
  (examples/quickstart/build-corpus.py's layout: prose/*.jsonl, code/**/*.py, licenses/*.txt).
  Copy 0 is the corpus as it is; in copy k > 0 about a third of the word types (words of four
  letters or more, Python's keywords and builtins left alone) are each replaced, wherever they
  occur, by another word of the corpus's own vocabulary, chosen by a hash of (k, word). The text
  stays real words and real code layout, but two copies share few 5-word shingles (a shingle
  survives only if none of its words was replaced in either copy), so neither exact nor fuzzy
  dedup collapses them: the pile really holds N times the documents.
- `run_fmforge`: `fmforge run` in a subprocess, as a user runs it, with the peak resident memory
  of that process alone (the driver: its own VmHWM, read from /proc while it runs; Ray's GCS,
  raylet and workers are other processes and are reported apart), its wall time, and the
  object's status (`fmforge get -o json`) and data card.

Only fmforge's command line and its outputs are used, never the stage's modules, so the same
code measures any implementation of the stage.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

WORD = re.compile(r"[A-Za-z]{4,}")
#: Share of the word types (out of 256) replaced in each copy after the first.
REPLACED_PER_256 = 80
_KEEP = {w.lower() for w in keyword.kwlist + dir(builtins) + ["self", "print", "return", "import"]}


def _vocabulary(texts) -> list[str]:
    """The corpus's words seen at least 5 times (replacements are common words, not one-off
    identifiers)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(w.lower() for w in WORD.findall(t))
    return sorted(w for w, n in counts.items() if n >= 5 and w not in _KEEP)


class _Rewriter:
    """Copy k's word substitution: a fixed map from word to word, so the copy reads as the same
    kind of text with a shifted vocabulary."""

    def __init__(self, k: int, vocab: list[str]):
        self.k, self.vocab, self.memo = k, vocab, {}

    def _target(self, low: str) -> str:
        hit = self.memo.get(low)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(f"{self.k}\0{low}".encode(), digest_size=8).digest(), "little")
            hit = low
            if low not in _KEEP and (h & 0xFF) < REPLACED_PER_256 and self.vocab:
                hit = self.vocab[(h >> 8) % len(self.vocab)]
            self.memo[low] = hit
        return hit

    def _sub(self, m: re.Match) -> str:
        w = m.group(0)
        low = w.lower()
        t = self._target(low)
        if t == low:
            return w
        if w.isupper():
            return t.upper()
        if w[0].isupper():
            return t.capitalize()
        return t

    def __call__(self, text: str) -> str:
        if self.k == 0:
            return text
        return WORD.sub(self._sub, text)


def _corpus_files(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))


def distinct_copies(base: Path, out: Path, copies: int) -> Path:
    """`copies` distinct copies of the corpus at `base` under `out` (prose/c<k>/…, code/c<k>/…,
    licenses/c<k>/…: the same source globs read them). Idempotent: a stamp records what was made."""
    stamp = out / ".stamp"
    key = json.dumps({"v": 2, "base": str(base.resolve()), "copies": copies, "replaced": REPLACED_PER_256,
                      "base_stamp": (base / ".stamp").read_text() if (base / ".stamp").exists() else None})
    if stamp.exists() and stamp.read_text() == key:
        return out
    if out.exists():
        shutil.rmtree(out)
    files = _corpus_files(base)
    texts = {p: p.read_text(encoding="utf-8", errors="surrogateescape") for p in files}
    vocab = _vocabulary(texts.values()) if copies > 1 else []
    for k in range(copies):
        rewrite = _Rewriter(k, vocab)
        for p, text in texts.items():
            rel = p.relative_to(base)
            dest = out / rel.parts[0] / f"c{k}" / Path(*rel.parts[1:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            if p.suffix == ".jsonl":
                lines = []
                for line in text.splitlines():
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    rec["text"] = rewrite(rec["text"])
                    if "id" in rec:
                        rec["id"] = f"{rec['id']}#c{k}"
                    lines.append(json.dumps(rec))
                dest.write_text("\n".join(lines) + "\n")
            else:
                dest.write_text(rewrite(text), encoding="utf-8", errors="surrogateescape")
    stamp.write_text(key)
    return out


def corpus_bytes(root: Path) -> int:
    """Bytes of the files under `root` (what the benchmark calls the input size)."""
    return sum(p.stat().st_size for p in _corpus_files(root))


# -- fmforge run, measured ---------------------------------------------------------------------


def _status_kb(pid: int, *fields: str) -> dict[str, int]:
    got: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    got[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return got


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@dataclass
class Run:
    """One `fmforge run`, as measured from outside."""

    seconds: float
    driver_peak_bytes: int
    """VmHWM of the `fmforge run` process itself: the driver."""
    others_peak_bytes: int
    """The largest VmHWM among its descendants (Ray's GCS, raylet, workers)."""
    returncode: int
    stdout: str
    stderr: str
    status: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)


def fmforge_cmd() -> list[str]:
    """`fmforge` of this interpreter's environment (its console script, or the module)."""
    exe = Path(sys.executable).parent / "fmforge"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from fmforge.cli import entry; sys.exit(entry())"]


#: The checkout this file belongs to: its operator/src goes first on the subprocess's PYTHONPATH,
#: so the run measures this checkout's code whichever checkout the venv was installed from.
ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "operator" / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_fmforge(manifest: Path, state_dir: Path, env: dict[str, str] | None = None, poll_s: float = 0.05,
                kind: str = "DataPile") -> Run:
    """`fmforge run MANIFEST --state-dir STATE` in a subprocess; the driver's peak memory is its
    own high-water mark (VmHWM), read every `poll_s` while it runs (a high-water mark only grows,
    so the last reading is the peak up to that moment; only the last `poll_s` before exit can
    escape it)."""
    cmd = [*fmforge_cmd(), "run", str(manifest), "--state-dir", str(state_dir), "--progress", "plain"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
    peak = {"driver": 0, "others": 0}
    done = threading.Event()

    def watch():
        others: dict[int, int] = {}
        n = 0
        while not done.is_set():
            hwm = _status_kb(proc.pid, "VmHWM").get("VmHWM")
            if hwm:
                peak["driver"] = max(peak["driver"], hwm * 1024)
            if n % 10 == 0:  # the process tree every half second: Ray's processes live for the run
                stack = list(_children(proc.pid))
                while stack:
                    c = stack.pop()
                    others[c] = 0
                    stack.extend(_children(c))
            for c in list(others):
                v = _status_kb(c, "VmHWM").get("VmHWM")
                if v:
                    others[c] = max(others[c], v * 1024)
                    peak["others"] = max(peak["others"], others[c])
            n += 1
            done.wait(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    run = Run(seconds, peak["driver"], peak["others"], proc.returncode, out, err)
    if proc.returncode == 0:
        name = _name_of(manifest)
        got = subprocess.run([*fmforge_cmd(), "get", kind, name, "-o", "json", "--state-dir", str(state_dir)],
                             capture_output=True, text=True, env=_env(env))
        if got.returncode == 0:
            run.status = json.loads(got.stdout).get("status", {})
            card = run.status.get("dataCard")
            if card:
                path = Path(card.removeprefix("file://")).with_suffix(".json")
                if path.is_file():
                    run.card = json.loads(path.read_text())
    return run


def _name_of(manifest: Path) -> str:
    import yaml

    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    return docs[0]["metadata"]["name"]
