"""The ModelCard's measurements: perplexity and masked-token accuracy on a pile split, and prompts.

Pile benchmarks run on Ray Data: the split is read from its pinned Iceberg snapshot by Ray Data
tasks and scored by a `Scorer` actor that holds the model; each batch comes back as a few
numbers per sequence (summed loss, tokens, correct predictions), which the driver adds up. The
prompts file is small by nature (hand-written questions) and is answered on the driver with
greedy decoding. Called by `fmforge.stages.card`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import InputError


@dataclass
class Measured:
    value: float
    samples: int
    details: list[dict[str, Any]] | None = None
    """Per-prompt outputs (prompts benchmarks), for the card."""


class Scorer:
    """A Ray Data map_batches class: the model loaded once per actor, each batch of sequences
    scored into `nll` (summed negative log-likelihood), `tokens` (tokens scored) and `correct`
    (masked tokens predicted right; encoders)."""

    def __init__(self, model_dir: str, encoder: bool, mask_probability: float, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedTokenizerFast

        self.torch = torch
        self.encoder = encoder
        auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
        self.model = auto.from_pretrained(model_dir).eval()
        self.masker = None
        if encoder:
            from transformers import DataCollatorForLanguageModeling

            tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
            self.masker = DataCollatorForLanguageModeling(tok, mlm_probability=mask_probability, seed=seed)
            self.masker.create_rng("pt")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = batch["input_ids"]
        ids = torch.from_numpy((np.stack(list(ids)) if ids.dtype == object else ids).astype(np.int64))
        length = torch.from_numpy(batch["length"].astype(np.int64))
        valid = torch.arange(ids.shape[1])[None, :] < length[:, None]
        with torch.no_grad():
            if self.encoder:
                inputs, labels = self.masker.torch_mask_tokens(ids.clone(), special_tokens_mask=~valid)
                logits = self.model(input_ids=inputs, attention_mask=valid.long()).logits
            else:
                logits = self.model(input_ids=ids, attention_mask=valid.long()).logits[:, :-1]
                labels = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                                    reduction="none")
            scored = labels != -100
            correct = (logits.argmax(-1) == labels) & scored
        return {"nll": nll.sum(1).double().numpy(), "tokens": scored.sum(1).numpy(),
                "correct": correct.sum(1).numpy()}


def on_pile(pile_version, split: str, model_dir: Path, encoder: bool, max_samples: int | None,
            mask_probability: float, seed: int, progress=None) -> dict[str, float]:
    """Loss, perplexity and masked-token accuracy of the model over one split of a pile version."""
    from .. import piles

    import ray

    ds = piles.sequences(pile_version, split)
    if max_samples:
        ds = ds.limit(max_samples)
    out = ds.map_batches(Scorer, fn_constructor_kwargs={"model_dir": str(model_dir), "encoder": encoder,
                                                         "mask_probability": mask_probability, "seed": seed},
                         batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
    nll = tokens = correct = sequences = 0.0
    for b in out.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
        nll += float(b["nll"].sum())
        tokens += float(b["tokens"].sum())
        correct += float(b["correct"].sum())
        sequences += len(b["nll"])
        if progress is not None:
            progress(len(b["nll"]))
    if not tokens:
        raise InputError(f"DataPile {pile_version.name} version {pile_version.snapshot_id} has no {split} sequences "
                         f"to evaluate on; use the other split or a pile with a validation split")
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / tokens,
            "samples": int(sequences)}


def read_prompts(path: Path, uri: str, max_samples: int | None) -> list[dict[str, str]]:
    """The {prompt, expected} lines of a JSONL file; a broken line fails naming it and the fix."""
    if not path.is_file():
        raise InputError(f"{uri}: no such file ({path}); fix the benchmark's uri")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{uri} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must be an "
                             f"object like {{\"prompt\": \"...\", \"expected\": \"...\"}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                row.get("expected"), str):
            raise InputError(f"{uri} line {n}: needs string fields \"prompt\" and \"expected\"; got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        rows.append({"prompt": row["prompt"], "expected": row["expected"]})
    if not rows:
        raise InputError(f"{uri}: no prompts in the file; add lines of {{\"prompt\": ..., \"expected\": ...}}")
    return rows[:max_samples] if max_samples else rows


def score(metric: str, output: str, expected: str, rouge=None) -> float:
    """One answer's score: exact (equal once whitespace is normalised), contains (the expected text
    appears, ignoring case), rougeL (F-measure of the longest common subsequence, rouge-score)."""
    if metric == "exact":
        return float(" ".join(output.split()) == " ".join(expected.split()))
    if metric == "contains":
        return float(expected.strip().lower() in output.lower())
    return rouge.score(expected, output)["rougeL"].fmeasure


def on_prompts(rows: list[dict[str, str]], model_dir: Path, metric: str, max_new_tokens: int,
               progress=None) -> Measured:
    """Greedy answers of a decoder to the prompts, scored against the expected answers."""
    import torch
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"  # generation continues each prompt at its end
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    rouge = rouge_scorer.RougeScorer(["rougeL"]) if metric == "rougeL" else None
    details, total = [], 0.0
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            s = score(metric, text, r["expected"], rouge)
            total += s
            details.append({"prompt": r["prompt"], "expected": r["expected"], "output": text, "score": s})
        if progress is not None:
            progress(len(chunk))
    return Measured(total / len(rows), len(rows), details)
