"""The filters one by one, on small project-written texts and on the machine's licence files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from fmforge.api.v1alpha1.datapile import LicenseFilter, PiiFilter, QualityFilter, QualityRules
from fmforge.stages.datapile.filters import (
    C4,
    FINEWEB,
    GOPHER,
    detect_licenses,
    effective_rules,
    hap_scores,
    license_step,
    pii_step,
    quality_reasons,
    quality_step,
    redact_pii,
)

PROSE = (
    "The interpreter reads the program one statement at a time and keeps the names it has seen in "
    "a dictionary. When a function is called, a new frame is created with its own local names, and "
    "the frame is discarded when the function returns. Exceptions unwind the frames until a handler "
    "is found; if none is found, the interpreter prints a traceback and exits with a non-zero status. "
    "Modules are executed once, on their first import, and then cached for the rest of the run."
)


def test_gopher_keeps_good_prose():
    assert quality_reasons(PROSE, GOPHER) is None


@pytest.mark.parametrize("text,rule", [
    ("Too short to be a document.", "min_words"),
    (" ".join(["incomprehensibilities"] * 60), "max_mean_word_length"),
    ("# " * 30 + PROSE, "max_symbol_word_ratio"),
    ("\n".join(f"- remember the important shopping things number{i}" for i in range(60)),
     "max_bullet_lines_ratio"),
    ("\n".join(f"and then the story of the item number{i} went on for a long while..." for i in range(60)),
     "max_ellipsis_lines_ratio"),
    (" ".join(["12345", "67890", "||||", "====="] * 20) + " the and of", "min_alpha_words_ratio"),
    (" ".join(f"word{i} thing{i}" for i in range(60)), "min_stop_words"),
    ("\n".join(["the same line of text is here again"] * 20 + [PROSE]), "max_duplicate_line_fraction"),
    (PROSE + " " + " ".join(["cheap watches"] * 40), "max_top_2gram_char_fraction"),
])
def test_gopher_rules(text, rule):
    assert quality_reasons(text, GOPHER) == rule


def test_duplicated_ngrams():
    tail = "the quick brown fox jumps over the lazy dog near the river bank at noon"
    text = PROSE + " " + " ".join([tail] * 4)
    assert quality_reasons(text, GOPHER).startswith(("max_duplicate_", "max_top_"))


def test_presets_and_overrides():
    code_like = PROSE + " Use a dict such as {'a': 1} for that."
    assert quality_reasons(code_like, C4) == "drop_curly_brace"
    assert quality_reasons("One sentence only. " + PROSE[:40], C4) == "min_sentences"
    assert quality_reasons(PROSE, FINEWEB) is None
    f = QualityFilter(type="quality", preset="gopher", rules=QualityRules(min_words=5))
    assert effective_rules(f).min_words == 5 and effective_rules(f).max_words == 100_000
    assert quality_reasons("The rule said that this is short and fine.", effective_rules(f)) is None


def test_hap_scores_worst_sentence():
    s = hap_scores([PROSE, PROSE + " You are a fucking idiot and a piece of shit.", ""])
    assert s[0] < 0.5 and s[1] > 0.9 and s[2] == 0


@pytest.mark.parametrize("text,kind,placeholder", [
    ("write to jane.doe@example.org today", "email", "<EMAIL>"),
    ("call +1 415 555 0100 now", "phone", "<PHONE>"),
    ("call (415) 555-0100 now", "phone", "<PHONE>"),
    ("card 4111-1111-1111-1111 used", "credit-card", "<CREDIT_CARD>"),
    ("IBAN DE89 3704 0044 0532 0130 00 paid", "iban", "<IBAN>"),
    ("host 8.8.4.4 answered", "ip", "<IP_ADDRESS>"),
])
def test_pii_found(text, kind, placeholder):
    out, counts = redact_pii(text, ("email", "phone", "credit-card", "ip", "iban"))
    assert counts[kind] == 1 and placeholder in out


@pytest.mark.parametrize("text", [
    "version 3.11.7 released 2024-01-15",
    "build 1234 5678 9012 3456 (fails Luhn)",
    "examples use 192.0.2.1, 10.0.0.1 and 127.0.0.1",
    "IBAN DE00 3704 0044 0532 0130 00 has a wrong check",
    "x = a+1 if n+2 > 3 else b",
])
def test_pii_not_found(text):
    out, counts = redact_pii(text, ("email", "phone", "credit-card", "ip", "iban"))
    assert not counts and out == text


def _batch(texts, licenses=None):
    n = len(texts)
    return pa.table({"text": pa.array(texts, pa.large_string()), "is_code": [False] * n,
                     "source_license": licenses or [None] * n, "dropped": pa.nulls(n, pa.string())})


def test_pii_step_by_lines_equals_redacting_whole_documents():
    """The step runs the regexes only on the lines the RE2 pre-filter picks: the text and the
    counts must be what redact_pii gives on whole documents, at line starts and ends too."""
    import json
    import sysconfig
    from pathlib import Path

    from paths import STAGE_DATA

    texts = [json.loads(line)["text"] for line in (STAGE_DATA / "pii.jsonl").read_text().splitlines()]
    texts += ["jane@example.org\nfirst line then +44 20 7946 0958\n8.8.8.8",
              "windows lines: a@b.io\r\ncard 4111 1111 1111 1111\r\nend 8.8.4.4\r\n",
              "no personal data at all\n\n", "", PROSE]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [(stdlib / name).read_text(errors="replace") for name in ("smtplib.py", "ipaddress.py", "email/utils.py")]
    kinds = ("email", "phone", "credit-card", "ip", "iban")
    out = pii_step(PiiFilter(type="pii", action="redact"))(_batch(texts))
    expected = [redact_pii(t, kinds) for t in texts]
    assert out.column("text").to_pylist() == [e[0] for e in expected]
    assert out.column("pii").to_pylist() == [sum(e[1].values()) for e in expected]
    assert sum(out.column("pii").to_pylist()) > 10


def test_pii_drop_action():
    out = pii_step(PiiFilter(type="pii", action="drop"))(_batch(["mail me at a@b.io please", PROSE]))
    assert out.column("dropped").to_pylist() == ["pii", None]


#: The system's licence texts (Debian's base-files, /usr/share/common-licenses) and what each
#: must be detected as. Every one must be there: a missing file fails the test, never skips it.
COMMON_LICENSES = {"Apache-2.0": ["Apache-2.0"], "GPL-3": ["GPL-3.0"], "GPL-2": ["GPL-2.0"],
                   "LGPL-2.1": ["LGPL-2.1"], "MPL-2.0": ["MPL-2.0"], "CC0-1.0": ["CC0-1.0"], "BSD": ["BSD-3-Clause"]}


def test_licence_detection_on_the_machines_licence_texts():
    import sysconfig

    common = Path("/usr/share/common-licenses")
    missing = [name for name in COMMON_LICENSES if not (common / name).is_file()]
    assert missing == [], f"licence texts missing from {common} (Debian's base-files package ships them)"
    for name, ids in COMMON_LICENSES.items():
        assert detect_licenses((common / name).read_text()) == ids, name
    # Python's own licence names the GPL in passing: that is not a GPL text. Not in the fixed list:
    # python.org and pyenv builds install it beside the standard library, Debian's python3 does not.
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.is_file():
        assert detect_licenses(py_license.read_text()) == ["PSF-2.0"]
    assert detect_licenses("// SPDX-License-Identifier: MIT OR Apache-2.0\nint x;") == ["MIT OR Apache-2.0"]
    assert detect_licenses(PROSE) == []


def test_licence_allow_deny_unknown():
    texts = ["# SPDX-License-Identifier: GPL-3.0\nx = 1", "# SPDX-License-Identifier: MIT\nx = 1", PROSE, PROSE]
    step = license_step(LicenseFilter(type="license", allow=["MIT", "PSF-2.0"], unknown="drop"))
    out = step(_batch(texts, [None, None, None, "PSF-2.0"]))
    assert out.column("dropped").to_pylist() == ["license", None, "license", None]
    assert out.column("license").to_pylist() == ["GPL-3.0", "MIT", "unknown", "PSF-2.0"]
    deny = license_step(LicenseFilter(type="license", deny=["GPL-3.0"]))(_batch(texts))
    assert deny.column("dropped").to_pylist() == ["license", None, None, None]


def test_licence_expressions_or_is_a_choice_and_is_not():
    """SPDX OR lets the user pick an allowed licence; AND needs all of them allowed; WITH keeps
    the licence's own id; a garbled header is no licence at all."""
    texts = ["# SPDX-License-Identifier: MIT OR GPL-3.0\nx = 1",
             "# SPDX-License-Identifier: MIT AND GPL-3.0\nx = 1",
             "# SPDX-License-Identifier: (GPL-3.0 OR Apache-2.0) AND MIT\nx = 1",
             "# SPDX-License-Identifier: GPL-2.0 WITH Classpath-exception-2.0\nx = 1",
             "# SPDX-License-Identifier: MIT OR OR\nx = 1"]
    allow = license_step(LicenseFilter(type="license", allow=["MIT", "Apache-2.0"], unknown="drop"))(_batch(texts))
    assert allow.column("dropped").to_pylist() == [None, "license", None, "license", "license"]
    assert allow.column("license").to_pylist() == [
        "MIT OR GPL-3.0", "MIT AND GPL-3.0", "(GPL-3.0 OR Apache-2.0) AND MIT", "GPL-2.0 WITH Classpath-exception-2.0",
        "unknown"]
    deny = license_step(LicenseFilter(type="license", deny=["GPL-3.0", "GPL-2.0"]))(_batch(texts))
    assert deny.column("dropped").to_pylist() == [None, "license", None, "license", None]
    # a licence header found beside an SPDX line naming another licence: both apply
    both = license_step(LicenseFilter(type="license", allow=["MIT"]))(
        _batch(["# SPDX-License-Identifier: MIT OR BSD-2-Clause\n" + PROSE + "\nLicensed under the Apache License, "
                "Version 2.0 (the License)"]))
    assert both.column("license").to_pylist() == ["Apache-2.0 AND (MIT OR BSD-2-Clause)"]
    assert both.column("dropped").to_pylist() == ["license"]


def test_c4_line_cleaning():
    from fmforge.stages.datapile.filters import c4_clean_lines

    text = "\n".join([
        "Python is a programming language that lets you work quickly.",
        "Home | About | Contact",                                   # no terminal punctuation
        "Read more.",                                               # fewer than 3 words
        "Please enable JavaScript to view the comments below.",    # javascript
        "This site uses cookies to improve your experience.",      # policy boilerplate
        "It was created by Guido van Rossum[1] and first released in 1991.[citation needed]",
        "",
    ])
    cleaned, removed = c4_clean_lines(text)
    assert cleaned.splitlines() == ["Python is a programming language that lets you work quickly.",
                                    "It was created by Guido van Rossum and first released in 1991."]
    assert removed == 4
    assert c4_clean_lines("no punctuation here\nnor here")[0] == ""


def test_c4_preset_cleans_lines_then_applies_the_page_rules():
    good = " ".join(f"Sentence number {i} is about the standard library." for i in range(6))
    menu = "Home | Downloads | Docs"
    step = quality_step(QualityFilter(type="quality", preset="c4"))
    out = step(_batch([good + "\n" + menu, "Only one sentence here.\n" + menu, menu]))
    assert out.column("dropped").to_pylist() == [None, "quality", "quality"]
    assert out.column("quality_rule").to_pylist() == [None, "min_sentences", "clean_lines"]
    assert out.column("text").to_pylist()[0] == good, "the menu line is gone from the kept text"
    assert out.column("lines_removed").to_pylist() == [1, 1, 1]
    # gopher does not clean lines: the text is left as it was
    g = quality_step(QualityFilter(type="quality", preset="gopher"))(_batch([good + "\n" + menu]))
    assert g.column("text").to_pylist()[0] == good + "\n" + menu
