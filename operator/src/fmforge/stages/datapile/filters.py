"""The DataPile filters: small Arrow-batch steps that each mark what they drop.

Each step gets a batch with a `dropped` column (null while a document is kept) and returns it
with `dropped` set to its reason for the documents it drops, never touching documents an earlier
step dropped; so the counters add up by construction (read = kept + Σ dropped) and the steps
compose in the manifest's order on any executor (in-process, or a Ray task per piece of the pile).

Written here, and why: licence detection is a table of SPDX headers and licence-text phrases,
because the one thorough library (scancode-toolkit) is a gigabyte of dependencies and seconds
per file; the Gopher rules are a dozen formulae from the paper (Rae et al. 2021, appendix A),
whose only packaged form (datatrove) is a whole framework. The HAP classifier
(alt-profanity-check), IBAN and Luhn validation (python-stdnum) and language identification
(lingua) are libraries.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...api.v1alpha1.datapile import (
    HapFilter,
    LanguageFilter,
    LengthFilter,
    LicenseFilter,
    PiiFilter,
    QualityFilter,
    QualityRules,
)


def _active(batch: pa.Table) -> np.ndarray:
    return pc.is_null(batch.column("dropped")).to_numpy(zero_copy_only=False)


def _mark(batch: pa.Table, drop: np.ndarray, reason: str) -> pa.Table:
    old = np.array(batch.column("dropped").to_pylist(), dtype=object)
    new = np.where(drop & (old == None), reason, old)  # noqa: E711 - elementwise
    i = batch.schema.get_field_index("dropped")
    return batch.set_column(i, "dropped", pa.array(new.tolist(), pa.string()))


def _set(batch: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, name, arr) if i >= 0 else batch.append_column(name, arr)


@dataclass
class Step:
    """One filter: `fn(batch) -> batch`, named by the reason it drops for."""

    reason: str
    fn: Callable[[pa.Table], pa.Table]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(batch)


# -- language, length ------------------------------------------------------------------------------


def language_step(f: LanguageFilter) -> Step:
    allow = set(f.allow)

    def fn(batch: pa.Table) -> pa.Table:
        is_code = batch.column("is_code").to_numpy(zero_copy_only=False)
        lang = np.array(batch.column("lang").to_pylist(), dtype=object)
        drop = ~is_code & ~np.isin(lang, list(allow))
        return _mark(batch, drop, "language")

    return Step("language", fn)


def length_step(f: LengthFilter) -> Step:
    def fn(batch: pa.Table) -> pa.Table:
        # trimmed first: no empty word at either end, and no read past the buffer (dedup.words says why)
        text = pc.utf8_trim_whitespace(batch.column("text"))
        words = pc.list_value_length(pc.utf8_split_whitespace(text)).to_numpy(zero_copy_only=False)
        drop = words < f.min_words
        if f.max_words is not None:
            drop |= words > f.max_words
        return _mark(batch, drop, "length")

    return Step("length", fn)


# -- hate, abuse, profanity ------------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n{1,}")


@functools.lru_cache(maxsize=1)
def _hap_model():
    from profanity_check import predict_prob

    return predict_prob


_HAS_WORD = re.compile(r"[^\W\d_]{3}")


def hap_scores(texts: list[str]) -> np.ndarray:
    """Each document's worst (highest) sentence probability of being offensive.

    Sentences are scored once however often they occur (source trees repeat lines a lot), and
    only sentences with a word in them: the classifier's cost is per distinct sentence.
    """
    index: dict[str, int] = {}
    owner: list[int] = []
    which: list[int] = []
    for i, t in enumerate(texts):
        for s in _SENTENCE.split(t):
            s = s.strip()
            if len(s) > 3 and _HAS_WORD.search(s):
                owner.append(i)
                which.append(index.setdefault(s, len(index)))
    scores = np.zeros(len(texts))
    if index:
        p = _hap_model()(list(index))
        np.maximum.at(scores, np.asarray(owner), p[np.asarray(which)])
    return scores


_COMMENT = re.compile(r"^\s*(?:#|//|/\*|\*|--|;)+\s?(.*)$", re.MULTILINE)


def comments(code: str) -> str:
    """The comment lines of a source file, one per line (what HAP scores in code)."""
    return "\n".join(m.group(1) for m in _COMMENT.finditer(code))


def hap_step(f: HapFilter) -> Step:
    def fn(batch: pa.Table) -> pa.Table:
        active = _active(batch)
        is_code = batch.column("is_code").to_numpy(zero_copy_only=False)
        texts = batch.column("text").to_pylist()
        scores = np.zeros(batch.num_rows)
        idx = np.flatnonzero(active & (f.apply_to_code | ~is_code))
        scores[idx] = hap_scores([comments(texts[i]) if is_code[i] else texts[i] for i in idx])
        batch = _set(batch, "hap_score", pa.array(scores, pa.float32()))
        return _mark(batch, scores > f.threshold, "hap")

    return Step("hap", fn)


# -- licences --------------------------------------------------------------------------------------

# The expression runs to the end of its line (a comment closer such as `*/` ends it too).
_SPDX = re.compile(r"SPDX-License-Identifier:[ \t]*([()A-Za-z0-9.+:\- \t]+)")

#: (SPDX id, patterns that must all match). A licence *text* is recognised by its title on lines
#: of its own (so a text that merely names another licence, as MPL-2.0 names the GPL, is not
#: taken for it); a licence *header* by its standard sentence.
_M = re.IGNORECASE | re.MULTILINE
LICENSE_PATTERNS: tuple[tuple[str, tuple[re.Pattern, ...]], ...] = tuple(
    (spdx, tuple(re.compile(p, _M) for p in pats)) for spdx, pats in (
        ("AGPL-3.0", (r"^\s*GNU AFFERO GENERAL PUBLIC LICENSE\s*\n\s*Version 3",)),
        ("AGPL-3.0", (r"GNU Affero General Public License as published\s+by\s+the Free Software Foundation",)),
        ("LGPL-3.0", (r"^\s*GNU LESSER GENERAL PUBLIC LICENSE\s*\n\s*Version 3",)),
        ("LGPL-2.1", (r"^\s*GNU LESSER GENERAL PUBLIC LICENSE\s*\n\s*Version 2\.1",)),
        ("LGPL-2.0", (r"^\s*GNU LIBRARY GENERAL PUBLIC LICENSE\s*\n\s*Version 2",)),
        ("GPL-3.0", (r"^\s*GNU GENERAL PUBLIC LICENSE\s*\n\s*Version 3",)),
        ("GPL-2.0", (r"^\s*GNU GENERAL PUBLIC LICENSE\s*\n\s*Version 2,",)),
        ("GPL-1.0", (r"^\s*GNU GENERAL PUBLIC LICENSE\s*\n\s*Version 1,",)),
        ("GPL-3.0", (r"GNU General Public License as published\s+by\s+the Free Software Foundation[,;]?\s+"
                     r"either\s+version 3",)),
        ("GPL-2.0", (r"GNU General Public License as published\s+by\s+the Free Software Foundation[,;]?\s+"
                     r"either\s+version 2",)),
        ("GFDL-1.3", (r"^\s*GNU Free Documentation License\s*\n\s*Version 1\.3",)),
        ("GFDL-1.2", (r"^\s*GNU Free Documentation License\s*\n\s*Version 1\.2",)),
        ("Apache-2.0", (r"^\s*Apache License\s*\n\s*Version 2\.0",)),
        ("Apache-2.0", (r"Licensed under the Apache License,? Version 2\.0",)),
        ("MPL-2.0", (r"^\s*Mozilla Public License,? Version 2\.0",)),
        ("MPL-2.0", (r"subject to the terms of the Mozilla Public\s+License, v\. 2\.0",)),
        ("MPL-1.1", (r"^\s*MOZILLA PUBLIC LICENSE\s*\n\s*Version 1\.1",)),
        ("Artistic-2.0", (r"^\s*The Artistic License 2\.0",)),
        ("Artistic-1.0", (r'^\s*The "Artistic License"',)),
        ("CC0-1.0", (r"^\s*(Creative Commons Legal Code\s*\n\s*)?CC0 1\.0 Universal",)),
        ("PSF-2.0", (r"^\s*PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",)),
        ("MIT", (r"Permission is hereby granted, free of charge, to any person obtaining\s+a copy",)),
        ("BSD-3-Clause", (r"Redistribution and use in source and binary forms", r"Neither the name")),
        ("BSD-2-Clause", (r"Redistribution and use in source and binary forms",)),
        ("Unlicense", (r"This is free and unencumbered software released into the public domain",)),
    )
)
_HEAD = 12000  # licence headers and texts are found near the top


@functools.lru_cache(maxsize=1)
def _licensing():
    from license_expression import Licensing

    return Licensing()


def _parse(expression: str):
    """The parsed SPDX expression, or None when it is not one (a garbled header)."""
    from license_expression import ExpressionError

    try:
        return _licensing().parse(expression)
    except ExpressionError:
        return None


def detect_licenses(text: str) -> list[str]:
    """The licences a document declares (SPDX header expressions, such as `MIT OR Apache-2.0`),
    is (licence texts) or carries (standard headers), each an SPDX expression; all apply."""
    found: list[str] = []
    ids: set[str] = set()
    head = text[:_HEAD]
    for expr in _SPDX.findall(head):
        parsed = _parse(expr.strip())
        if parsed is None:
            continue
        found.append(str(parsed))
        ids.update(_key(s) for s in _licensing().license_symbols(parsed, decompose=False))
    for spdx, pats in LICENSE_PATTERNS:
        if spdx in ids:
            continue
        if spdx == "BSD-2-Clause" and "BSD-3-Clause" in ids:
            continue  # BSD-3 is BSD-2 plus the endorsement clause
        if all(p.search(head) for p in pats):
            found.append(spdx)
            ids.add(spdx)
    return sorted(set(found))


def _key(symbol) -> str:
    """The licence id of a symbol; `GPL-2.0 WITH Classpath-exception-2.0` counts as GPL-2.0."""
    return symbol.license_symbol.key if hasattr(symbol, "license_symbol") else symbol.key


def combine(expressions: list[str]) -> str:
    """One SPDX expression for licences that all apply: `A AND (B OR C)`."""
    return " AND ".join(f"({e})" if " OR " in e and len(expressions) > 1 else e for e in expressions)


@functools.lru_cache(maxsize=4096)
def license_allowed(expression: str, allow: frozenset[str] | None, deny: frozenset[str]) -> bool:
    """Whether an SPDX expression can be complied with using only allowed, not denied licences:
    `MIT OR GPL-3.0` passes an allow-list with MIT (the user may choose MIT), `MIT AND GPL-3.0`
    does not. Evaluated with license-expression's boolean algebra."""
    lic = _licensing()
    parsed = _parse(expression)
    if parsed is None:
        return False
    ok = {s: lic.TRUE if _key(s) not in deny and (allow is None or _key(s) in allow) else lic.FALSE
          for s in lic.license_symbols(parsed, decompose=False)}
    return parsed.subs(ok).simplify() == lic.TRUE


#: RE2 pattern every licence text or header above contains (vectorised pre-filter).
_LICENSE_HINT = r"(?i)licen[cs]e|redistribution and use|permission is hereby granted|public domain|cc0 1\.0"


def license_step(f: LicenseFilter) -> Step:
    allow = frozenset(f.allow) if f.allow is not None else None
    deny = frozenset(f.deny or [])

    def fn(batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        declared = batch.column("source_license").to_pylist()
        active = _active(batch)
        head = pc.utf8_slice_codeunits(batch.column("text"), 0, _HEAD)
        hinted = pc.match_substring_regex(head, _LICENSE_HINT).to_numpy(zero_copy_only=False)
        licenses: list[str] = []
        drop = np.zeros(batch.num_rows, dtype=bool)
        for i, t in enumerate(texts):
            found = detect_licenses(t) if active[i] and hinted[i] else []
            if not found and declared[i]:
                found = [declared[i]]
            expression = combine(found) if found else "unknown"
            licenses.append(expression)
            if not found:
                drop[i] = f.unknown == "drop"
            else:
                drop[i] = not license_allowed(expression, allow, deny)
        batch = _set(batch, "license", pa.array(licenses, pa.string()))
        return _mark(batch, drop, "license")

    return Step("license", fn)


# -- personal data ---------------------------------------------------------------------------------

PII_PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "credit-card": re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    "ip": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"),
    # International numbers with a + prefix, or North American (555) 123-4567 / 555-123-4567:
    # bare groups of digits (build numbers, versions) are not phone numbers.
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,3}"
                        r"|\(\d{3}\) ?\d{3}[-.]\d{4}|\b\d{3}[-.]\d{3}[-.]\d{4})(?!\w)"),
}
PLACEHOLDER = {"email": "<EMAIL>", "credit-card": "<CREDIT_CARD>", "iban": "<IBAN>", "ip": "<IP_ADDRESS>",
               "phone": "<PHONE>"}
#: Order matters: a card number must not be half-eaten as a phone number first.
PII_ORDER = ("email", "iban", "credit-card", "ip", "phone")


def _valid(kind: str, s: str) -> bool:
    if kind == "credit-card":
        from stdnum import luhn

        digits = re.sub(r"\D", "", s)
        return 13 <= len(digits) <= 19 and luhn.is_valid(digits)
    if kind == "iban":
        from stdnum import iban

        return iban.is_valid(s)
    if kind == "ip":
        try:
            return ipaddress.ip_address(s).is_global  # documentation and private ranges are not personal
        except ValueError:
            return False
    if kind == "phone":
        return len(re.sub(r"\D", "", s)) >= 9
    return True


def redact_pii(text: str, kinds: tuple[str, ...]) -> tuple[str, Counter]:
    """`text` with each valid match replaced by its placeholder, and the counts by kind."""
    counts: Counter = Counter()
    for kind in PII_ORDER:
        if kind not in kinds:
            continue

        def sub(m: re.Match, kind: str = kind) -> str:
            if _valid(kind, m.group(0)):
                counts[kind] += 1
                return PLACEHOLDER[kind]
            return m.group(0)

        text = PII_PATTERNS[kind].sub(sub, text)
    return text, counts


#: RE2 patterns (Arrow, vectorised) that every match of a kind also matches: documents without
#: any are skipped before the Python regexes and validators run.
PII_PREFILTER = {
    "email": r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\.[A-Za-z]{2}",
    "credit-card": r"\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d[ -]?\d",
    "iban": r"[A-Z]{2}\d{2} ?[A-Z0-9]{4}",
    "ip": r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}",
    "phone": r"(?:^|[^\w+])\+\d{1,3}[ .-]?\(?\d|\(\d{3}\) ?\d{3}[-.]\d{4}|\d{3}[-.]\d{3}[-.]\d{4}",
}


def pii_step(f: PiiFilter) -> Step:
    kinds = tuple(f.types)

    def fn(batch: pa.Table) -> pa.Table:
        active = _active(batch)
        text = batch.column("text")
        counts = np.zeros(batch.num_rows, dtype=np.int32)
        # Documents that can hold a match at all (RE2 over the whole column), then, within them,
        # the lines that can (none of the patterns crosses a line): the Python regexes and
        # validators run on those lines only, and only documents with a match are rebuilt.
        docs = np.flatnonzero(np.logical_or.reduce(
            [pc.match_substring_regex(text, PII_PREFILTER[k]).to_numpy(zero_copy_only=False) for k in kinds]) & active)
        redacted: dict[int, str] = {}
        if len(docs):
            lines = pc.split_pattern(text.take(pa.array(docs, pa.int64())), "\n")
            if isinstance(lines, pa.ChunkedArray):
                lines = lines.combine_chunks()
            flat = lines.flatten()
            owner = pc.list_parent_indices(lines).to_numpy(zero_copy_only=False)
            line_masks = {k: pc.match_substring_regex(flat, PII_PREFILTER[k]).to_numpy(zero_copy_only=False)
                          for k in kinds}
            changed: dict[int, dict[int, str]] = {}
            for j in np.flatnonzero(np.logical_or.reduce(list(line_masks.values()))):
                new, c = redact_pii(flat[int(j)].as_py(), tuple(k for k in kinds if line_masks[k][j]))
                if c:
                    d = int(owner[j])
                    counts[docs[d]] += sum(c.values())
                    changed.setdefault(d, {})[int(j)] = new
            offsets = lines.offsets.to_numpy()
            for d, repl in changed.items():
                start = int(offsets[d])
                doc_lines = lines[d].as_py()
                for j, new in repl.items():
                    doc_lines[j - start] = new
                redacted[int(docs[d])] = "\n".join(doc_lines)
        batch = _set(batch, "pii", pa.array(counts, pa.int32()))
        if f.action == "redact":
            if redacted:
                rows = sorted(redacted)
                mask = np.zeros(batch.num_rows, dtype=bool)
                mask[rows] = True
                new_text = pc.replace_with_mask(text, pa.array(mask),
                                                pa.array([redacted[i] for i in rows], text.type))
                return _set(batch, "text", new_text)
            return batch
        return _mark(batch, counts > 0, "pii")

    return Step("pii", fn)


# -- quality -------------------------------------------------------------------------------------

#: Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A,
#: table A1), with the paper's thresholds.
GOPHER = QualityRules(
    min_words=50, max_words=100_000, min_mean_word_length=3, max_mean_word_length=10,
    max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
    min_alpha_words_ratio=0.8, min_stop_words=2, max_duplicate_line_fraction=0.3,
    max_duplicate_paragraph_fraction=0.3, max_duplicate_line_char_fraction=0.2,
    max_duplicate_paragraph_char_fraction=0.2, max_top_2gram_char_fraction=0.20,
    max_top_3gram_char_fraction=0.18, max_top_4gram_char_fraction=0.16,
    max_duplicate_5gram_char_fraction=0.15, max_duplicate_6gram_char_fraction=0.14,
    max_duplicate_7gram_char_fraction=0.13, max_duplicate_8gram_char_fraction=0.12,
    max_duplicate_9gram_char_fraction=0.11, max_duplicate_10gram_char_fraction=0.10,
)
#: C4's heuristics (Raffel et al. 2020, section 2.2): its line cleaning (c4_clean_lines), then
#: at least five sentences, no "lorem ipsum", no curly braces.
C4 = QualityRules(min_sentences=5, drop_lorem_ipsum=True, drop_curly_brace=True, clean_lines=True)
#: FineWeb's filters (Penedo et al. 2024): Gopher's, plus its own three line-level rules.
FINEWEB = GOPHER.model_copy(update={"min_line_punct_ratio": 0.12, "max_short_line_ratio": 0.67,
                                    "max_duplicate_line_char_fraction": 0.01})
PRESETS = {"gopher": GOPHER, "c4": C4, "fineweb": FINEWEB, "none": QualityRules()}
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "※", "·", "- ", "* ")


def quality_reasons(text: str, r: QualityRules) -> str | None:
    """The first Gopher-style rule `text` breaks, or None.

    The rules run in a fixed order (the reason recorded is the first one broken), grouped by
    what they look at; each group returns the name of the rule broken, or None.
    """
    words = text.split()
    if not words:  # an empty text breaks only a word-count floor; no ratio can be taken
        return _word_count_rules(words, r)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (_word_count_rules(words, r)
            or _word_shape_rules(text, words, r)
            or _line_rules(lines, r)
            or _word_content_rules(words, r)
            or _paragraph_rules(text, r)
            or _duplicate_line_char_rule(text, lines, r)
            or _ngram_rules(text, words, r)
            or _line_shape_rules(lines, r)
            or _c4_rules(text, r))


def _word_count_rules(words: list[str], r: QualityRules) -> str | None:
    """Gopher's document length in words."""
    if r.min_words is not None and len(words) < r.min_words:
        return "min_words"
    if r.max_words is not None and len(words) > r.max_words:
        return "max_words"
    return None


def _word_shape_rules(text: str, words: list[str], r: QualityRules) -> str | None:
    """Gopher's mean word length and symbol-to-word ratio (`words` is not empty)."""
    n = len(words)
    mean = sum(map(len, words)) / n
    if r.min_mean_word_length is not None and mean < r.min_mean_word_length:
        return "min_mean_word_length"
    if r.max_mean_word_length is not None and mean > r.max_mean_word_length:
        return "max_mean_word_length"
    if r.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > r.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    return None


def _line_rules(lines: list[str], r: QualityRules) -> str | None:
    """Gopher's bullet, ellipsis and duplicate-line ratios over the non-blank lines."""
    if not lines:
        return None
    if r.max_bullet_lines_ratio is not None:
        bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines)
        if bullets / len(lines) > r.max_bullet_lines_ratio:
            return "max_bullet_lines_ratio"
    if r.max_ellipsis_lines_ratio is not None:
        ell = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
        if ell / len(lines) > r.max_ellipsis_lines_ratio:
            return "max_ellipsis_lines_ratio"
    if r.max_duplicate_line_fraction is not None:
        c = Counter(ln.strip() for ln in lines)
        dup = sum(v for v in c.values() if v > 1) - sum(1 for v in c.values() if v > 1)
        if dup / len(lines) > r.max_duplicate_line_fraction:
            return "max_duplicate_line_fraction"
    return None


def _word_content_rules(words: list[str], r: QualityRules) -> str | None:
    """Gopher's share of words with a letter and its stop-word floor (`words` is not empty)."""
    if r.min_alpha_words_ratio is not None:
        alpha = sum(any(ch.isalpha() for ch in w) for w in words)
        if alpha / len(words) < r.min_alpha_words_ratio:
            return "min_alpha_words_ratio"
    if r.min_stop_words is not None:
        stop_words = sum(w.lower().strip(".,;:!?\"'()") in STOP_WORDS for w in words)
        if stop_words < r.min_stop_words:
            return "min_stop_words"
    return None


def _paragraph_rules(text: str, r: QualityRules) -> str | None:
    """Gopher's duplicate paragraphs, by count and by characters (a single paragraph has none)."""
    if r.max_duplicate_paragraph_fraction is None and r.max_duplicate_paragraph_char_fraction is None:
        return None
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) <= 1:
        return None
    c = Counter(paras)
    if (r.max_duplicate_paragraph_fraction is not None
            and sum(v - 1 for v in c.values() if v > 1) / len(paras) > r.max_duplicate_paragraph_fraction):
        return "max_duplicate_paragraph_fraction"
    if r.max_duplicate_paragraph_char_fraction is not None:
        dup_chars = sum(len(p) * (v - 1) for p, v in c.items() if v > 1)
        if dup_chars / max(len(text), 1) > r.max_duplicate_paragraph_char_fraction:
            return "max_duplicate_paragraph_char_fraction"
    return None


def _duplicate_line_char_rule(text: str, lines: list[str], r: QualityRules) -> str | None:
    """Gopher's characters in duplicated lines over the characters of the text."""
    if not lines or r.max_duplicate_line_char_fraction is None:
        return None
    c = Counter(ln.strip() for ln in lines)
    dup_chars = sum(len(ln) * (v - 1) for ln, v in c.items() if v > 1)
    if dup_chars / max(len(text), 1) > r.max_duplicate_line_char_fraction:
        return "max_duplicate_line_char_fraction"
    return None


def _line_shape_rules(lines: list[str], r: QualityRules) -> str | None:
    """FineWeb's line rules: lines ending in punctuation, and short lines."""
    if not lines:
        return None
    if (r.min_line_punct_ratio is not None
            and sum(ln.rstrip().endswith(_TERMINAL) for ln in lines) / len(lines) < r.min_line_punct_ratio):
        return "min_line_punct_ratio"
    if (r.max_short_line_ratio is not None
            and sum(len(ln.strip()) <= 30 for ln in lines) / len(lines) > r.max_short_line_ratio):
        return "max_short_line_ratio"
    return None


def _c4_rules(text: str, r: QualityRules) -> str | None:
    """C4's document rules: enough sentences, no placeholder text, no code braces."""
    if r.min_sentences is not None and len(_SENTENCE_END.findall(text)) < r.min_sentences:
        return "min_sentences"
    if r.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return "drop_lorem_ipsum"
    if r.drop_curly_brace and ("{" in text or "}" in text):
        return "drop_curly_brace"
    return None


_TERMINAL = (".", "!", "?", '"', "'", "…")
_SENTENCE_END = re.compile(r"[.!?…](?:\s|$)")


def _ngram_rules(text: str, words: list[str], r: QualityRules) -> str | None:
    """Gopher's n-gram repetition rules, read the way datatrove's GopherRepetitionFilter reads them.

    Top n-gram (n = 2..4): the characters of the most frequent n-gram times its count, over the
    characters of the text. Duplicated n-grams (n = 5..10): walking the words, each n-gram seen
    before adds its characters and jumps past itself; the sum over the characters of the text.
    """
    total = len(text)
    if total == 0:
        return None
    for n in (2, 3, 4):
        limit = getattr(r, f"max_top_{n}gram_char_fraction")
        if limit is None or len(words) < n:
            continue
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count > 1 and sum(map(len, gram)) * count / total > limit:
            return f"max_top_{n}gram_char_fraction"
    for n in range(5, 11):
        limit = getattr(r, f"max_duplicate_{n}gram_char_fraction")
        if limit is None or len(words) < n:
            continue
        seen: set[tuple[str, ...]] = set()
        repeated, i = 0, 0
        while i < len(words) - n + 1:
            g = tuple(words[i:i + n])
            if g in seen:
                repeated += sum(map(len, g))
                i += n
            else:
                seen.add(g)
                i += 1
        if repeated / total > limit:
            return f"max_duplicate_{n}gram_char_fraction"
    return None


def effective_rules(f: QualityFilter) -> QualityRules:
    """The preset with the manifest's overrides on top."""
    base = PRESETS[f.preset].model_dump()
    if f.rules is not None:
        base.update({k: v for k, v in f.rules.model_dump().items() if v is not None})
    return QualityRules(**base)


_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_C4_TERMINAL = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)


def c4_clean_lines(text: str) -> tuple[str, int]:
    """C4's line cleaning (Raffel et al. 2020, section 2.2, as TFDS's c4_utils and datatrove's
    C4QualityFilter apply it): the text with only the lines that end in terminal punctuation,
    have at least 3 words and no word over 1,000 characters, do not mention javascript and are
    not cookie or privacy-policy boilerplate, with citation marks removed; and how many lines
    went."""
    kept: list[str] = []
    removed = 0
    for line in text.splitlines():
        line = _CITATION.sub("", line).strip()
        if not line:
            continue
        words = line.split()
        low = line.lower()
        if (not line.endswith(_C4_TERMINAL) or len(words) < 3 or max(map(len, words)) > 1000
                or "javascript" in low or any(p in low for p in _C4_POLICY)):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept), removed


def quality_step(f: QualityFilter) -> Step:
    rules = effective_rules(f)

    def fn(batch: pa.Table) -> pa.Table:
        active = _active(batch)
        is_code = batch.column("is_code").to_numpy(zero_copy_only=False)
        texts = batch.column("text").to_pylist()
        why: list[str | None] = [None] * batch.num_rows
        removed = np.zeros(batch.num_rows, dtype=np.int32)
        for i in np.flatnonzero(active & (f.apply_to_code | ~is_code)):
            if rules.clean_lines:
                texts[i], removed[i] = c4_clean_lines(texts[i])
                if not texts[i]:
                    why[i] = "clean_lines"
                    continue
            why[i] = quality_reasons(texts[i], rules)
        batch = _set(batch, "quality_rule", pa.array(why, pa.string()))
        if rules.clean_lines:
            batch = _set(batch, "text", pa.array(texts, pa.large_string()))
            batch = _set(batch, "lines_removed", pa.array(removed, pa.int32()))
        return _mark(batch, np.array([w is not None for w in why]), "quality")

    return Step("quality", fn)


BUILDERS = {"language": language_step, "length": length_step, "hap": hap_step, "license": license_step,
            "pii": pii_step, "quality": quality_step}


def build_steps(filters: list) -> list[Step]:
    """The manifest's filters as steps, in order."""
    return [BUILDERS[f.type](f) for f in filters]
