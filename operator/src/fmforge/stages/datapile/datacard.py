"""The data card of a pile version: a typed model, written as datacard.json and datacard.md.

The card says what went into the version and what each step did to it: the sources with their
content digests, what every filter and dedup dropped (with the seconds each filter took on the
workers), languages, licences, the tokenizer, and the sequences. It lives beside the version's
tokenizer, in the version's artifact folder, and the DataPile's status points at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...api.v1alpha1.common import Status
from ...api.v1alpha1.datapile import PileStats, PileVersion


class CardSource(Status):
    """One source as read for this version."""

    name: str
    """The source's name in the spec."""
    uri: str
    """Where it was read from."""
    license: str | None = None
    """The licence the spec declares for it."""
    files: int
    """Files read."""
    documents: int
    """Documents read (before any filter)."""
    bytes: int
    """Bytes of the files read."""
    digest: str
    """sha256 over each file's relative path and content hash."""


class CardDedup(Status):
    """What deduplication found."""

    exact: int
    """Documents dropped as exact duplicates (same normalised text)."""
    exact_rate: float
    """Share of the documents reaching exact dedup that it dropped."""
    fuzzy: int
    """Documents dropped as near duplicates."""
    fuzzy_rate: float
    """Share of the documents reaching fuzzy dedup that it dropped."""
    clusters: int
    """Groups of near duplicates (each keeps its document with the smallest id)."""
    candidate_pairs: int
    """Pairs sharing an LSH bucket: in every bucket, each document with the bucket's first."""
    verified_pairs: int
    """Distinct pairs kept as edges: all candidates, or with `verify` those whose estimated
    Jaccard similarity reaches the threshold."""
    params: dict[str, Any]
    """The spec's fuzzy dedup settings."""


class LinesRemoved(Status):
    """Lines the quality filter's line cleaning removed from kept documents."""

    lines: int = 0
    """Lines removed."""
    documents: int = 0
    """Kept documents that lost at least one line."""


class CardEncoder(Status):
    """Which encoder turned the documents into token ids."""

    encoder: str
    """tiktoken (every piece, each checked against `tokenizers` on a sample), tokenizers (every
    piece), or "tiktoken and tokenizers" (some pieces fell back)."""
    pieces: dict[str, int]
    """Pieces encoded by each encoder."""
    documents_checked: int
    """Documents encoded by both encoders and compared."""
    fell_back: int
    """Pieces where tiktoken's ids differed from `tokenizers`' on the sample, encoded again by
    `tokenizers` (what was published is `tokenizers`' ids)."""
    why: str = ""
    """Why `tokenizers` encoded: what tiktoken cannot reproduce, or the first difference found."""
    seconds: float = 0.0
    """Seconds spent encoding and checking on the workers, summed."""


class DataCard(Status):
    """The data card of one version."""

    name: str
    """The DataPile's name."""
    version: PileVersion
    """The version (documents snapshot, digest, time)."""
    tags: list[str]
    """Tags on the version when it was published."""
    sources: list[CardSource]
    """The sources, in the spec's order."""
    stats: PileStats
    """The counters the status shows too."""
    quality_rules: dict[str, int]
    """Documents dropped by the quality filter, by the first rule each broke."""
    dedup: CardDedup
    """What deduplication found."""
    licenses: dict[str, int]
    """Kept documents by detected licence."""
    pii_redacted: int
    """PII matches redacted in kept documents."""
    lines_removed: LinesRemoved
    """Line cleaning in kept documents."""
    tokenizer: str
    """How the tokenizer was made (trained on what, or loaded from where)."""
    encoder: CardEncoder | None = None
    """Which encoder made the token ids (cards before tiktoken have none)."""
    tokens_by_split: dict[str, int]
    """Tokens per split, end-of-text tokens included."""
    sequence_length: int
    """Tokens per packed sequence."""
    timings: dict[str, float]
    """Wall seconds of each step of the stage, on the driver."""
    filters: list[dict[str, Any]]
    """The spec's filters, with the quality filter's effective rules."""
    dropped_table: str | None = None
    """The Iceberg table holding this version's dropped documents (publish.keepDropped)."""


def write(card: DataCard, out: Path) -> Path:
    """Write datacard.json and datacard.md into `out`; the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "datacard.json").write_text(card.model_dump_json(by_alias=True, indent=2) + "\n")
    path = out / "datacard.md"
    path.write_text(markdown(card))
    return path


def markdown(card: DataCard) -> str:
    """The card as Markdown."""
    st = card.stats
    lines = [
        f"# Data card: {card.name} (snapshot {card.version.snapshot_id})",
        "",
        f"- Published: {card.version.created_at.isoformat() if card.version.created_at else 'unknown'}; "
        f"tags: {', '.join(card.tags) or 'none'}",
        f"- Digest: `{card.version.digest}`",
        f"- Documents: {st.documents.read} read, {st.documents.kept} kept",
        f"- Tokens: {st.tokens} in {st.sequences} sequences of {card.sequence_length} "
        f"(train {card.tokens_by_split.get('train', 0)}, validation {card.tokens_by_split.get('validation', 0)})",
        f"- Tokenizer: {card.tokenizer}",
        *([f"- Encoder: {_encoder_line(card.encoder)}"] if card.encoder else []),
        "",
        "## Sources",
        "",
        "| source | uri | declared licence | files | documents | MB | content digest |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.uri} | {s.license or 'none'} | {s.files} | {s.documents} | {s.bytes / 1e6:.2f} | "
              f"`{s.digest[:19]}…` |" for s in card.sources]
    lines += ["", "## What each step dropped", "", "| step | dropped | share of read | seconds on the workers |",
              "|---|---|---|---|"]
    read = max(st.documents.read, 1)
    for reason, n in st.dropped.items():
        secs = st.step_seconds.get(reason)
        lines.append(f"| {reason} | {n} | {100 * n / read:.1f}% | {'' if secs is None else f'{secs:.2f}'} |")
    if card.quality_rules:
        lines += ["", "Quality rules broken (first rule per document): "
                  + ", ".join(f"{k} {v}" for k, v in card.quality_rules.items())]
    if card.dropped_table:
        lines += ["", f"Every dropped document is in `{card.dropped_table}` (this version's snapshot), with its "
                      f"reason and, for a duplicate, the document it duplicates."]
    d = card.dedup
    lines += ["", "## Deduplication", "",
              f"- Exact: {d.exact} removed ({d.exact_rate:.1%} of documents reaching it)",
              f"- Fuzzy: {d.fuzzy} removed ({d.fuzzy_rate:.1%}) in {d.clusters} clusters ({d.candidate_pairs} "
              f"candidate pairs from the LSH bands, {d.verified_pairs} distinct pairs kept as edges); MinHash "
              + ", ".join(f"{k} {v}" for k, v in d.params.items()),
              "", "## Languages", "", "| natural language | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in st.languages.items()]
    lines += ["", "| programming language | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in st.programming_languages.items()]
    lines += ["", "## Licences of kept documents", "", "| licence | documents |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card.licenses.items()]
    lines += ["", f"PII redacted: {card.pii_redacted} matches."]
    if card.lines_removed.lines:
        lines += [f"C4 line cleaning removed {card.lines_removed.lines} lines from {card.lines_removed.documents} "
                  f"kept documents."]
    lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in card.timings.items()]
    lines += [""]
    return "\n".join(lines)


def _encoder_line(e: CardEncoder) -> str:
    pieces = ", ".join(f"{v} pieces by {k}" for k, v in e.pieces.items())
    line = (f"{e.encoder} ({pieces}; {e.documents_checked} documents checked against tokenizers, "
            f"{e.fell_back} pieces fell back; {e.seconds:.1f} s on the workers)")
    return f"{line}. Why tokenizers: {e.why}" if e.why else line
