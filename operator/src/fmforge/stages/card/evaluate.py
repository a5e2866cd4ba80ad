"""The ModelCard's measurements: perplexity and masked-token accuracy on a pile split, and prompts.

Pile benchmarks run on Ray Data: the split is read from its pinned Iceberg snapshot by Ray Data
tasks and scored by a `Scorer` actor that holds the model; each batch comes back as a few
numbers per sequence (summed loss, tokens, correct predictions), which the driver adds up. A
model whose tokenizer is not the pile's reads the split's documents instead (`on_documents`,
bounded by maxDocuments): a `DocumentScorer` actor tokenizes each text with the model's own
tokenizer and scores it in windows, so any model can be measured on any pile. The prompts file
is small by nature (hand-written questions) and is answered on the driver with greedy decoding,
as written or (format chat) as the user's turn of the model's chat template. Called by
`fmforge.stages.card`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import InputError, InvalidSpec
from ..models import chat_prompt_ids, chat_template_of, vocabulary_difference


@dataclass
class Measured:
    """One benchmark's measurement of one model."""

    value: float
    """The metric's value."""
    samples: int
    """Sequences, documents or prompts measured."""
    details: list[dict[str, Any]] | None = None
    """Per-prompt outputs (prompts benchmarks), for the card."""
    dataset: dict[str, Any] | None = None
    """What was measured on, as the card's model-index names it."""


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
    import ray

    from .. import piles

    ds = piles.sequences(pile_version, split)
    if max_samples:
        ds = ds.limit(max_samples)
    out = ds.map_batches(Scorer, fn_constructor_kwargs={"model_dir": str(model_dir), "encoder": encoder,
                                                         "mask_probability": mask_probability, "seed": seed},
                         batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
    sums, sequences = _sums(out, ("nll", "tokens", "correct"), pile_version, split, "sequences", progress)
    loss = sums["nll"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": sums["correct"] / sums["tokens"],
            "samples": sequences}


def _sums(out, columns: tuple[str, ...], pile_version, split: str, what: str, progress) -> tuple[dict[str, float], int]:
    """Each column summed over a scored dataset, and its rows; an error that says what to change
    when nothing was scored (no `tokens`)."""
    sums = dict.fromkeys(columns, 0.0)
    rows = 0
    for b in out.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
        for c in columns:
            sums[c] += float(b[c].sum())
        rows += len(b[columns[0]])
        if progress is not None:
            progress(len(b[columns[0]]))
    if not sums["tokens"]:
        raise InputError(f"DataPile {pile_version.name} version {pile_version.snapshot_id} has no {split} {what} "
                         f"to evaluate on; use the other split or a pile with a validation split")
    return sums, rows


def same_tokenizer(pile_tok: Path, model_dir: Path) -> bool:
    """Whether the model's tokenizer maps every token of the pile's vocabulary to the same id (so
    the pile's packed token ids mean to the model what they meant to the pile)."""
    return vocabulary_difference(pile_tok, model_dir) is None


class DocumentScorer:
    """A Ray Data map_batches class for a model whose tokenizer is not the pile's: each document's
    text tokenized with the model's own tokenizer, an end-of-text appended, cut into windows of
    `window` tokens and scored; per document `nll` (summed) and `tokens` (predicted)."""

    def __init__(self, model_dir: str, window: int, batch: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.window, self.batch = window, batch
        self.eos = self.tok.eos_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        texts = [str(t) for t in batch["text"]]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        windows, owner = [], []
        for d, doc in enumerate(ids):
            doc = doc + ([self.eos] if self.eos is not None else [])
            for start in range(0, len(doc), self.window):
                piece = doc[start:start + self.window]
                if len(piece) > 1:  # a single token predicts nothing
                    windows.append(piece)
                    owner.append(d)
        nll, tokens = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
        for i in range(0, len(windows), self.batch):
            chunk = windows[i:i + self.batch]
            width = max(len(w) for w in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            valid = torch.zeros(len(chunk), width, dtype=torch.bool)
            for j, w in enumerate(chunk):
                x[j, :len(w)] = torch.tensor(w)
                valid[j, :len(w)] = True
            with torch.no_grad():
                logits = self.model(input_ids=x, attention_mask=valid.long()).logits[:, :-1]
            labels = x[:, 1:].masked_fill(~valid[:, 1:], -100)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                                     reduction="none").sum(1)
            for j, d in enumerate(owner[i:i + self.batch]):
                nll[d] += float(loss[j])
                tokens[d] += int((labels[j] != -100).sum())
        return {"nll": nll, "tokens": tokens}


def on_documents(pile_version, split: str, model_dir: Path, max_documents: int, window: int,
                 progress=None) -> dict[str, float]:
    """Loss and perplexity of a causal LM over the first `max_documents` documents of one split of
    a pile version, each tokenized with the model's own tokenizer (`DocumentScorer`)."""
    import ray

    from .. import piles

    ds = piles.documents(pile_version, split).limit(max_documents)
    out = ds.map_batches(DocumentScorer, fn_constructor_kwargs={"model_dir": str(model_dir), "window": window},
                         batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
    sums, documents = _sums(out, ("nll", "tokens"), pile_version, split, "documents", progress)
    loss = sums["nll"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "samples": documents, "tokens": sums["tokens"]}


#: How a prompts line looks, for the messages.
PROMPT_LINE = '{"prompt": "...", "expected": "..."}'


def read_prompts(path: Path, uri: str, max_samples: int | None) -> list[dict[str, Any]]:
    """The {prompt, expected} lines of a JSONL file (each with its line number, `line`, for the
    messages of later checks), the first `max_samples` of them; InputError naming the file, the
    line and the fix for the first line that cannot be used: bytes that are not UTF-8, a line
    that is not a JSON object, a prompt or expected answer missing or not a string, an empty
    prompt (nothing to answer), or no line at all."""
    if path.is_dir():
        raise InputError(f"{uri}: a directory ({path}), not a file; a prompts benchmark reads one JSONL file of "
                         f"{PROMPT_LINE} lines: fix the benchmark's uri")
    if not path.is_file():
        raise InputError(f"{uri}: no such file ({path}); fix the benchmark's uri")
    try:
        body = path.read_bytes()
    except OSError as e:
        raise InputError(f"{uri}: cannot be read ({e.strerror}); make {path} readable") from None
    try:
        # utf-8-sig: a byte-order mark, as some editors write, is not the first line's text
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        n = body.count(b"\n", 0, e.start) + 1
        column = e.start - (body.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(f"{uri} line {n}: not UTF-8 text (byte 0x{body[e.start]:02x} at byte {column} of the line); "
                         f"save the file as UTF-8") from None
    rows: list[dict[str, Any]] = []
    # Lines end at "\n" only, as editors count them (str.splitlines would also cut at the
    # U+2028 or U+0085 that a JSON string may hold raw).
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{uri} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must be an "
                             f"object like {PROMPT_LINE}") from None
        if not isinstance(row, dict):
            raise InputError(f"{uri} line {n}: a JSON {_json_type(row)}, not an object; each line must be an object "
                             f"like {PROMPT_LINE}")
        for key in ("prompt", "expected"):
            what = "prompt" if key == "prompt" else "expected answer"
            if key not in row:
                raise InputError(f"{uri} line {n}: no \"{key}\" field (the line has "
                                 f"{', '.join(map(repr, sorted(row))) or 'no fields'}); each line must be an object "
                                 f"like {PROMPT_LINE}")
            if not isinstance(row[key], str):
                raise InputError(f"{uri} line {n}: \"{key}\" is a JSON {_json_type(row[key])}, not a string; write "
                                 f"the {what} as a string")
        # (an empty expected answer stays allowed: `contains` finds it in every output, which
        # tests use to make a benchmark that always passes)
        if not row["prompt"].strip():
            raise InputError(f"{uri} line {n}: the prompt is empty; write the prompt, or remove the line")
        rows.append({"prompt": row["prompt"], "expected": row["expected"], "line": n})
    if not rows:
        raise InputError(f"{uri}: no prompts in the file ({'empty' if not body else 'blank lines only'}); write one "
                         f"{PROMPT_LINE} object per line")
    return rows[:max_samples] if max_samples else rows


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for the messages."""
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def context_length(config) -> int | None:
    """The positions a model reads at most (max_position_embeddings; GPT-2 calls it n_positions),
    or None where the config does not say."""
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def check_fit(rows: list[dict[str, Any]], model_dir: Path, config, max_new_tokens: int, uri: str,
              where: str, format: str = "text", model: str = "the model") -> None:
    """Every prompt leaves `max_new_tokens` of the model's context for the answer. A longer one
    would fail mid-benchmark (GPT-2: an index error in the position embeddings) or, with rotary
    positions, be answered past what the model was trained on and score as if it were the
    model's fault. InvalidSpec when maxNewTokens alone fills the context, or format chat asks a
    model without a chat template; InputError naming the file and the line of the first prompt
    too long."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if format == "chat":
        chat_template_of(tok, model, f"{where}.format")
    context = context_length(config)
    if context is None:
        return
    if max_new_tokens >= context:
        raise InvalidSpec(f"{where}.maxNewTokens: {max_new_tokens} new tokens leave no room for a prompt in the "
                          f"{context} tokens the model reads; set maxNewTokens below {context}")
    room = context - max_new_tokens
    # tokenized as on_prompts tokenizes them (special tokens included)
    for r, ids in zip(rows, prompt_ids(tok, [r["prompt"] for r in rows], format == "chat"), strict=True):
        if len(ids) > room:
            raise InputError(f"{uri} line {r['line']}: the prompt is {len(ids)} tokens; the model reads {context}, "
                             f"{max_new_tokens} of them kept for the answer (maxNewTokens), so a prompt may have "
                             f"{room}; shorten the prompt or lower maxNewTokens")


def score(metric: str, output: str, expected: str, rouge=None) -> float:
    """One answer's score: exact (equal once whitespace is normalised), contains (the expected text
    appears, ignoring case), rougeL (F-measure of the longest common subsequence, rouge-score)."""
    if metric == "exact":
        return float(" ".join(output.split()) == " ".join(expected.split()))
    if metric == "contains":
        return float(expected.strip().lower() in output.lower())
    return rouge.score(expected, output)["rougeL"].fmeasure


def prompt_ids(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    """The token ids each prompt reaches the model with: as written (special tokens included), or
    as the user's turn of the model's chat template up to where the assistant answers."""
    if chat:
        return [chat_prompt_ids(tok, p) for p in prompts]
    return tok(prompts)["input_ids"]


def on_prompts(rows: list[dict[str, str]], model_dir: Path, metric: str, max_new_tokens: int,
               progress=None, chat: bool = False) -> Measured:
    """Greedy answers of a decoder to the prompts (as written, or `chat`: in its chat template),
    scored against the expected answers."""
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
        ids = prompt_ids(tok, [r["prompt"] for r in chunk], chat)
        enc = tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)
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
