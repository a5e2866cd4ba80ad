"""A tiny real causal LM for the tests that need a model and not its quality.

A two-layer GPT-2 with a byte-level BPE tokenizer trained here on the Python standard library's
sources; its weights are untrained (seeded, so its bytes and digest are the same every time).
Shared by the stage tests (the ModelCard entrypoint) and the cluster tests (the verdicts on the
real control plane).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def tiny_gpt(out: Path) -> Path:
    """Save the model and its tokenizer into `out` (Hugging Face layout); `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:150]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = fast.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(out)
    fast.save_pretrained(out)
    return out
