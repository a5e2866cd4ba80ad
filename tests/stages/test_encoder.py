"""tiktoken encodes exactly like `tokenizers`: the whole quickstart corpus and hostile strings give
the same ids with both, for the byte-level BPE the DataPile trains and for a Llama-3-style one;
tokenizers tiktoken cannot reproduce are refused with the reason; a difference found while
encoding falls back to `tokenizers`, loudly."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import unicodedata

import pytest
import yaml
from paths import ROOT

from fmforge.api.v1alpha1.datapile import DataPileSpec
from fmforge.stages.datapile import encoder_summary
from fmforge.stages.datapile import tokenize as tk
from fmforge.stages.datapile.sources import read_source

#: Llama 3's pre-tokenizer pattern (its tokenizer.json's Split), the same as tiktoken's cl100k.
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")


def hostile() -> list[str]:
    """Strings where two encoders are most likely to part: every Unicode whitespace, runs of it,
    long numbers, digits of other scripts, emoji sequences, combining marks, scripts without
    spaces, letters of recent Unicode versions, private use, replaced invalid surrogates,
    contractions in odd case, added tokens inside text, control characters, long runs of one
    character, random text over the first 12,288 code points, and 1 MB lines."""
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) + "\u200b\u2060\ufeff\u180e"
    rng = random.Random(7)
    pool = [chr(c) for c in range(0x20, 0x3000) if unicodedata.category(chr(c)) != "Cs"] + ["\n", " ", "\t"]
    # what a reader makes of lone surrogates (`errors="replace"`), and what Python writes for them
    replaced = b"ok \xed\xa0\x80 \xff\xfe bad".decode("utf-8", errors="replace")
    return [
        "", " ", "  ", "\n", "\r\n\r\n", "\t\t \t", " " * 1000 + "x", "a" + " " * 17 + "b", "x \n \n  y  \n",
        spaces, "a" + spaces + "b" + spaces, "".join(f"{c}x" for c in spaces), "".join(f"{c}{c} 1" for c in spaces),
        "1" * 60, "12345678901234567890 3.14159e-10 -0x1F 1,000,000 2026-12-06T10:29:32Z",
        "٣٤٥ ۱۲۳ ०१२ ²³ ½ Ⅻ ⑦ ௰ 𝟙𝟚", "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 🇫🇷🇩🇪 emoji😀text 🫠🪿",
        "e\u0301 n\u0303 \u0915\u094d\u0937 한국어 日本語の文 中文字符 עברית العربية ไทย",
        "\ufffd\ufffd bad \ufffd", replaced, "I'm he'S they'LL we've 'd '' ' s O'Neil's",
        "<|endoftext|>", "a<|endoftext|>b <|pad|><|endoftext|> <|end_of_text|>", "<|endoftext", "\x00\x01\x1f\x7f",
        "\U0001e030\U0001e031 \U00011f00\U00011f01 \U0001e4d0", "\U000f0000\ue000 \U0010fffd \u0378 \U0002ebf0",
        "ÿ¡¬® Āā", "".join(chr(i) for i in range(32, 0x800)),
        "a" * 100_000, "ab" * 50_000, "1" * 10_000, "!" * 10_000, "\n" * 10_000, " \t" * 5_000,
        *("".join(rng.choice(pool) for _ in range(2000)) for _ in range(20)),
        ("The quick brown fox 12345 jumps; " * 40_000)[:1_000_000], "x" * 1_000_000,
    ]


@pytest.fixture(scope="module")
def quickstart_texts(tmp_path_factory) -> list[str]:
    """Every document of the whole quickstart corpus, as the DataPile reads it."""
    d = tmp_path_factory.mktemp("quickstart")
    subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart" / "build-corpus.py"), "--out",
                    str(d / "corpus")], check=True, capture_output=True)
    spec = DataPileSpec.model_validate(yaml.safe_load((ROOT / "examples/quickstart/datapile.yaml").read_text())["spec"])
    texts = [t for s in spec.sources for t in read_source(s, d)[0].column("text").to_pylist()]
    assert sum(map(len, texts)) > 5_000_000
    return texts


def _trained(texts: list[str]) -> str:
    """The tokenizer the DataPile trains (the quickstart's settings), on 4 MB of the corpus."""
    return tk.train_tokenizer(_head(texts, 4_000_000), 2048, 2).to_str()


def _llama3(texts: list[str]) -> str:
    """A Llama-3-style tokenizer: its split pattern, byte-level, ignore_merges, special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=2, show_progress=False,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_head(texts, 4_000_000), trainer)
    return tok.to_str()


def _head(texts: list[str], chars: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= chars:
            break
        out.append(t)
        n += len(t)
    return out


@pytest.mark.parametrize("make", [_trained, _llama3], ids=["trained", "llama3-style"])
def test_tiktoken_gives_the_ids_of_tokenizers(quickstart_texts: list[str], make):
    tokenizer_json = make(quickstart_texts)
    enc, why = tk.encoder_of(tokenizer_json)
    assert enc is not None, why
    texts = quickstart_texts + hostile()
    got = enc.encode_batch(texts, num_threads=2, allowed_special="all", disallowed_special=())
    want = tk._hf_encode(texts, tokenizer_json)
    differ = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    assert not differ, f"{len(differ)} texts differ, the first: {texts[differ[0]][:200]!r}"
    # the stage's path: tiktoken ran, its sample check agreed
    ids, how = tk.encode_texts(texts, tokenizer_json)
    assert ids == want and how.encoder == "tiktoken" and not how.differed
    assert how.checked == len(range(0, len(texts), tk.CHECK_EVERY))


def _edit(tokenizer_json: str, change) -> str:
    spec = json.loads(tokenizer_json)
    change(spec)
    return json.dumps(spec)


def test_what_tiktoken_cannot_reproduce_is_encoded_by_tokenizers(quickstart_texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = _trained(quickstart_texts[:40])
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(quickstart_texts[:40], trainers.WordPieceTrainer(vocab_size=500,
                                                                                  special_tokens=["[UNK]"]))

    def lstrip(spec):
        spec["added_tokens"][0]["lstrip"] = True

    def unordered(spec):
        spec["model"]["merges"][0], spec["model"]["merges"][-1] = spec["model"]["merges"][-1], \
            spec["model"]["merges"][0]

    refused = {
        "normalizer": _edit(base, lambda s: s.update(normalizer={"type": "Lowercase"})),
        "add_prefix_space": _edit(base, lambda s: s["pre_tokenizer"].update(add_prefix_space=True)),
        "WordPiece": wordpiece.to_str(),
        "strips": _edit(base, lstrip),
        "does not follow the token ids": _edit(base, unordered),
    }
    texts = [" Hello <|endoftext|> world", *quickstart_texts[:5]]
    for reason, tokenizer_json in refused.items():
        enc, why = tk.encoder_of(tokenizer_json)
        assert enc is None and reason in why, (reason, why)
        ids, how = tk.encode_texts(texts, tokenizer_json)
        assert how.encoder == "tokenizers" and how.why == why and not how.differed
        assert ids == tk._hf_encode(texts, tokenizer_json)


def test_a_difference_found_while_encoding_falls_back_loudly(quickstart_texts: list[str], monkeypatch, caplog):
    """tiktoken built with the wrong split pattern passes for the right one: the sample check sees
    the difference, the piece is encoded by tokenizers, the log and the card say so."""
    tokenizer_json = _trained(quickstart_texts[:40])
    right = tk.tiktoken_encoding(tokenizer_json)
    import tiktoken

    wrong = tiktoken.Encoding("wrong", pat_str=r"\S+|\s+", mergeable_ranks=right._mergeable_ranks,
                              special_tokens=right._special_tokens)
    monkeypatch.setattr(tk, "encoder_of", lambda _: (wrong, ""))
    texts = quickstart_texts[:100]
    with caplog.at_level(logging.WARNING, logger=tk.__name__):
        ids, how = tk.encode_texts(texts, tokenizer_json)
    assert ids == tk._hf_encode(texts, tokenizer_json)
    assert how.encoder == "tokenizers" and how.differed and "differ" in how.why
    assert "Encoded a piece with tokenizers" in caplog.text
    ok = tk.Encoding("tiktoken", checked=4, seconds=1.0)
    card = encoder_summary([ok, how, ok])
    assert (card.encoder, card.pieces, card.fell_back, card.why) == ("tiktoken and tokenizers",
                                                                     {"tiktoken": 2, "tokenizers": 1}, 1, how.why)
    assert card.documents_checked == 8 + how.checked
