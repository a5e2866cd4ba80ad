"""Exact and fuzzy deduplication, vectorised.

Exact: a 128-bit hash of the normalised text (lower case, whitespace collapsed), computed over
the whole Arrow column; the first document of each hash (by id) survives. The words are split
once per batch and shared with the shingles.

Fuzzy: MinHash over word shingles with rensa (Rust), LSH banding, optional verification of
candidate pairs by their estimated Jaccard similarity, connected components (scipy), and the
smallest id of each component as its deterministic survivor. Shingles are hashed and rolled in
numpy over the flattened words of a whole batch, and rensa builds the signature matrix from one
flat buffer: no per-document Python loop anywhere on the hot path. `signatures` runs per batch
(on Ray workers); `fuzzy_clusters` runs once over the collected signatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_SEED = 1337


def words(texts: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """The lower-cased, whitespace-split words of each text (Arrow kernels, no Python strings).
    Computed once per batch and shared by the exact hash and the shingles."""
    w = pc.utf8_split_whitespace(pc.utf8_lower(texts))
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


def first_of_each(hashes: np.ndarray, order_keys: np.ndarray) -> np.ndarray:
    """Boolean mask: True for the first row (by `order_keys`) of each distinct hash row."""
    order = np.argsort(order_keys, kind="stable")
    view = np.ascontiguousarray(hashes[order]).view(np.dtype((np.void, hashes.dtype.itemsize * hashes.shape[1])))
    _, first = np.unique(view.ravel(), return_index=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[order[first]] = True
    return keep


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


@dataclass
class FuzzyResult:
    """Which rows survive, and what the clustering found."""

    keep: np.ndarray
    clusters: int
    """Components with more than one document."""
    candidate_pairs: int
    """Pairs that share a band bucket (LSH candidates)."""
    verified_pairs: int
    """Candidates kept as edges: all of them, or with `verify` those whose estimated Jaccard
    similarity reaches the threshold."""


def fuzzy_clusters(sig: np.ndarray, order_keys: np.ndarray, bands: int, threshold: float,
                   verify: bool) -> FuzzyResult:
    """LSH over `bands` bands of the signatures, components, one survivor per component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, num_perm = sig.shape
    if n == 0:
        return FuzzyResult(np.zeros(0, dtype=bool), 0, 0, 0)
    rows = num_perm // bands
    band_view = sig[:, : bands * rows].reshape(n, bands, rows)
    src, dst = [], []
    for b in range(bands):
        h = _row_hash(band_view[:, b, :])
        order = np.argsort(h, kind="stable")
        hs = h[order]
        new_bucket = np.concatenate([[True], hs[1:] != hs[:-1]])
        bucket_first = order[np.maximum.accumulate(np.where(new_bucket, np.arange(n), 0))]
        dup = ~new_bucket
        src.append(order[dup])
        dst.append(bucket_first[dup])
    s = np.concatenate(src)
    d = np.concatenate(dst)
    candidates = len(s)
    if verify and candidates:
        est = (sig[s] == sig[d]).mean(axis=1)
        ok = est >= threshold
        s, d = s[ok], d[ok]
    graph = coo_matrix((np.ones(len(s), dtype=np.int8), (s, d)), shape=(n, n))
    ncomp, labels = connected_components(graph, directed=False)
    order = np.argsort(order_keys, kind="stable")
    first = np.full(ncomp, -1)
    # the smallest order key of each component survives: walk rows in key order, first seen wins
    seen_labels = labels[order]
    _, idx = np.unique(seen_labels, return_index=True)
    first[seen_labels[idx]] = order[idx]
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    sizes = np.bincount(labels, minlength=ncomp)
    return FuzzyResult(keep, int((sizes > 1).sum()), candidates, len(s))


def _row_hash(block: np.ndarray) -> np.ndarray:
    """One uint64 per row of a (n, r) uint64 block: a multiply-xor mix (vectorised)."""
    with np.errstate(over="ignore"):
        h = np.full(block.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
        for j in range(block.shape[1]):
            h = (h ^ block[:, j]) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
    return h
