"""The DataPile manifests the stage tests share: the full test pile and a small one (prose and the
project-written samples only), as dicts to copy and change."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PILE = {
    "apiVersion": "fmforge.io/v1alpha1",
    "kind": "DataPile",
    "metadata": {"name": "pydocs"},
    "spec": {
        "sources": [
            {"name": "python-docs", "uri": "file://corpus/prose/", "format": "jsonl", "license": "PSF-2.0"},
            {"name": "python-code", "uri": "file://corpus/code/", "format": "code", "include": ["*.py"],
             "license": "PSF-2.0"},
            {"name": "licenses", "uri": "file://corpus/licenses/", "format": "text"},
            {"name": "extra", "uri": "file://corpus/extra/", "format": "jsonl", "idField": "id"},
        ],
        "filters": [
            {"type": "language", "allow": ["en"]},
            {"type": "hap", "threshold": 0.9},
            {"type": "license", "allow": ["MIT", "Apache-2.0", "BSD-3-Clause", "PSF-2.0", "CC0-1.0"],
             "unknown": "keep"},
            {"type": "pii", "action": "redact"},
            {"type": "quality", "preset": "gopher", "rules": {"minWords": 20}},
            {"type": "length", "minWords": 20},
        ],
        "dedup": {"exact": True, "fuzzy": {"threshold": 0.8, "numPerm": 112, "bands": 14, "shingleSize": 5}},
        # a budget below the kept text, so the sample is a strict subset
        "tokenizer": {"train": {"vocabSize": 2048, "sampleBytes": "1Mi"}},
        "tokenize": {"sequenceLength": 128},
        "publish": {"tags": ["v1"]},
        "resources": {"workers": 1, "cpusPerWorker": 2},
    },
}

SMALL = copy.deepcopy(PILE)
SMALL["spec"]["sources"] = [
    {"name": "python-docs", "uri": "file://corpus/prose/", "format": "jsonl", "license": "PSF-2.0"},
    {"name": "extra", "uri": "file://corpus/extra/", "format": "jsonl", "idField": "id"},
]

#: A small pile for the training, evaluation and tuning tests: prose and code, no categorizer or
#: filters, exact dedup only, a 512-token vocabulary, 64-token sequences.
MINI = {
    "apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "metadata": {"name": "mini"},
    "spec": {
        "sources": [{"name": "prose", "uri": "file://corpus/prose/", "format": "jsonl", "license": "PSF-2.0"},
                    {"name": "code", "uri": "file://corpus/code/", "format": "code", "include": ["*.py"]}],
        "categorize": {"naturalLanguage": {"enabled": False}, "programmingLanguage": {"enabled": False}},
        "filters": [], "dedup": {"exact": True, "fuzzy": {"enabled": False}},
        "tokenizer": {"train": {"vocabSize": 512}}, "tokenize": {"sequenceLength": 64},
        "split": {"validationFraction": 0.1}, "publish": {"tags": ["v1"]},
    },
}


def expected_dedup(spec, table: pa.Table) -> tuple[list[str], list[str], list[str], int]:
    """The stage's steps in this process, over a whole source table as one piece and one shuffle
    partition (the shape of the pipeline before it streamed): the kept ids, the exact and the
    fuzzy duplicates, and the pairs kept as edges."""
    from fmforge.stages.datapile import dedup as dd
    from fmforge.stages.datapile import workers as wk

    whole = wk.process_batch(table, spec)
    alive = whole.filter(pc.is_null(whole.column("dropped")))
    ids = np.asarray(alive.column("id").to_pylist(), dtype=object)
    h = np.stack([alive.column("hash_hi").to_numpy(), alive.column("hash_lo").to_numpy()], axis=1)
    exact, _ = dd.exact_duplicates(ids, h) if spec.dedup.exact else (np.array([], dtype=object), None)
    fz = spec.dedup.fuzzy
    reaches = pc.and_(pc.is_null(whole.column("dropped")),
                      pc.invert(pc.is_in(whole.column("id"), value_set=pa.array(exact, pa.string()))))
    bands = wk.band_piece(whole, reaches.to_numpy(zero_copy_only=False), fz.bands, 1)
    pairs, _ = wk.pairs_of_bands(bands)
    if fz.verify:
        pairs = wk.verify_pairs(fz.threshold, pairs, whole.select(["id", "minhash"]))
    fuzzy, _, _ = dd.components(np.asarray(pairs.column("a").to_pylist(), dtype=object),
                                np.asarray(pairs.column("b").to_pylist(), dtype=object))
    return sorted(set(ids) - set(exact) - set(fuzzy)), list(exact), list(fuzzy), pairs.num_rows
