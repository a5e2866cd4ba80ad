"""Train or load the pile's tokenizer, tokenize, and pack fixed-length sequences.

A byte-level BPE trained with Hugging Face `tokenizers` on the kept documents (or a tokenizer
loaded from a URI), saved in Hugging Face layout so transformers loads it as is. Documents are
split into train/validation by a hash of their id (stable across runs and machines), encoded and
packed on the Ray workers, one piece of the pile at a time: laid end to end with an end-of-text
token at every document boundary and cut into sequences of `sequenceLength` tokens (a piece's
last one per split padded, with its real length).

The encoder: tiktoken where it gives the same ids as the tokenizer, else `tokenizers` itself.
A byte-level BPE (the one the DataPile trains; GPT-2 and Llama-3 style ones users bring) is
rebuilt as a tiktoken `Encoding` from its vocabulary (token bytes → id, the merge priority),
its pre-tokenizer pattern and its added tokens; `tiktoken_encoding` refuses, with the reason,
every tokenizer whose behaviour tiktoken cannot reproduce (a normalizer, another model, a prefix
space, added tokens that strip or match whole words, merges out of id order, a token its own
merges do not rebuild). What it accepts is still checked while encoding: `encode` compares
tiktoken's ids with `tokenizers`' on a sample of every piece and encodes the whole piece with
`tokenizers` on any difference, reporting it (tests/stages/test_encoder.py proves equality on
the quickstart corpus and on hostile strings).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..base import InvalidSpec

log = logging.getLogger(__name__)

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


#: The pre-tokenizer pattern of `tokenizers`' ByteLevel(use_regex=True), GPT-2's, as
#: tokenizers/src/pre_tokenizers/byte_level.rs writes it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

#: One document in CHECK_EVERY of each piece (the first, then every CHECK_EVERY-th) is encoded by
#: `tokenizers` too and compared with tiktoken's ids: about 3% more encoding work.
CHECK_EVERY = 32


def _byte_chars() -> dict[str, int]:
    """The character byte-level BPE writes for each byte (GPT-2's table), inverted. Written here
    because `tokenizers` does not expose it (ByteLevel.alphabet() gives the characters, not which
    byte each stands for)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pattern(pre: dict | None) -> str:
    """The split pattern of a byte-level pre-tokenizer tiktoken can reproduce; ValueError (the
    reason) for any other."""
    def byte_level(p: dict, regex: bool) -> None:
        if p.get("type") != "ByteLevel" or p.get("add_prefix_space") or bool(p.get("use_regex", True)) != regex:
            raise ValueError(f"pre-tokenizer {json.dumps(p)} is not a byte-level split tiktoken reproduces")

    if pre is None:
        raise ValueError("no pre-tokenizer (not a byte-level BPE)")
    if pre.get("type") == "ByteLevel":
        byte_level(pre, True)
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split":
        split = steps[0]
        pattern = split.get("pattern", {})
        if "Regex" in pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            byte_level(steps[1], False)
            return pattern["Regex"]
    raise ValueError(f"pre-tokenizer {pre.get('type')} is not a byte-level split tiktoken reproduces")


def tiktoken_encoding(tokenizer_json: str) -> Any:
    """A tiktoken `Encoding` that encodes like this tokenizer (added tokens matched in the text,
    as `tokenizers` does); ValueError, saying why, for a tokenizer it cannot reproduce exactly."""
    import tiktoken

    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None:
        raise ValueError(f"it has a normalizer ({spec['normalizer'].get('type')})")
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        raise ValueError("it truncates or pads")
    if model.get("type") != "BPE":
        raise ValueError(f"its model is {model.get('type')}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise ValueError(f"its BPE sets {key}")
    pattern = _pattern(spec.get("pre_tokenizer"))
    special = _added_tokens(spec.get("added_tokens") or [])
    chars = _byte_chars()
    ranks = _ranks(model, special, chars)
    if not model.get("ignore_merges"):
        # tiktoken takes a pre-token that is a token as is; tokenizers (without ignore_merges)
        # merges its bytes, which for a few tokens ends elsewhere
        _check_tokens_rebuild(tokenizer_json, ranks, chars)
    return tiktoken.Encoding("fmforge", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def _added_tokens(added: list[dict]) -> dict[str, int]:
    """The added tokens as tiktoken's special tokens (matched in the text before the split, as
    `tokenizers` matches them); ValueError for those it would match differently."""
    for t in added:
        if t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
            raise ValueError(f"added token {t['content']!r} strips or matches whole words only")
    special = {t["content"]: int(t["id"]) for t in added}
    contents = sorted(special)
    # tokenizers matches the longest added token at a place, tiktoken the first in its own order
    if any(b.startswith(a) for a, b in zip(contents, contents[1:], strict=False)):
        raise ValueError("one added token is a prefix of another")
    return special


def _ranks(model: dict, special: dict[str, int], chars: dict[str, int]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks: each vocabulary token's bytes → its id; ValueError when the ids
    are not the merge order."""
    ranks: dict[bytes, int] = {}
    for token, i in model.get("vocab", {}).items():
        if token in special and special[token] == i:
            continue  # an added token is matched in the text, never merged
        if any(c not in chars for c in token):
            raise ValueError(f"vocabulary token {token!r} is not byte-level")
        ranks[bytes(chars[c] for c in token)] = int(i)
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("not every byte is a token")
    # tiktoken merges by the rank of the merged token, tokenizers by the merge's place in the
    # list: the same order only when the merged tokens' ids never decrease along the list
    last, made = -1, set()
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if any(c not in chars for c in a + b):
            raise ValueError(f"merge {a!r} + {b!r} is not byte-level")
        merged = bytes(chars[c] for c in a + b)
        if merged not in ranks or ranks[merged] < last:
            raise ValueError(f"merge {a!r} + {b!r} does not follow the token ids")
        last = ranks[merged]
        made.add(merged)
    if any(len(t) > 1 and t not in made for t in ranks):
        raise ValueError("a multi-byte token is made by no merge")
    return ranks


def _check_tokens_rebuild(tokenizer_json: str, ranks: dict[bytes, int], chars: dict[str, int]) -> None:
    """ValueError when the BPE's merges over a token's own bytes do not give that token back."""
    tok = from_json(tokenizer_json)
    to_char = {b: c for c, b in chars.items()}
    for token, i in ranks.items():
        if len(token) > 1:
            got = [t.id for t in tok.model.tokenize("".join(to_char[b] for b in token))]
            if got != [i]:
                raise ValueError(f"its merges split token {i} ({token!r}) into {got}")


@functools.lru_cache(maxsize=2)
def encoder_of(tokenizer_json: str) -> tuple[Any | None, str]:
    """(tiktoken Encoding, "") for a tokenizer tiktoken reproduces, else (None, why not); built
    once per process (cached)."""
    try:
        return tiktoken_encoding(tokenizer_json), ""
    except ValueError as e:
        return None, str(e)


@dataclass
class Encoding:
    """Which encoder encoded a piece, and what its check against `tokenizers` found."""

    encoder: str
    """tiktoken or tokenizers."""
    why: str = ""
    """Why `tokenizers` encoded it: what tiktoken cannot reproduce, or the difference the check found."""
    checked: int = 0
    """Documents encoded by both and compared."""
    differed: bool = False
    """tiktoken's ids differed from `tokenizers`' on the sample: the piece was encoded again by `tokenizers`."""
    seconds: float = 0.0
    """Seconds spent encoding (and checking)."""


def encode_texts(texts: list[str], tokenizer_json: str, check_every: int = CHECK_EVERY) -> tuple[list, Encoding]:
    """Token ids of each text (no special tokens added; added tokens in the text are matched), and
    which encoder made them: tiktoken, checked against `tokenizers` on every `check_every`-th
    text, or `tokenizers` (tiktoken cannot reproduce the tokenizer, or its ids differed)."""
    t0 = time.perf_counter()
    enc, why = encoder_of(tokenizer_json)
    if enc is not None:
        ids = enc.encode_batch(texts, num_threads=_threads(), allowed_special="all", disallowed_special=())
        sample = list(range(0, len(texts), max(check_every, 1)))
        want = _hf_encode([texts[i] for i in sample], tokenizer_json)
        for i, w in zip(sample, want, strict=True):
            if ids[i] != w:
                at = next((k for k, (x, y) in enumerate(zip(ids[i], w, strict=False)) if x != y), min(len(w),
                                                                                                   len(ids[i])))
                why = (f"tiktoken's ids differ from tokenizers' in a document of {len(texts[i])} characters at token "
                       f"{at} (tiktoken {ids[i][at:at + 4]}, tokenizers {w[at:at + 4]}; text "
                       f"{texts[i][max(0, len(enc.decode(ids[i][:at])) - 20):][:60]!r})")
                log.warning("Encoded a piece with tokenizers: %s", why)
                return _hf_encode(texts, tokenizer_json), Encoding("tokenizers", why, len(sample), True,
                                                                   time.perf_counter() - t0)
        return ids, Encoding("tiktoken", "", len(sample), False, time.perf_counter() - t0)
    return _hf_encode(texts, tokenizer_json), Encoding("tokenizers", why, 0, False, time.perf_counter() - t0)


def _hf_encode(texts: list[str], tokenizer_json: str) -> list[list[int]]:
    """`tokenizers`' ids of each text (Rust, all threads), without offsets where supported."""
    tok = from_json(tokenizer_json)
    encode_fn = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode_fn(texts, add_special_tokens=False)]


def _threads() -> int:
    """Threads for tiktoken's batch: the CPUs this process may use."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode(batch: pa.Table, tokenizer_json: str) -> tuple[pa.Table, Encoding]:
    """Token ids of each document of `batch`: the `text` column replaced by `ids` (list<int32>),
    the other columns kept; and which encoder made them (`encode_texts`)."""
    ids, how = encode_texts(batch.column("text").to_pylist(), tokenizer_json)
    return batch.drop_columns(["text"]).append_column("ids", pa.array(ids, pa.list_(pa.int32()))), how


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
