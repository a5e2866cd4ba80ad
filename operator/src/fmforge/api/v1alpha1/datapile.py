"""DataPile: stage 1, prepare a versioned, tagged data pile.

Spec and status models. The DataPile stage (`fmforge.stages.datapile`) reads the spec; the CRD
generator, `fmforge validate` and the local runner validate manifests with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import (
    Bytes,
    CommonStatus,
    DataUri,
    Fraction,
    Name,
    RayResources,
    Rule,
    SpdxId,
    Spec,
    Status,
    Tag,
    exactly_one,
    unique_names,
)

LanguageCode = Annotated[str, StringConstraints(max_length=2, pattern=r"^[a-z]{2}$")]
"""An ISO 639-1 language code, such as `en`."""

Glob = Annotated[str, StringConstraints(min_length=1, max_length=256)]

# -- sources ---------------------------------------------------------------------------------------


class Source(Spec):
    """One place raw documents come from."""

    __rules__ = (
        Rule(
            cel="self.format in ['jsonl', 'parquet'] || !has(self.textField) || self.textField == 'text'",
            message="textField applies to jsonl and parquet sources only",
            check=lambda m: m.format in ("jsonl", "parquet") or m.text_field == "text",
        ),
    )

    name: Name
    """Name of the source; recorded with every document and in the data card."""
    uri: DataUri
    """Where the files are: a file or a directory (read recursively)."""
    format: Literal["jsonl", "parquet", "text", "code"] = "jsonl"
    """jsonl (also .jsonl.gz), parquet, text (one document per file), or code (a source tree:
    one document per file, its path kept)."""
    text_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "text"
    """Field holding the document text, for jsonl and parquet."""
    id_field: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Field holding a document id, for jsonl and parquet; unset: an id from source and position."""
    include: Annotated[list[Glob], Field(max_length=64)] = []
    """File name globs to read (such as `*.py`); empty: every file of the format."""
    exclude: Annotated[list[Glob], Field(max_length=64)] = []
    """File name globs to skip."""
    license: SpdxId | None = None
    """Declared licence of the whole source (SPDX id), checked by the license filter."""
    invalid_text: Literal["skip", "fail"] = "skip"
    """A jsonl record or parquet row whose text is not a string (null, a number, a boolean, an
    object): skip it and count it as dropped `invalidText`, or fail naming the file and line.
    Such values are never turned into text."""
    max_document_bytes: Bytes = "2Mi"
    """Documents longer than this (UTF-8 bytes) are dropped at read and counted as `tooLarge`:
    one huge document would otherwise hold a Ray worker's memory many times over."""


# -- categorize ------------------------------------------------------------------------------------


class NaturalLanguage(Spec):
    """Natural-language identification."""

    enabled: bool = True
    """Identify the natural language of each prose document."""
    min_confidence: Fraction = 0.5
    """Below this confidence the language is recorded as `unknown`."""


class ProgrammingLanguage(Spec):
    """Programming-language identification."""

    enabled: bool = True
    """Identify the programming language of each code document from its extension and content."""


class Categorize(Spec):
    """Annotations added to each document before filtering."""

    natural_language: NaturalLanguage = NaturalLanguage()
    """Natural-language identification."""
    programming_language: ProgrammingLanguage = ProgrammingLanguage()
    """Programming-language identification."""


# -- filters ---------------------------------------------------------------------------------------


class LanguageFilter(Spec):
    """Keep prose in the allowed natural languages; code is not subject to it."""

    type: Literal["language"]
    """Filter type."""
    allow: Annotated[list[LanguageCode], Field(min_length=1, max_length=64)]
    """ISO 639-1 codes to keep, such as `en`."""


class HapFilter(Spec):
    """Drop hate, abuse and profanity, scored per sentence by an offline classifier."""

    type: Literal["hap"]
    """Filter type."""
    threshold: Fraction = 0.9
    """Drop a document whose worst sentence scores above this probability."""
    apply_to_code: bool = False
    """Score code too (its comment lines only). The classifier is trained on prose: on code it
    flags identifiers such as `p.kill()` or `dumbdbm`, hence off by default."""


class LicenseFilter(Spec):
    """Drop copyrighted or licence-restricted material (licence texts, headers, SPDX ids)."""

    __rules__ = (
        Rule(
            cel="!has(self.allow) || !has(self.deny) || !self.allow.exists(a, a in self.deny)",
            message="a licence cannot be in both allow and deny",
            check=lambda m: not set(m.allow or []) & set(m.deny or []),
        ),
    )

    type: Literal["license"]
    """Filter type."""
    allow: Annotated[list[SpdxId], Field(max_length=128)] | None = None
    """SPDX ids to keep. A document is kept when its licences can be complied with using only
    these: `MIT OR GPL-3.0` passes an allow-list with MIT, `MIT AND GPL-3.0` does not."""
    deny: Annotated[list[SpdxId], Field(max_length=128)] | None = None
    """SPDX ids to drop, with the same reading of OR: `MIT OR GPL-3.0` survives a deny of GPL-3.0."""
    unknown: Literal["keep", "drop"] = "keep"
    """What to do with documents whose licence cannot be determined."""


PiiType = Literal["email", "phone", "credit-card", "ip", "iban"]


class PiiFilter(Spec):
    """Find personal data: redact it with typed placeholders, or drop the document."""

    type: Literal["pii"]
    """Filter type."""
    action: Literal["redact", "drop"] = "redact"
    """redact replaces each match with a placeholder such as `<EMAIL>`; drop drops the document."""
    types: Annotated[list[PiiType], Field(min_length=1, max_length=8)] = [
        "email",
        "phone",
        "credit-card",
        "ip",
        "iban",
    ]
    """Kinds of personal data to look for."""


class QualityRules(Spec):
    """Quality rules; each unset rule takes the preset's value."""

    min_words: Annotated[int, Field(ge=0)] | None = None
    """Fewest words a document may have (Gopher: 50)."""
    max_words: Annotated[int, Field(ge=1)] | None = None
    """Most words a document may have (Gopher: 100,000)."""
    min_mean_word_length: Annotated[float, Field(ge=0)] | None = None
    """Shortest mean word length (Gopher: 3)."""
    max_mean_word_length: Annotated[float, Field(ge=0)] | None = None
    """Longest mean word length (Gopher: 10)."""
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = None
    """Most '#' and '...' per word (Gopher: 0.1)."""
    max_bullet_lines_ratio: Fraction | None = None
    """Largest share of lines starting with a bullet (Gopher: 0.9)."""
    max_ellipsis_lines_ratio: Fraction | None = None
    """Largest share of lines ending with an ellipsis (Gopher: 0.3)."""
    min_alpha_words_ratio: Fraction | None = None
    """Smallest share of words with an alphabetic character (Gopher: 0.8)."""
    min_stop_words: Annotated[int, Field(ge=0)] | None = None
    """Fewest English stop words (Gopher: 2)."""
    max_duplicate_line_fraction: Fraction | None = None
    """Largest share of duplicated lines (Gopher repetition: 0.3)."""
    max_duplicate_paragraph_fraction: Fraction | None = None
    """Largest share of duplicated paragraphs (Gopher repetition: 0.3)."""
    max_duplicate_line_char_fraction: Fraction | None = None
    """Largest share of characters in duplicated lines (Gopher: 0.2; FineWeb: 0.01)."""
    max_duplicate_paragraph_char_fraction: Fraction | None = None
    """Largest share of characters in duplicated paragraphs (Gopher: 0.2)."""
    max_top_2gram_char_fraction: Fraction | None = None
    """Largest share of characters in the most frequent word 2-gram (Gopher: 0.20)."""
    max_top_3gram_char_fraction: Fraction | None = None
    """Largest share of characters in the most frequent word 3-gram (Gopher: 0.18)."""
    max_top_4gram_char_fraction: Fraction | None = None
    """Largest share of characters in the most frequent word 4-gram (Gopher: 0.16)."""
    max_duplicate_5gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 5-grams (Gopher: 0.15)."""
    max_duplicate_6gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 6-grams (Gopher: 0.14)."""
    max_duplicate_7gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 7-grams (Gopher: 0.13)."""
    max_duplicate_8gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 8-grams (Gopher: 0.12)."""
    max_duplicate_9gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 9-grams (Gopher: 0.11)."""
    max_duplicate_10gram_char_fraction: Fraction | None = None
    """Largest share of characters covered by repeated word 10-grams (Gopher: 0.10)."""
    min_line_punct_ratio: Fraction | None = None
    """Smallest share of lines ending in terminal punctuation (FineWeb: 0.12)."""
    max_short_line_ratio: Fraction | None = None
    """Largest share of lines of at most 30 characters (FineWeb: 0.67)."""
    min_sentences: Annotated[int, Field(ge=0)] | None = None
    """Fewest sentences (C4: 5)."""
    drop_lorem_ipsum: bool | None = None
    """Drop documents with "lorem ipsum" placeholder text (C4: true)."""
    drop_curly_brace: bool | None = None
    """Drop documents with a curly brace, a sign of code in web text (C4: true)."""
    clean_lines: bool | None = None
    """C4's line cleaning before the page rules (C4: true): drop the lines that do not end in
    terminal punctuation, have fewer than 3 words or a word over 1,000 characters, mention
    javascript, or are cookie and privacy-policy boilerplate, and citation marks like `[1]`. The
    published text is the cleaned text; a document left with no line is dropped."""


class QualityFilter(Spec):
    """Drop low-quality text with the Gopher quality and repetition rules or another preset."""

    type: Literal["quality"]
    """Filter type."""
    preset: Literal["gopher", "c4", "fineweb", "none"] = "gopher"
    """Rule set to start from: gopher, c4, fineweb or none."""
    rules: QualityRules | None = None
    """Individual rules that override the preset."""
    apply_to_code: bool = False
    """Apply the rules to code documents too (they are written for prose)."""


class LengthFilter(Spec):
    """Keep documents within a length range."""

    __rules__ = (
        Rule(
            cel="!has(self.maxWords) || !has(self.minWords) || self.minWords <= self.maxWords",
            message="minWords must be less than or equal to maxWords",
            check=lambda m: m.max_words is None or m.min_words <= m.max_words,
        ),
    )

    type: Literal["length"]
    """Filter type."""
    min_words: Annotated[int, Field(ge=0)] = 0
    """Fewest words a document may have."""
    max_words: Annotated[int, Field(ge=1)] | None = None
    """Most words a document may have; unset: no limit."""


Filter = Annotated[
    LanguageFilter | HapFilter | LicenseFilter | PiiFilter | QualityFilter | LengthFilter,
    Field(discriminator="type"),
]

# -- dedup, tokenizer, publish -----------------------------------------------------------------------


class FuzzyDedup(Spec):
    """Near-duplicate removal: MinHash over word shingles, LSH banding, connected components."""

    __rules__ = (
        Rule(
            cel="self.numPerm % self.bands == 0",
            message="numPerm must be a multiple of bands (rows per band = numPerm / bands)",
            check=lambda m: m.num_perm % m.bands == 0,
        ),
    )

    enabled: bool = True
    """Remove near duplicates."""
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    """Jaccard similarity at or above which two documents are duplicates, in (0, 1]."""
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 112
    """Number of MinHash permutations."""
    bands: Annotated[int, Field(ge=1, le=512)] = 14
    """Number of LSH bands."""
    shingle_size: Annotated[int, Field(ge=1, le=32)] = 5
    """Words per shingle."""
    verify: bool = False
    """Check every LSH candidate pair with its estimated Jaccard similarity before merging."""


class Dedup(Spec):
    """Duplicate removal, exact first, then fuzzy."""

    exact: bool = True
    """Remove documents whose normalised content hash was seen before."""
    fuzzy: FuzzyDedup = FuzzyDedup()
    """Near-duplicate removal."""


class TokenizerTraining(Spec):
    """A tokenizer trained on the pile."""

    type: Literal["bpe"] = "bpe"
    """Tokenizer model: byte-level BPE."""
    vocab_size: Annotated[int, Field(ge=260, le=1_000_000)] = 8192
    """Vocabulary size, special tokens included."""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """Fewest occurrences of a pair to merge."""
    sample_bytes: Bytes = "8Mi"
    """Train on at most this much text of the training split: documents taken in the order of
    their id hash, so the sample is stable across runs. `0` trains on the whole split. On the
    stdlib corpus, 8Mi trains 5-7x faster than the whole 37 MB and compresses held-out text 1.2%
    worse (3.56 against 3.61 bytes per token)."""


class Tokenizer(Spec):
    """The tokenizer of the pile: trained here, or loaded."""

    __rules__ = (exactly_one("train", "uri"),)

    train: TokenizerTraining | None = None
    """Train a tokenizer on the pile."""
    uri: Annotated[str, StringConstraints(max_length=2048, pattern=r"^(file|pvc|s3|pkg)://\S+$")] | None = None
    """Load a Hugging Face tokenizer from this URI instead: a directory holding tokenizer.json
    (a tokenizer's or a model's), or a GGUF model file (its tokenizer), so that a model continued
    on the pile (TrainingRun model.init) reads it with its own vocabulary."""


class Tokenize(Spec):
    """Tokenize and pack the documents into fixed-length sequences."""

    sequence_length: Annotated[int, Field(ge=16, le=131072)] = 256
    """Tokens per packed sequence."""


class Split(Spec):
    """Train/validation split, by document hash (stable across runs)."""

    validation_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.05
    """Share of documents that go to the validation split."""


class Publish(Spec):
    """How a version is published."""

    tags: Annotated[list[Tag], Field(max_length=16, json_schema_extra={"x-kubernetes-list-type": "set"})] = []
    """Tags for the new version; a tag moves to the new version if it was on an older one."""
    keep_dropped: bool = False
    """Also publish the dropped documents, each with the step that dropped it (and for a
    duplicate, the document it duplicates), in a third table `<pile>_dropped` of the same
    version, so a reviewer can see what each filter removed."""


class DataPileSpec(Spec):
    """What pile to prepare."""

    __rules__ = (unique_names("sources"),)

    sources: Annotated[
        list[Source],
        Field(
            min_length=1,
            max_length=64,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        ),
    ]
    """Raw sources; at least one, names unique."""
    categorize: Categorize = Categorize()
    """Natural and programming language identification."""
    filters: Annotated[list[Filter], Field(max_length=32)] = []
    """Filters, applied in order; each counts what it drops."""
    dedup: Dedup = Dedup()
    """Exact and fuzzy deduplication."""
    tokenizer: Tokenizer = Tokenizer(train=TokenizerTraining())
    """Train or load the tokenizer."""
    tokenize: Tokenize = Tokenize()
    """Sequence packing."""
    split: Split = Split()
    """Train/validation split."""
    publish: Publish = Publish()
    """Version tags."""
    resources: RayResources = RayResources()
    """The Ray workers that run the stage."""


# -- status ------------------------------------------------------------------------------------------


class PileVersion(Status):
    """A published version of the pile: an Iceberg snapshot."""

    snapshot_id: str
    """Iceberg snapshot id, as a string (it does not fit a JSON number)."""
    digest: str | None = None
    """sha256 over the spec, the source digests and the published content."""
    created_at: datetime | None = None
    """When the version was published."""


class DocumentCounts(Status):
    """How many documents were read and kept."""

    read: int = 0
    """Documents read from the sources."""
    kept: int = 0
    """Documents in the published version."""


class PileStats(Status):
    """What the run did, counted."""

    documents: DocumentCounts = DocumentCounts()
    """Documents read and kept."""
    dropped: dict[str, int] = {}
    """Documents dropped, by reason (filter type, duplicateExact, duplicateFuzzy)."""
    languages: dict[str, int] = {}
    """Kept prose documents by natural language."""
    programming_languages: dict[str, int] = {}
    """Kept code documents by programming language."""
    tokens: int | None = None
    """Tokens in the packed sequences."""
    sequences: int | None = None
    """Packed sequences, both splits."""
    step_seconds: dict[str, float] = {}
    """Seconds each per-document step took on the workers, summed over them: categorize, each
    filter by type, exactHash, minhash."""


class SourceRead(Status):
    """A source as the latest version read it."""

    name: str
    """The source's name in the spec."""
    uri: str
    """Where it was read (the spec's URI, resolved)."""
    digest: str | None = None
    """sha256 over the files' names, sizes and content read: a changed source has another."""


class DataPileStatus(CommonStatus):
    """What the DataPile is."""

    version: PileVersion | None = None
    """The latest published version."""
    sources: list[SourceRead] = []
    """The sources the latest version was made from, each with the digest of what was read: the
    lineage (`fmforge lineage`) from the status alone, on a cluster as locally."""
    tags: list[str] = []
    """Tags on the latest version."""
    stats: PileStats | None = None
    """Counters of the latest run."""
    data_card: str | None = None
    """URI of the data card (Markdown) of the latest version."""
    table: str | None = None
    """Iceberg table of the documents (`namespace.table`)."""
    ray_job: str | None = None
    """RayJob of the current attempt (cluster only)."""
