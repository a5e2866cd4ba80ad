#!/usr/bin/env python3
"""Encode throughput of the DataPile's two encoders on the same texts, in one run:

  - Hugging Face `tokenizers` (`encode_batch_fast`, Rust threads: every core), what the DataPile
    encoded with before and still checks against;
  - tiktoken built from the same tokenizer.json (`tokenize.tiktoken_encoding`; `encode_batch` with
    one thread per core), what it encodes with now.

    python tests/bench/bench_encoder.py [--corpus quickstart|stdlib] [--tokenizer tokenizer.json]
                                        [--threads N] [--repeat 3]

The texts are every document of the quickstart corpus (examples/quickstart/build-corpus.py;
`stdlib` adds the standard library's packages and test suites: 42 MB, the corpus of `make
bench`), read as the DataPile reads them. The tokenizer is the one the DataPile trains (byte-level
BPE, 2,048 tokens, trained here on the first 8 MB) unless --tokenizer names one. Prints MB/s of
each (UTF-8 bytes of input / the fastest of --repeat runs), whether the ids are identical, and the
load average before and after: on a shared machine other work slows a run down. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fmforge.api.v1alpha1.datapile import DataPileSpec
from fmforge.stages.datapile import tokenize as tk
from fmforge.stages.datapile.sources import read_source

ROOT = Path(__file__).resolve().parents[2]


def corpus_texts(kind: str) -> list[str]:
    d = Path(tempfile.mkdtemp())
    extra = ["--recursive", "--with-tests"] if kind == "stdlib" else []
    subprocess.run([sys.executable, str(ROOT / "examples/quickstart/build-corpus.py"), "--out", str(d / "corpus"),
                    *extra], check=True, capture_output=True)
    spec = DataPileSpec.model_validate(yaml.safe_load((ROOT / "examples/quickstart/datapile.yaml").read_text())["spec"])
    return [t for s in spec.sources for t in read_source(s, d)[0].column("text").to_pylist()]


def best(fn, repeat: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=["quickstart", "stdlib"], default="quickstart")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json (default: train the DataPile's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tiktoken's threads (default: cores)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    texts = corpus_texts(args.corpus)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    if args.tokenizer:
        tokenizer_json = args.tokenizer.read_text()
    else:
        head, n = [], 0
        for t in texts:
            if n > 8_000_000:
                break
            head.append(t)
            n += len(t)
        tokenizer_json = tk.train_tokenizer(head, 2048, 2).to_str()
    t = time.perf_counter()
    enc = tk.tiktoken_encoding(tokenizer_json)
    build = time.perf_counter() - t
    hf_s, hf_ids = best(lambda: tk._hf_encode(texts, tokenizer_json), args.repeat)
    tt_s, tt_ids = best(lambda: enc.encode_batch(texts, num_threads=args.threads, allowed_special="all",
                                                 disallowed_special=()), args.repeat)
    one_s, _ = best(lambda: [enc.encode(x, allowed_special="all", disallowed_special=()) for x in texts], args.repeat)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    figures = {
        "corpus": args.corpus, "documents": len(texts), "mb": round(mb, 2), "cores": os.cpu_count(),
        "tokenizers_s": round(hf_s, 3), "tokenizers_mb_s": round(mb / hf_s, 2),
        "tiktoken_s": round(tt_s, 3), "tiktoken_mb_s": round(mb / tt_s, 2), "tiktoken_threads": args.threads,
        "tiktoken_1_thread_mb_s": round(mb / one_s, 2), "speedup": round(hf_s / tt_s, 2),
        "tiktoken_build_s": round(build, 3), "identical_ids": hf_ids == tt_ids,
        "tokens": sum(map(len, hf_ids)), "load_before": load_before, "load_after": load_after,
    }
    print(f"{len(texts)} documents, {mb:.1f} MB, {os.cpu_count()} cores, load {' '.join(load_before)} → "
          f"{' '.join(load_after)}")
    print(f"tokenizers (all cores):        {hf_s:7.2f} s  {mb / hf_s:6.2f} MB/s")
    print(f"tiktoken ({args.threads} threads):          {tt_s:7.2f} s  {mb / tt_s:6.2f} MB/s  "
          f"({hf_s / tt_s:.2f}x)")
    print(f"tiktoken (1 thread):           {one_s:7.2f} s  {mb / one_s:6.2f} MB/s")
    print(f"identical ids: {hf_ids == tt_ids}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
