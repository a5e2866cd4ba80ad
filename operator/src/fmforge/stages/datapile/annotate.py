"""Categorize documents: natural language (lingua) and programming language (Pygments).

Both run per Arrow batch. lingua's Rust detector works on the whole batch in parallel and gives
a confidence; Pygments identifies a source file from its name and, where the name says nothing,
from its content. Prose gets `lang`/`lang_confidence`; code gets `prog_lang`.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa

#: Languages lingua tells apart. A bounded set keeps detection fast and memory small; a document
#: in another language is recorded with a low confidence, i.e. `unknown`.
LANGUAGES = ("EN", "DE", "FR", "ES", "IT", "PT", "NL", "SV", "PL", "RU", "UK", "TR", "AR", "ZH", "JA", "KO",
             "HI", "CS", "DA", "FI")
SAMPLE_CHARS = 2000


#: Texts shorter than this go to the high-accuracy detector (all n-gram models); longer ones to
#: the low-accuracy one (trigrams only), which loads ~20x faster and is as accurate on
#: document-length text, per lingua's own evaluation, but misreads single short sentences.
SHORT_TEXT = 200


@functools.lru_cache(maxsize=2)
def _detector(low_accuracy: bool = True):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c)) for c in LANGUAGES]
    builder = LanguageDetectorBuilder.from_languages(*langs)
    return (builder.with_low_accuracy_mode() if low_accuracy else builder).build()


def natural_language(texts: list[str], min_confidence: float) -> tuple[list[str | None], np.ndarray]:
    """ISO 639-1 code (or `unknown`) and confidence of each text."""
    codes: list[str | None] = ["unknown"] * len(texts)
    conf = np.zeros(len(texts))
    short = [i for i, t in enumerate(texts) if len(t) < SHORT_TEXT]
    long_ = [i for i, t in enumerate(texts) if len(t) >= SHORT_TEXT]
    for idx, low in ((long_, True), (short, False)):
        if not idx:
            continue
        values = _detector(low).compute_language_confidence_values_in_parallel(
            [texts[i][:SAMPLE_CHARS] for i in idx])
        for i, vals in zip(idx, values, strict=True):
            if vals:
                conf[i] = vals[0].value
                if vals[0].value >= min_confidence:
                    codes[i] = vals[0].language.iso_code_639_1.name.lower()
    return codes, conf


@functools.lru_cache(maxsize=1)
def _filename_index() -> tuple[dict[str, list[str]], re.Pattern]:
    """Pygments' file-name patterns, indexed: `*.ext` patterns by extension, and one regex for
    all the others (`Dockerfile`, `*.css.j2`, `*.[1-9]`…)."""
    from pygments.lexers import get_all_lexers

    by_ext: dict[str, list[str]] = {}
    other: list[str] = []
    for name, _aliases, patterns, _mimetypes in get_all_lexers():
        for p in patterns:
            if re.fullmatch(r"\*\.[A-Za-z0-9_+\-]+", p):
                by_ext.setdefault(p[1:], []).append(name)
            else:
                other.append(p)
    return by_ext, re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in other))


@functools.lru_cache(maxsize=4096)
def _lexer_for_name(name: str) -> str | None:
    """Pygments' lexer for a file name. Pygments tries every pattern of every lexer on each
    call (~1 ms; file names are mostly distinct, so a cache alone does not help): a name whose
    extension belongs to exactly one lexer, and that no other pattern matches, is answered from
    the index; the rest go to Pygments."""
    from pygments.lexers import get_lexer_for_filename
    from pygments.util import ClassNotFound

    by_ext, other = _filename_index()
    candidates = by_ext.get("." + name.rsplit(".", 1)[-1], []) if "." in name else []
    if len(candidates) == 1 and not other.match(name):
        return candidates[0].lower()
    try:
        return get_lexer_for_filename(name).name.lower()
    except ClassNotFound:
        return None


def programming_language(path: str, text: str) -> str:
    """Pygments' lexer name for a source file: by file name, else by content."""
    name = PurePosixPath(path).name
    lang = _lexer_for_name(name) if "." in name else None
    if lang is None:
        from pygments.lexers import guess_lexer
        from pygments.util import ClassNotFound

        try:
            lang = guess_lexer(text[:SAMPLE_CHARS]).name.lower()
        except ClassNotFound:
            lang = "unknown"
        # Pygments' last resort is plain text: that is not a programming language.
        if lang in ("text only", "text"):
            lang = "unknown"
    return lang


def annotate(batch: pa.Table, nl_enabled: bool, min_confidence: float, pl_enabled: bool) -> pa.Table:
    """`batch` with lang, lang_confidence and prog_lang columns added."""
    is_code = batch.column("is_code").to_numpy(zero_copy_only=False)
    texts = batch.column("text").to_pylist()
    n = batch.num_rows
    lang: list[str | None] = [None] * n
    conf = np.full(n, np.nan)
    prose = np.flatnonzero(~is_code)
    if nl_enabled and len(prose):
        codes, c = natural_language([texts[i] for i in prose], min_confidence)
        for j, i in enumerate(prose):
            lang[i] = codes[j]
        conf[prose] = c
    prog: list[str | None] = [None] * n
    if pl_enabled:
        paths = batch.column("path").to_pylist()
        for i in np.flatnonzero(is_code):
            prog[i] = programming_language(paths[i], texts[i])
    batch = batch.append_column("lang", pa.array(lang, pa.string()))
    batch = batch.append_column("lang_confidence", pa.array(conf, pa.float32(), mask=np.isnan(conf)))
    return batch.append_column("prog_lang", pa.array(prog, pa.string()))
