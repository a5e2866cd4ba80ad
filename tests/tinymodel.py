"""A tiny real causal LM for the tests that need a model and not its quality.

A two-layer GPT-2 with a byte-level BPE tokenizer trained here on the Python standard library's
sources; its weights are untrained (seeded, so its bytes and digest are the same every time).
Shared by the stage tests (the entrypoint, the gate, the model server and its fuzz test), the
cluster tests (the verdicts on the real control plane) and the serving benchmark.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def tiny_gpt(out: Path, *, vocab: int = 512, files: int = 150, positions: int = 64, width: int = 32,
             layers: int = 2, heads: int = 2, never_ends: bool = False) -> Path:
    """Save the model and its tokenizer into `out` (Hugging Face layout); `out`. The tokenizer
    trains on the first `files` modules of the standard library. `never_ends`: the end-of-text
    token is never likely enough to end a generation early (a generation lasts as long as
    max_tokens says, as the disconnect tests need)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:files]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = fast.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=positions, n_embd=width, n_layer=layers,
                                       n_head=heads, bos_token_id=eos, eos_token_id=eos))
    if never_ends:
        with torch.no_grad():
            model.lm_head.weight[eos] = 0  # tied to the embedding: the eos row is zero there too
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
