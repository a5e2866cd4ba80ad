"""Model presets and the transformers configs a TrainingRun trains from scratch.

`model_config` turns the spec's `model` (architecture, family, preset, overrides) and the pile's
tokenizer into a transformers config (LlamaConfig, GPT2Config or BertConfig) as a plain dict, so
that it travels to the Ray Train workers; sizes that cannot work are refused here, before any
worker starts. `tokenizer` loads the pile's tokenizer, with a mask token added for encoders.
Called by the TrainingRun stage's driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import InvalidSpec

MASK = "<|mask|>"


@dataclass(frozen=True)
class Sizes:
    """Sizes of a preset; each one a spec's `model.config` field may override."""

    layers: int
    """Transformer blocks."""
    hidden: int
    """Hidden size."""
    heads: int
    """Attention heads (head size = hidden / heads)."""


#: tiny runs on a laptop in minutes; small and base are the GPT-2 small-class sizes.
PRESETS = {"tiny": Sizes(4, 256, 4), "small": Sizes(8, 512, 8), "base": Sizes(12, 768, 12)}


def tokenizer(path: Path, architecture: str):
    """The pile's tokenizer; for an encoder with a mask token (`<|mask|>`) added, which masked-LM
    training needs and a byte-level BPE pile tokenizer does not have."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise InvalidSpec(f"the pile's tokenizer at {path} has no end-of-text token; re-run the DataPile with a "
                          f"tokenizer that has one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if architecture == "encoder" and tok.mask_token_id is None:
        tok.add_special_tokens({"mask_token": MASK})
    return tok


def model_config(model, tok, sequence_length: int) -> dict[str, Any]:
    """The transformers config (as `to_dict()`) of `model` (the spec's), for this tokenizer and
    the pile's sequence length."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    preset = PRESETS[model.preset]
    c = model.config
    layers = c.layers or preset.layers
    hidden = c.hidden or preset.hidden
    heads = c.heads or preset.heads
    context = c.context_length or sequence_length
    where = "spec.model.config" if (c.hidden or c.heads) else f"spec.model.preset {model.preset}"
    if hidden % heads:
        raise InvalidSpec(f"{where}: hidden {hidden} is not a multiple of heads {heads}; choose sizes where "
                          f"heads divides hidden")
    if context < sequence_length:
        raise InvalidSpec(f"spec.model.config.contextLength: {context} is shorter than the pile's sequences "
                          f"({sequence_length} tokens); set contextLength to at least {sequence_length} or unset it")
    if model.family == "llama" and (hidden // heads) % 2:
        raise InvalidSpec(f"{where}: llama's rotary embeddings need an even head size, and hidden {hidden} / "
                          f"heads {heads} is {hidden // heads}; choose hidden and heads so that it is even")
    vocab = len(tok)
    ids = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if model.family == "llama":
        # Llama's feed-forward is a gated (SwiGLU) MLP: 8/3 x hidden keeps its parameters at 4 x
        # hidden's of a plain MLP; rounded up to a multiple of 64 for the matrix kernels.
        inter = c.intermediate or -(-(8 * hidden // 3) // 64) * 64
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                          tie_word_embeddings=True, **ids)
    elif model.family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_inner=c.intermediate or 4 * hidden, **ids)
    else:
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=c.intermediate or 4 * hidden, max_position_embeddings=context,
                         type_vocab_size=1, pad_token_id=tok.pad_token_id)
    return cfg.to_dict()
