"""Tiny random-weight Hugging Face models of each preset's architecture family, saved as local folders.

Each folder is what `model.source: hub, model.name: <folder>` loads: config, safetensors weights and
a small byte-level BPE trained on Python sources. The unembedding is padded wider than the tokenizer
(as Pythia's 50,304 rows for 50,277 tokens), so ids no text has are in the logits.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

D_MODEL, D_MLP, N_LAYERS, N_CTX = 32, 96, 2, 64
TOKENIZER_VOCAB = 300
PADDED_VOCAB = 320  # > TOKENIZER_VOCAB
FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma3")


def _python_sources(n_files: int = 40) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-f]*.py"))[:n_files]]


def tokenizer():
    """A byte-level BPE of TOKENIZER_VOCAB ids with an end-of-text token, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_python_sources(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def hf_model(family: str, eos_id: int):
    """A random-weight causal LM of `family`; d_mlp D_MLP, PADDED_VOCAB unembedding rows."""
    import transformers as tf

    common = dict(vocab_size=PADDED_VOCAB, bos_token_id=eos_id, eos_token_id=eos_id)
    if family == "gpt2":  # GPT-2, distilGPT-2: Conv1D MLP weights [d_in, d_out], LayerNorm, tied embedding
        config = tf.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=2, n_inner=D_MLP, n_positions=N_CTX, **common)
        cls = tf.GPT2LMHeadModel
    elif family == "gpt_neox":  # Pythia: Linear MLP, LayerNorm, parallel attention, untied unembedding
        config = tf.GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=2,
                                  intermediate_size=D_MLP, max_position_embeddings=N_CTX, **common)
        cls = tf.GPTNeoXForCausalLM
    elif family == "llama":  # SmolLM2, Llama: gated SiLU MLP, RMSNorm, grouped-query attention
        config = tf.LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
                                tie_word_embeddings=True, **common)
        cls = tf.LlamaForCausalLM
    elif family == "gemma3":  # gated GELU MLP, RMSNorm with (1 + weight) gains, a norm after the MLP
        config = tf.Gemma3TextConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=16, intermediate_size=D_MLP,
                                     max_position_embeddings=N_CTX, sliding_window=16, **common)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown family '{family}' (one of {FAMILIES})")
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random gains, so a norm folded in wrongly (or not at all) changes the result
        for name, parameter in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                parameter.copy_(torch.empty_like(parameter).uniform_(0.5, 1.5) * (1 if "weight" in name else 0.1))
    return model


def save_tiny_model(family: str, folder: Path) -> Path:
    """folder/ in Hugging Face format (config, model.safetensors, tokenizer files)."""
    tok = tokenizer()
    hf_model(family, tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_parts(model, family: str):
    """(MLP up projection as [d_mlp, d_model] rows, MLP output module, post-MLP norm or None, final norm), from
    the Hugging Face modules themselves, not through TransformerLens."""
    if family == "gpt2":
        block = model.transformer.h[1]
        return block.mlp.c_fc.weight.T, block.mlp.c_proj, None, model.transformer.ln_f  # Conv1D: [d_in, d_out]
    if family == "gpt_neox":
        block = model.gpt_neox.layers[1]
        return block.mlp.dense_h_to_4h.weight, block.mlp.dense_4h_to_h, None, model.gpt_neox.final_layer_norm
    block = model.model.layers[1]
    post = block.post_feedforward_layernorm if family == "gemma3" else None
    return block.mlp.up_proj.weight, block.mlp.down_proj, post, model.model.norm
