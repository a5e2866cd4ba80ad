"""The DataPile manifests the stage tests share: the full test pile and a small one (prose and the
project-written samples only), as dicts to copy and change."""

from __future__ import annotations

import copy

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
