#!/usr/bin/env python3
"""Benchmark the DataPile stage on the quickstart corpus, beside datatrove's MinHash dedup.

    make bench          (creates .venv-bench with fmforge[data] and datatrove, then runs this)

Prints a table and one JSON line of figures:
  - documents/s and MB/s of each step, in one process, on the whole corpus;
  - the whole DataPile run (Ray start-up, Ray Data, dedup, tokenizer, Iceberg publish, card),
    the way `fmforge run` does it, in a fresh process and state directory;
  - fmforge's dedup step (exact hash + MinHash + LSH + components) alone;
  - datatrove's MinHash dedup (signatures, buckets, clusters, filter; 2 local workers) on the
    same documents with the same parameters (5-word shingles, 14 bands x 8 rows = 112 hashes),
    and how many documents each removed.
Goals on 2 cores: whole run >= 3x faster than datatrove's dedup, the dedup step >= 10x faster,
the whole pipeline above 1 MB/s per core.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
CORES = os.cpu_count() or 1


def build_corpus(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(QUICKSTART / "build-corpus.py"), "--out", str(out), *extra], check=True,
                   capture_output=True)
    return out


def pile_manifest(work: Path, corpus: Path) -> Path:
    """The quickstart DataPile, reading `corpus`."""
    m = yaml.safe_load((QUICKSTART / "datapile.yaml").read_text())
    work.mkdir(parents=True)
    (work / "corpus").symlink_to(corpus)
    p = work / "datapile.yaml"
    p.write_text(yaml.safe_dump(m, sort_keys=False))
    return p


def per_step(spec, base: Path) -> tuple[list[dict], pa.Table]:
    from fmforge.api.v1alpha1.common import quantity_value
    from fmforge.stages.datapile import dedup as dd
    from fmforge.stages.datapile import tokenize as tk
    from fmforge.stages.datapile.annotate import annotate
    from fmforge.stages.datapile.filters import build_steps
    from fmforge.stages.datapile.sources import read_source

    rows: list[dict] = []

    def rec(name, seconds, docs, nbytes):
        rows.append({"step": name, "seconds": round(seconds, 3), "docs_per_s": round(docs / seconds, 1),
                     "mb_per_s": round(nbytes / 1e6 / seconds, 2)})

    t = time.perf_counter()
    table = pa.concat_tables([read_source(s, base)[0] for s in spec.sources])
    nbytes = sum(len(x.encode()) for x in table.column("text").to_pylist())
    rec("read sources", time.perf_counter() - t, table.num_rows, nbytes)
    # warm the models once so the step figures are throughput, not first-load
    annotate(table.slice(0, 20), True, 0.5, True)
    t = time.perf_counter()
    b = annotate(table, True, 0.5, True)
    rec("categorize", time.perf_counter() - t, table.num_rows, nbytes)
    b = b.append_column("dropped", pa.nulls(b.num_rows, pa.string()))
    for step in build_steps(spec.filters):
        step(b.slice(0, 20))
        t = time.perf_counter()
        b = step(b)
        rec(f"filter {step.reason}", time.perf_counter() - t, b.num_rows, nbytes)
    t = time.perf_counter()
    h = dd.content_hashes(table.column("text"))
    keep = dd.first_of_each(h, np.arange(table.num_rows))
    rec("exact dedup", time.perf_counter() - t, table.num_rows, nbytes)
    t = time.perf_counter()
    fz = spec.dedup.fuzzy
    sig = dd.signatures(table.column("text"), fz.num_perm, fz.shingle_size)
    rec("minhash signatures", time.perf_counter() - t, table.num_rows, nbytes)
    t = time.perf_counter()
    dd.fuzzy_clusters(sig[keep], np.arange(int(keep.sum())), fz.bands, fz.threshold, fz.verify)
    rec("lsh + components", time.perf_counter() - t, int(keep.sum()), nbytes)
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist()
    splits = tk.split_of(ids, spec.split.validation_fraction)
    tr = spec.tokenizer.train
    t = time.perf_counter()
    sizes = np.array([len(x.encode()) for x in texts])
    sample = tk.training_sample(ids, sizes, splits, int(quantity_value(tr.sample_bytes)))
    tok = tk.train_tokenizer([texts[i] for i in sample], tr.vocab_size, tr.min_frequency)
    rec(f"train tokenizer ({tr.sample_bytes})", time.perf_counter() - t, table.num_rows, nbytes)
    t = time.perf_counter()
    enc = tk.encode(table.select(["text"]), tok.to_str())
    eos, pad = tk.special_ids(tok)
    tk.pack(enc.column("ids"), splits, eos, pad, spec.tokenize.sequence_length)
    rec("tokenize + pack", time.perf_counter() - t, table.num_rows, nbytes)
    return rows, table


def fmforge_dedup(table: pa.Table, spec) -> tuple[float, int]:
    """fmforge's dedup step alone: exact, then MinHash + LSH + components, in one process."""
    from fmforge.stages.datapile import dedup as dd

    fz = spec.dedup.fuzzy
    t = time.perf_counter()
    h = dd.content_hashes(table.column("text"))
    keep = dd.first_of_each(h, np.arange(table.num_rows))
    sub = table.filter(pa.array(keep))
    sig = dd.signatures(sub.column("text"), fz.num_perm, fz.shingle_size)
    res = dd.fuzzy_clusters(sig, np.arange(sub.num_rows), fz.bands, fz.threshold, fz.verify)
    seconds = time.perf_counter() - t
    return seconds, table.num_rows - int(res.keep.sum())


def whole_run(manifest: Path) -> tuple[float, dict]:
    """`fmforge run` in a fresh process and state directory: what a user waits for."""
    exe = Path(sys.executable).parent / "fmforge"
    t = time.perf_counter()
    r = subprocess.run([str(exe), "run", str(manifest), "--progress", "plain"], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"fmforge run failed:\n{r.stderr[-3000:]}")
    state = json.loads((manifest.parent / ".fmforge" / "objects" / "DataPile" / "pydocs.json").read_text())
    card = json.loads(Path(state["status"]["dataCard"].removeprefix("file://")).with_suffix(".json").read_text())
    phases = dict(card["timings"])
    # Python's start and imports, Ray's shutdown and the exit: the run's time outside its steps
    phases["outside the steps"] = round(seconds - sum(card["timings"].values()), 3)
    return seconds, state["status"]["stats"] | {"phases": phases}


RAY_FLOOR = """
import ray
ray.init(num_cpus={cores}, include_dashboard=False, log_to_driver=False, configure_logging=False)
ray.get([ray.remote(lambda: 1).remote() for _ in range({cores})])
ray.shutdown()
"""


def ray_floor() -> float:
    """An empty Ray session the way the stage starts one (start, one task per core, shut down),
    in a fresh process: the fixed cost any Ray pipeline pays before its first document."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", RAY_FLOOR.format(cores=CORES)], check=True, capture_output=True)
    return time.perf_counter() - t


def datatrove_dedup(table: pa.Table, work: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    src = work / "dt-input"
    src.mkdir()
    with (src / "docs.jsonl").open("w") as f:
        for i, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    out = work / "dt"
    tasks = CORES
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(src)), MinhashDedupSignature(output_folder=str(out / "sigs"),
                                                                                 config=cfg)],
                          tasks=tasks, workers=tasks, logging_dir=str(out / "logs1")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=str(out / "sigs"),
                                                        output_folder=str(out / "buckets"), config=cfg)],
                          tasks=cfg.num_buckets, workers=tasks, logging_dir=str(out / "logs2")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=str(out / "buckets"),
                                                        output_folder=str(out / "remove"), config=cfg)],
                          tasks=1, logging_dir=str(out / "logs3")).run()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(src)),
                                    MinhashDedupFilter(input_folder=str(out / "remove")),
                                    JsonlWriter(str(out / "kept"))],
                          tasks=tasks, workers=tasks, logging_dir=str(out / "logs4")).run()
    seconds = time.perf_counter() - t
    kept = 0
    import gzip

    for p in (out / "kept").glob("*"):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:
            kept += sum(1 for _ in f)
    return seconds, table.num_rows - kept


def bench(name: str, corpus: Path, work: Path) -> dict:
    from fmforge.api.manifests import load

    manifest = pile_manifest(work, corpus)
    spec = load([manifest]).manifests[0].spec
    steps, table = per_step(spec, work)
    mb = sum(len(x.encode()) for x in table.column("text").to_pylist()) / 1e6
    whole_s, stats = whole_run(manifest)
    dedup_s, dedup_removed = fmforge_dedup(table, spec)
    dt_s, dt_removed = datatrove_dedup(table, work)
    floor_s = ray_floor()
    print(f"\n== {name}: {table.num_rows} documents, {mb:.1f} MB, {CORES} cores")
    print(f"{'step':24} {'seconds':>8} {'docs/s':>10} {'MB/s':>8}")
    for r in steps:
        print(f"{r['step']:24} {r['seconds']:8.3f} {r['docs_per_s']:10.1f} {r['mb_per_s']:8.2f}")
    f = {
        "corpus": {"name": name, "documents": table.num_rows, "mb": round(mb, 2), "cores": CORES},
        "steps": steps,
        # the steps' own work in one process, without Ray's start-up (a lower bound for the run)
        "fmforge_steps_one_process_s": round(sum(r["seconds"] for r in steps), 2),
        "fmforge_steps_mb_per_s_per_core": round(mb / sum(r["seconds"] for r in steps), 3),
        "fmforge_whole_run_s": round(whole_s, 2),
        "fmforge_whole_mb_per_s_per_core": round(mb / whole_s / CORES, 3),
        "fmforge_kept": stats["documents"]["kept"],
        "fmforge_whole_run_phases_s": stats["phases"],
        "fmforge_dedup_step_s": round(dedup_s, 3),
        "fmforge_dedup_removed": dedup_removed,
        "ray_empty_session_s": round(floor_s, 2),
        # what the goals leave for the whole run, Ray's own start and stop included
        "budget_for_3x_s": round(dt_s / 3, 2),
        "budget_for_1mb_per_s_per_core_s": round(mb / CORES, 2),
        "datatrove_minhash_dedup_s": round(dt_s, 2),
        "datatrove_removed": dt_removed,
        "whole_run_speedup_vs_datatrove_dedup": round(dt_s / whole_s, 2),
        "dedup_speedup_vs_datatrove": round(dt_s / dedup_s, 1),
    }
    f["goals"] = {
        "whole_run_3x": f["whole_run_speedup_vs_datatrove_dedup"] >= 3,
        "dedup_10x": f["dedup_speedup_vs_datatrove"] >= 10,
        "over_1mb_per_s_per_core": f["fmforge_whole_mb_per_s_per_core"] > 1,
    }
    print(f"steps in one process {f['fmforge_steps_one_process_s']}s "
          f"({f['fmforge_steps_mb_per_s_per_core']} MB/s on one core)")
    print(f"whole DataPile run {whole_s:.1f}s ({f['fmforge_whole_mb_per_s_per_core']} MB/s/core), "
          f"{f['whole_run_speedup_vs_datatrove_dedup']}x datatrove's dedup; fmforge dedup {dedup_s:.2f}s "
          f"removed {dedup_removed}; datatrove MinHash dedup {dt_s:.1f}s removed {dt_removed} "
          f"({f['dedup_speedup_vs_datatrove']}x)")
    print("whole run by phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in stats["phases"].items()))
    print(f"an empty Ray session (start, one task per core, shut down) {floor_s:.1f}s; the goals leave the whole run "
          f"{f['budget_for_3x_s']}s (3x datatrove) and {f['budget_for_1mb_per_s_per_core_s']}s (1 MB/s per core)")
    return f


def tokenizer_sample(corpus: Path) -> list[dict]:
    """What training the tokenizer on a sample costs: training time and bytes per token on 300
    held-out documents, for samples of 4, 8 and 16 MB and for all the rest of the corpus (the
    figures behind tokenizer.train.sampleBytes' default)."""
    from fmforge.api.manifests import load
    from fmforge.stages.datapile import tokenize as tk
    from fmforge.stages.datapile.sources import read_source

    spec = load([pile_manifest(corpus.parent / "tok", corpus)]).manifests[0].spec
    table = pa.concat_tables([read_source(s, corpus.parent / "tok")[0] for s in spec.sources])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    order = np.argsort(np.array(ids, dtype=object))
    held_out = [texts[i] for i in order[-300:]]
    held_bytes = sum(len(t.encode()) for t in held_out)
    rest = order[:-300]
    sizes = np.array([len(texts[i].encode()) for i in rest])
    rows = []
    for limit in (4_000_000, 8_000_000, 16_000_000, 0):
        take = rest if limit == 0 else rest[(np.cumsum(sizes) - sizes) < limit]
        sample = [texts[i] for i in take]
        t = time.perf_counter()
        tok = tk.train_tokenizer(sample, spec.tokenizer.train.vocab_size, spec.tokenizer.train.min_frequency)
        seconds = time.perf_counter() - t
        n = sum(len(e.ids) for e in tok.encode_batch(held_out, add_special_tokens=False))
        rows.append({"sample_mb": round(sum(len(x.encode()) for x in sample) / 1e6, 1), "train_s": round(seconds, 2),
                     "held_out_bytes_per_token": round(held_bytes / n, 3)})
        print(f"tokenizer on {rows[-1]['sample_mb']:6.1f} MB: trained in {seconds:5.2f}s, "
              f"{rows[-1]['held_out_bytes_per_token']:.3f} bytes/token on held-out text")
    return rows


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=("quickstart", "large", "xlarge", "both", "all"), default="both",
                    help="quickstart: top-level stdlib modules (~10 MB); large: the stdlib packages too (~23 MB); "
                    "xlarge: and the stdlib's test suites; both: quickstart and large; all: the three")
    ap.add_argument("--tokenizer-sample", action="store_true",
                    help="instead: tokenizer training time and held-out compression by sample size (xlarge corpus)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmforge-bench-"))
    results = []
    if args.tokenizer_sample:
        try:
            rows = tokenizer_sample(build_corpus(work / "corpus-xlarge", "--recursive", "--with-tests"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({"benchmark": "tokenizer-sample", "results": rows}))
        return 0
    try:
        if args.corpus in ("quickstart", "both", "all"):
            results.append(bench("quickstart", build_corpus(work / "corpus-quickstart"), work / "quickstart"))
        if args.corpus in ("large", "both", "all"):
            results.append(bench("large", build_corpus(work / "corpus-large", "--recursive"), work / "large"))
        if args.corpus in ("xlarge", "all"):
            results.append(bench("xlarge", build_corpus(work / "corpus-xlarge", "--recursive", "--with-tests"),
                                 work / "xlarge"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "datapile", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
