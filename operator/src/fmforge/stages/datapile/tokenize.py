"""Train or load the pile's tokenizer, tokenize, and pack fixed-length sequences.

A byte-level BPE trained with Hugging Face `tokenizers` on the kept documents (or a tokenizer
loaded from a URI), saved in Hugging Face layout so transformers loads it as is. Documents are
split into train/validation by a hash of their id (stable across runs and machines), encoded in
Rust (`encode_batch`) and packed on the Ray workers, one piece of the pile at a time: laid end to
end with an end-of-text token at every document boundary and cut into sequences of
`sequenceLength` tokens (a piece's last one per split padded, with its real length).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def training_sample(ids: list[str], sizes: np.ndarray, splits: np.ndarray, max_bytes: int) -> list[int]:
    """Indices of the documents a tokenizer trains on: training-split documents in the order of
    their id (a content hash, so the order is random and stable), until `max_bytes` of text
    (`sizes`: each document's UTF-8 bytes; 0: all of them). Falls back to every document when
    the training split is empty."""
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    train = order[splits[order] == "train"] if len(order) else order
    if not len(train):
        train = np.arange(len(sizes))
    if max_bytes > 0:
        before = np.cumsum(sizes[train]) - sizes[train]  # bytes taken before each document
        train = train[before < max_bytes]
    return sorted(int(i) for i in train)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE of `vocab_size` trained on `texts`, with the end-of-text and padding
    tokens; the plain `tokenizers.Tokenizer`."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS, PAD], show_progress=False)
    return tok._tokenizer  # the plain `tokenizers.Tokenizer`


def load_tokenizer(path: Path | str, fs=None):
    """The tokenizer at `path` (its tokenizer.json, or the directory holding it) on the pyarrow
    filesystem `fs` (local when None): file://, pvc:// and s3:// URIs all resolve to one."""
    import pyarrow.fs as pafs
    from tokenizers import Tokenizer

    fs = fs or pafs.LocalFileSystem()
    path = str(path).rstrip("/")
    try:
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
        with fs.open_input_file(f"{path}/tokenizer.json" if is_dir else path) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError) as e:
        raise InvalidSpec(f"tokenizer.uri: no readable tokenizer.json at {path} ({e}); point it at a tokenizer "
                          f"directory in Hugging Face layout") from e
    return Tokenizer.from_str(text)


def save_tokenizer(tok, out: Path) -> None:
    """Hugging Face layout: tokenizer.json plus the config transformers reads."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        tok.save(str(out / "tokenizer.json"))
    except Exception as e:
        # tokenizers (Rust) raises a plain Exception, "No space left on device (os error 28)":
        # an OSError again, so that a full or read-only disk is reported as one
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out / "tokenizer.json")) from e
    eos = EOS if tok.token_to_id(EOS) is not None else None
    pad = PAD if tok.token_to_id(PAD) is not None else eos
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": eos,
        "pad_token": pad, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos,
                                                            "pad_token": pad}, indent=2))


def special_ids(tok) -> tuple[int, int]:
    """The end-of-text id (document boundary) and the padding id (EOS when there is no PAD)."""
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise InvalidSpec(f"the tokenizer has no {EOS} token to mark document boundaries; "
                          f"load one that has it or let fmforge train one (tokenizer.train)")
    pad = tok.token_to_id(PAD)
    return eos, eos if pad is None else pad


@functools.lru_cache(maxsize=2)
def from_json(tokenizer_json: str):
    """The tokenizer of a tokenizer.json text, parsed once per process (cached)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def encode(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    """Token ids of each document of `batch`: the `text` column replaced by `ids` (list<int32>),
    the other columns kept. Rust encodes the batch on all threads; the tokenizer is parsed once
    per worker."""
    tok = from_json(tokenizer_json)
    encode_fn = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets where supported
    encs = encode_fn(batch.column("text").to_pylist(), add_special_tokens=False)
    ids = pa.array([e.ids for e in encs], pa.list_(pa.int32()))
    return batch.drop_columns(["text"]).append_column("ids", ids)


def pack(ids: pa.ChunkedArray | pa.ListArray, splits: np.ndarray, eos: int, pad: int,
         seq_len: int, first_seq: int = 0) -> tuple[pa.Table, dict[str, int]]:
    """Packed sequences of both splits, and the token counts per split.

    `ids` holds each document's token ids, in document order. Per split, the documents are laid
    end to end with EOS after each (the document boundary), then cut into rows of `seq_len`; the
    last row is padded and keeps its real length. Sequence ids count from `first_seq`.
    Vectorised over the Arrow offsets: no loop over documents or tokens in Python."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.list_(pa.int32()))
    tables, tokens = [], {}
    seq0 = first_seq
    for split in ("train", "validation"):
        idx = np.flatnonzero(splits == split)
        if not len(idx):
            tokens[split] = 0
            continue
        docs = ids.take(pa.array(idx, pa.int64()))
        lengths = pc.list_value_length(docs).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(docs).to_numpy(zero_copy_only=False)
        n = len(lengths)
        total = int(lengths.sum()) + n
        flat = np.empty(total, dtype=np.int32)
        # document k's tokens shift right by k (the k EOS before them); its EOS follows them
        ends = np.cumsum(lengths) + np.arange(n)
        mask = np.ones(total, dtype=bool)
        mask[ends] = False
        flat[mask] = values
        flat[ends] = eos
        tokens[split] = total
        nseq = -(-total // seq_len)
        padded = np.full(nseq * seq_len, pad, dtype=np.int32)
        padded[:total] = flat
        length = np.full(nseq, seq_len, dtype=np.int32)
        length[-1] = total - (nseq - 1) * seq_len
        rows = pa.FixedSizeListArray.from_arrays(pa.array(padded), seq_len).cast(pa.list_(pa.int32()))
        tables.append(pa.table({"seq": np.arange(seq0, seq0 + nseq, dtype=np.int64), "split": [split] * nseq,
                                "input_ids": rows, "length": length}, schema=SEQ_SCHEMA))
        seq0 += nseq
    table = pa.concat_tables(tables) if tables else SEQ_SCHEMA.empty_table()
    return table, tokens
