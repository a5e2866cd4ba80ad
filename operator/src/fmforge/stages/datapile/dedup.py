"""Exact and fuzzy deduplication, vectorised.

Exact: a 128-bit hash of the normalised text (lower case, whitespace collapsed), computed over
the whole Arrow column; the first document of each hash (by id) survives. The words are split
once per batch and shared with the shingles.

Fuzzy: MinHash over word shingles with rensa (Rust), LSH banding, optional verification of
candidate pairs by their estimated Jaccard similarity, connected components (scipy), and the
smallest id of each component as its deterministic survivor. Shingles are hashed and rolled in
numpy over the flattened words of a whole batch, and rensa builds the signature matrix from one
flat buffer: no per-document Python loop anywhere on the hot path. Hashes, signatures and band
keys are computed on the Ray workers (workers.py groups the bands); the driver runs
`exact_duplicates` over the ids and hashes and `components` over the candidate pairs only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_SEED = 1337


def words(texts: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """The lower-cased, whitespace-split words of each text (Arrow kernels, no Python strings).
    Computed once per batch and shared by the exact hash and the shingles.

    Trimmed before the split: besides the trim the normalisation promises, utf8_split_whitespace
    (pyarrow 26) reads past the end of its data buffer when the batch's last text ends in
    whitespace, and then keeps that whitespace in the last word or not depending on the bytes
    that follow in memory: the same document hashed differently depending on where a piece
    ended (found as a DataPile whose duplicate counts changed with the read's task layout)."""
    w = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pc.utf8_lower(texts)))
    return w.combine_chunks() if isinstance(w, pa.ChunkedArray) else w


def normalize(texts: pa.ChunkedArray | pa.Array, word_lists: pa.ListArray | None = None) -> pa.Array:
    """Lower case, runs of whitespace as one space, trimmed: the words joined by single spaces."""
    wl = words(texts) if word_lists is None else word_lists
    return pc.binary_join(wl, pa.scalar(" ", wl.type.value_type))


def content_hashes(texts: pa.ChunkedArray | pa.Array, word_lists: pa.ListArray | None = None) -> np.ndarray:
    """(n, 2) uint64: a 128-bit hash of each normalised text (two keyed SipHash-1-3 runs)."""
    norm = np.asarray(normalize(texts, word_lists).to_numpy(zero_copy_only=False), dtype=object)
    a = pd.util.hash_array(norm, hash_key="fmforge-exact-01", categorize=False)
    b = pd.util.hash_array(norm, hash_key="fmforge-exact-02", categorize=False)
    return np.stack([a, b], axis=1)


def exact_duplicates(ids: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids that duplicate an earlier document (by id) of the same hash, and that document's id.
    `ids`: object array of str; `hashes`: (n, 2) uint64."""
    if not len(ids):
        return ids, ids
    rank = np.argsort(np.argsort(ids, kind="stable"), kind="stable")
    order = np.lexsort((rank, hashes[:, 1], hashes[:, 0]))  # by hash, then id
    h = hashes[order]
    new = np.ones(len(ids), dtype=bool)
    new[1:] = (h[1:] != h[:-1]).any(axis=1)
    first = order[np.maximum.accumulate(np.where(new, np.arange(len(ids)), 0))]
    dup = order[~new]
    return ids[dup], ids[first[~new]]


def shingle_hashes(texts: pa.ChunkedArray | pa.Array, k: int,
                   word_lists: pa.ListArray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint64 hashes of every word k-shingle, and row offsets (len n+1), for rensa."""
    wl = words(texts) if word_lists is None else word_lists
    offsets = wl.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    # Distinct words are hashed once: Arrow's dictionary encoding finds them without making a
    # Python string per word, and only the dictionary becomes Python objects.
    enc = pc.dictionary_encode(wl.flatten())
    vocab = np.asarray(enc.dictionary.to_numpy(zero_copy_only=False), dtype=object)
    vocab_hash = pd.util.hash_array(vocab, hash_key="fmforge-words-01", categorize=False).astype(np.uint64)
    wh = vocab_hash[enc.indices.to_numpy(zero_copy_only=False)]
    n_words = np.diff(offsets)
    total = len(wh)
    doc = np.repeat(np.arange(len(n_words)), n_words)
    pos = np.arange(total) - np.repeat(offsets[:-1], n_words)
    left = n_words[doc] - pos  # words from here to the end of the document
    with np.errstate(over="ignore"):
        # Rolling polynomial hash of k consecutive word hashes (mod 2^64). Words past the end of
        # the document count as zero, so a document shorter than k words is one shingle of its
        # own words and no shingle ever spans two documents.
        acc = np.zeros(total, dtype=np.uint64)
        mult = np.uint64(0x100000001B3)
        for j in range(k):
            shifted = np.zeros(total, dtype=np.uint64)
            shifted[: max(total - j, 0)] = wh[j:]
            acc = acc * mult + np.where(j < left, shifted, np.uint64(0))
    # every full shingle, and the first position of a document shorter than k
    valid = (pos + k <= n_words[doc]) | ((pos == 0) & (n_words[doc] < k))
    flat_sh = acc[valid]
    counts = np.bincount(doc[valid], minlength=len(n_words))
    # an empty document gets one constant shingle, so every row has a signature
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        at = np.concatenate([[0], np.cumsum(counts)])[empty]
        flat_sh = np.insert(flat_sh, at, np.uint64(0))
        counts = counts.copy()
        counts[empty] = 1
    row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
    return flat_sh, row_offsets


def signatures(texts: pa.ChunkedArray | pa.Array, num_perm: int, shingle_size: int,
               word_lists: pa.ListArray | None = None) -> np.ndarray:
    """(n, num_perm) MinHash signature matrix, built by rensa from one flat buffer."""
    from rensa import RMinHash

    flat, offsets = shingle_hashes(texts, shingle_size, word_lists)
    if len(offsets) <= 1:
        return np.zeros((0, num_perm), dtype=np.uint64)
    m = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, _SEED)
    return np.asarray(m.to_rows(), dtype=np.uint64).reshape(len(offsets) - 1, num_perm)


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Connected components of the edges (a[i], b[i]) between document ids (object arrays of
    str): the ids that are duplicates, the id each duplicates (the smallest id of its
    component, a deterministic survivor), and the number of components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return a, a, 0
    ids, inv = np.unique(np.concatenate([a, b]), return_inverse=True)  # sorted: index order is id order
    m = len(a)
    graph = coo_matrix((np.ones(m, dtype=np.int8), (inv[:m], inv[m:])), shape=(len(ids), len(ids)))
    ncomp, labels = connected_components(graph, directed=False)
    first = np.full(ncomp, len(ids))
    np.minimum.at(first, labels, np.arange(len(ids)))
    survivor = first[labels]
    dup = survivor != np.arange(len(ids))
    return ids[dup], ids[survivor[dup]], int(ncomp)


def row_hash(block: np.ndarray) -> np.ndarray:
    """One uint64 per row of a (n, r) uint64 block: a multiply-xor mix (vectorised)."""
    with np.errstate(over="ignore"):
        h = np.full(block.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
        for j in range(block.shape[1]):
            h = (h ^ block[:, j]) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
    return h
