"""Tiny random-weight models of every supported family, built from configs, and a byte-level tokenizer."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 260


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    base.update(kw)
    return base


def tiny_config(family: str, **kw):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(**_common(**kw))
    if family == "llama-mha":
        return LlamaConfig(**_common(num_key_value_heads=4, tie_word_embeddings=True, **kw))
    if family == "mistral":
        return MistralConfig(**_common(sliding_window=None, **kw))
    if family == "qwen2":
        return Qwen2Config(**_common(tie_word_embeddings=True, **kw))  # q/k/v carry biases
    if family == "qwen3":
        return Qwen3Config(**_common(**kw))
    if family == "gemma3":
        return Gemma3TextConfig(**_common(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                          query_pre_attn_scalar=16, tie_word_embeddings=True, **kw))
    raise KeyError(family)


FAMILIES = ["llama", "llama-mha", "mistral", "qwen2", "qwen3", "gemma3"]


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=dtype)
    model.config.name_or_path = f"tiny-{family}"
    if family == "qwen2":  # random biases, so that keeping them through the factorization is tested
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                    p.normal_(0, 0.1)
    return model.eval()


def saved_tiny(directory, family: str, tokenizer):
    """A tiny model and its tokenizer written as a Hugging Face directory, as a user's checkpoint would be."""
    tiny_model(family).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
