"""The edge package of a Deployment (`target: edge`): the model exported to ONNX.

Called by the Deployment stage. The package is a directory named by its digest holding
`model.onnx` (int8 dynamic quantization with onnxruntime when `quantize: int8`), the model's
tokenizer files and `manifest.json`: inputs, outputs, files with their digests, the source
model's digest, and how closely the package reproduces the torch model on a sample (measured at
export, so a package that drifts is caught before it ships).

The export uses torch's TorchScript-based ONNX exporter (`dynamo=False`): the dynamo-based one
needs onnxscript and gains nothing for these models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import file_digest
from .predictor import is_classifier

#: Most absolute difference of fp32 ONNX logits from torch's that the export accepts.
FP32_TOLERANCE = 1e-3
#: Fewest share of positions where int8 ONNX picks torch's top-1 token or label.
INT8_TOP1_AGREEMENT = 0.9


def _sample(tokenizer, classifier: bool) -> dict[str, np.ndarray]:
    texts = ["The standard library keeps a module for each task.", "def read(path):\n    return open(path).read()"]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if classifier and "token_type_ids" in batch else ())
    return {k: batch[k].astype(np.int64) for k in names}


def export(model_dir: Path, out_root: Path, quantize: str, model_digest: str) -> tuple[Path, dict[str, Any]]:
    """Export the model in `model_dir` (of `model_digest`) into a package under `out_root`;
    (package directory, manifest)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classifier = is_classifier(model_dir)
    model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # a causal LM's tokenizer often has none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    sample = _sample(tokenizer, classifier)
    names = list(sample)

    class Logits(torch.nn.Module):
        """The model as ONNX sees it: named integer tensors in, logits out (no cache)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            kwargs = dict(zip(names, tensors, strict=True))
            return self.inner(**kwargs, **({} if classifier else {"use_cache": False})).logits

    tmp = out_root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    fp32 = tmp / "model.fp32.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"} if classifier else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        # The reference first: tracing for the export leaves the module in a state whose own
        # outputs differ afterwards (measured: by 0.2 on a padded batch), while the exported graph
        # matches a freshly loaded model to 1e-7.
        ref = Logits(model)(*(torch.from_numpy(sample[n]) for n in names)).numpy()
        torch.onnx.export(Logits(model), tuple(torch.from_numpy(sample[n]) for n in names), str(fp32),
                          input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    final = tmp / "model.onnx"
    fp32_bytes = fp32.stat().st_size
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(final), weight_type=QuantType.QInt8)
        fp32.unlink()
    else:
        fp32.rename(final)

    # How closely the package reproduces torch, and how fast, on the sample.
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], sample)[0]
    mask = sample["attention_mask"].astype(bool)
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agreement = float((top_ref == top_got).mean() if classifier else (top_ref == top_got)[mask].mean())
    # Logits at padding positions are meaningless (and differ between runtimes): compare the rest.
    max_diff = float(np.abs(ref - got).max() if classifier else np.abs(ref - got)[mask].max())
    if quantize == "none" and max_diff > FP32_TOLERANCE:
        raise RuntimeError(f"the ONNX export differs from torch by {max_diff:.2e} (at most {FP32_TOLERANCE} allowed)")
    if quantize == "int8" and agreement < INT8_TOP1_AGREEMENT:
        raise RuntimeError(f"the int8 package agrees with torch on {agreement:.0%} of top-1 predictions (at least "
                           f"{INT8_TOP1_AGREEMENT:.0%} needed); use quantize: none")

    def timed(fn, n: int = 20) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1000

    with torch.no_grad():
        torch_ms = timed(lambda: model(**{k: torch.from_numpy(v) for k, v in sample.items()}))
    onnx_ms = timed(lambda: session.run(["logits"], sample))

    tokenizer.save_pretrained(str(tmp))  # with the pad token the export set, so batches work as here
    files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
    manifest = {
        "format": "onnx", "opset": 17, "quantize": quantize, "model": {"digest": model_digest},
        "task": "sequence-classification" if classifier else "causal-lm",
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names],
        "outputs": [{"name": "logits", "dtype": "float32",
                     "shape": ["batch", "labels"] if classifier else ["batch", "sequence", "vocabulary"]}],
        "labels": model.config.id2label if classifier else None,
        "files": files,
        "fidelity": {"sampleTop1Agreement": agreement, "maxAbsLogitDifference": max_diff},
        "latencyMs": {"torch": round(torch_ms, 3), "onnx": round(onnx_ms, 3),
                      "batch": int(sample["input_ids"].shape[0]), "sequence": int(sample["input_ids"].shape[1])},
        "bytes": {"onnx": final.stat().st_size, "onnxFp32": fp32_bytes,
                  "torch": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))},
    }
    digest = "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    manifest["digest"] = digest
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    package = out_root / digest.split(":")[1][:16]
    if package.exists():  # the same bytes were packaged before: keep them
        shutil.rmtree(tmp)
    else:
        tmp.rename(package)
    return package, manifest
