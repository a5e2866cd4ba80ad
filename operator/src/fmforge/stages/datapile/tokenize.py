"""Train or load the pile's tokenizer, tokenize, and pack fixed-length sequences.

A byte-level BPE trained with Hugging Face `tokenizers` on the kept documents (or a tokenizer
loaded from a URI), saved in Hugging Face layout so transformers loads it as is. Documents are
split into train/validation by a hash of their id (stable across runs and machines), encoded in
Rust (`encode_batch`, all cores), joined with an end-of-text token at every document boundary,
and cut into sequences of `sequenceLength` tokens (the last one padded, with its real length).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..base import InvalidSpec

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SEQ_SCHEMA = pa.schema([("seq", pa.int64()), ("split", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("length", pa.int32())])


def split_of(ids: list[str], validation_fraction: float) -> np.ndarray:
    """'validation' or 'train' per document, from the first 32 bits of its (hex) id."""
    if not ids:
        return np.array([], dtype=object)
    bucket = np.array([int(i[:8], 16) for i in ids], dtype=np.uint64) / float(2**32)
    return np.where(bucket < validation_fraction, "validation", "train").astype(object)


def training_sample(ids: list[str], texts: list[str], splits: np.ndarray, max_bytes: int) -> list[int]:
    """Indices of the documents a tokenizer trains on: training-split documents in the order of
    their id (a content hash, so the order is random and stable), until `max_bytes` of UTF-8 text
    (0: all of them). Falls back to every document when the training split is empty."""
    train = [i for i in np.argsort(np.array(ids, dtype=object), kind="stable") if splits[i] == "train"]
    if not train:
        train = list(range(len(texts)))
    if max_bytes <= 0:
        return sorted(train)
    picked, total = [], 0
    for i in train:
        if total >= max_bytes:
            break
        picked.append(int(i))
        total += len(texts[i].encode())
    return sorted(picked)


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS, PAD], show_progress=False)
    return tok._tokenizer  # the plain `tokenizers.Tokenizer`


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.exists():
        raise InvalidSpec(f"tokenizer.uri: no tokenizer.json at {path}")
    return Tokenizer.from_file(str(f))


def save_tokenizer(tok, out: Path) -> None:
    """Hugging Face layout: tokenizer.json plus the config transformers reads."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = EOS if tok.token_to_id(EOS) is not None else None
    pad = PAD if tok.token_to_id(PAD) is not None else eos
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": eos,
        "pad_token": pad, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos,
                                                            "pad_token": pad}, indent=2))


def pack(tok, texts: list[str], splits: np.ndarray, seq_len: int) -> tuple[pa.Table, dict[str, int]]:
    """Packed sequences of both splits, and the token counts per split."""
    eos = tok.token_to_id(EOS)
    pad = tok.token_to_id(PAD)
    if eos is None:
        raise InvalidSpec(f"the tokenizer has no {EOS} token to mark document boundaries")
    pad = eos if pad is None else pad
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    tables, tokens = [], {}
    seq0 = 0
    for split in ("train", "validation"):
        idx = np.flatnonzero(splits == split)
        if not len(idx):
            tokens[split] = 0
            continue
        encs = encode([texts[i] for i in idx], add_special_tokens=False)
        # one flat buffer: each document's ids followed by EOS (the document boundary)
        flat = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encs), dtype=np.int32)
        tokens[split] = int(len(flat))
        nseq = -(-len(flat) // seq_len)
        padded = np.full(nseq * seq_len, pad, dtype=np.int32)
        padded[: len(flat)] = flat
        length = np.full(nseq, seq_len, dtype=np.int32)
        length[-1] = len(flat) - (nseq - 1) * seq_len
        ids = pa.FixedSizeListArray.from_arrays(pa.array(padded), seq_len).cast(pa.list_(pa.int32()))
        tables.append(pa.table({"seq": np.arange(seq0, seq0 + nseq, dtype=np.int64), "split": [split] * nseq,
                                "input_ids": ids, "length": length}, schema=SEQ_SCHEMA))
        seq0 += nseq
    table = pa.concat_tables(tables) if tables else SEQ_SCHEMA.empty_table()
    return table, tokens
