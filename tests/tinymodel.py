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
             layers: int = 2, heads: int = 2, never_ends: bool = False, chat_template: str | None = None) -> Path:
    """Save the model and its tokenizer into `out` (Hugging Face layout); `out`. The tokenizer
    trains on the first `files` modules of the standard library. `never_ends`: the end-of-text
    token is never likely enough to end a generation early (a generation lasts as long as
    max_tokens says, as the disconnect tests need). `chat_template`: the tokenizer's (none by
    default, as the models fmforge trains from scratch have none)."""
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
    if chat_template is not None:
        fast.chat_template = chat_template
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


#: ChatML, the chat template of SmolLM2 and many instruct models, without a default system turn.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _pretrained_llama(texts: list[str], tok, hidden: int, layers: int, heads: int, ff: int, steps: int):
    """A tiny Llama trained here on `texts` (tokenized by `tok`, a `tokenizers.Tokenizer`) for
    `steps` steps: weights that predict text better than chance, so that tuning them shows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=ff,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=heads, max_position_embeddings=128, rms_norm_eps=1e-5,
                                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=2))
    ids = torch.tensor([i for t in texts for i in tok.encode(t).ids + [eos]][:16 * 64 * 40]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = ids[torch.randint(len(ids), (16,), generator=torch.Generator().manual_seed(step))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _llama_cpp_permute(weights, heads: int):
    """The row order llama.cpp's converter gives q and k projections (rotary pairs interleaved),
    which transformers' GGUF reader undoes."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def tiny_gguf(out: Path, chat_template: str | None = CHATML, quantize: bool = True, steps: int = 120) -> Path:
    """Write a tiny llama GGUF file to `out` as llama.cpp lays one out: metadata, a 512-token
    byte-level BPE with the ChatML tokens (and `chat_template`, unless None), and the weights of
    a 2-layer, 64-wide Llama trained here for `steps` steps on standard-library sources (seeded:
    the same bytes every time), the matrices quantized to Q8_0 (`quantize`) or kept in F32, q and
    k permuted as llama.cpp's converter does, the output tied to the embedding as in SmolLM2.
    What the GGUF tests load in a second instead of the 135M-parameter SmolLM2."""
    import json

    import gguf
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = json.loads(tok.to_str())["model"]
    vocab = sorted(bpe["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    hidden, layers, heads, ff = 64, 2, 4, 128
    model = _pretrained_llama(texts, tok, hidden, layers, heads, ff, steps)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("fmforge tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def matrix(name: str, a) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if quantize:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    matrix("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        matrix(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], heads))
        matrix(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], heads))
        matrix(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        matrix(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        matrix(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        matrix(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        matrix(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
