#!/usr/bin/env python3
"""The LSH band grouping of the DataPile, two ways, on the same rows in one run:

  - Ray Data: `from_arrow(pieces).groupby(["band", "key"]).map_groups(pairs)`;
  - fmforge: the hash shuffle of stages/datapile/workers.py (each piece split by key into P
    parts by a task with P returns; one `pairs_of_bands` task per part).

    python tests/bench/bench_bands.py [--docs 20000] [--bands 14]

Synthetic band keys: every document's keys random, and 1,000 documents copying another's keys
(1,000 near-duplicate pairs, found in every band). Prints seconds and pairs of each. Not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from fmforge.stages import raysession
from fmforge.stages.datapile import workers as wk


def split(piece: pa.Table, parts: int):
    """One piece's rows in `parts` parts by key (what band_piece does after computing the keys)."""
    k = piece.column("key").to_numpy() % np.uint64(parts)
    return tuple(piece.filter(pa.array(k == i)) for i in range(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--bands", type=int, default=14)
    args = ap.parse_args()
    raysession.start(Path(tempfile.mkdtemp()), 2)
    import ray

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, size=(args.docs, args.bands), dtype=np.uint64)
    dup = rng.choice(args.docs, 2000, replace=False)
    keys[dup[:1000]] = keys[dup[1000:]]
    ids = pa.array([f"{i:020x}" for i in range(args.docs)])
    rows = pa.table({"band": pa.array(np.tile(np.arange(args.bands, dtype=np.int16), args.docs)),
                     "key": pa.array(keys.reshape(-1)),
                     "id": ids.take(pa.array(np.repeat(np.arange(args.docs), args.bands)))})
    pieces = [rows.slice(i * len(rows) // 8, len(rows) // 8) for i in range(8)]

    def pairs_udf(g: pa.Table) -> pa.Table:
        g = g.sort_by("id")
        return pa.table({"a": g.column("id")[1:], "b": pa.array([g.column("id")[0].as_py()] * (g.num_rows - 1))})

    t = time.perf_counter()
    n_ray_data = ray.data.from_arrow(pieces).groupby(["band", "key"]).map_groups(
        pairs_udf, batch_format="pyarrow").count()
    ray_data_s = time.perf_counter() - t

    t = time.perf_counter()
    parts = wk.band_partitions(len(rows))
    splits = [wk.remote(split, num_returns=parts).remote(ray.put(p), parts) for p in pieces]
    splits = [[s] if parts == 1 else s for s in splits]
    out = [wk.remote(wk.pairs_of_bands, num_returns=2).remote(*[s[i] for s in splits])
           for i in range(parts)]
    pairs = pa.concat_tables(ray.get([o[0] for o in out])).group_by(["a", "b"]).aggregate([])
    shuffle_s = time.perf_counter() - t
    raysession.shutdown()
    print(f"{len(rows)} band rows ({args.docs} documents x {args.bands} bands), 2 CPUs, {parts} partitions")
    print(f"  Ray Data groupby + map_groups: {ray_data_s:6.2f} s  ({n_ray_data} pairs, one per band)")
    print(f"  fmforge task shuffle:          {shuffle_s:6.2f} s  ({pairs.num_rows} distinct pairs)")
    print(json.dumps({"rows": len(rows), "ray_data_s": round(ray_data_s, 2), "shuffle_s": round(shuffle_s, 2),
                      "ratio": round(ray_data_s / shuffle_s, 1)}))


if __name__ == "__main__":
    main()
