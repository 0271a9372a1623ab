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
    ids = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(**_common(sliding_window=16, query_pre_attn_scalar=16, tie_word_embeddings=True, **kw))
    if family == "phi3":
        from transformers import Phi3Config

        return Phi3Config(**_common(**kw))
    if family in ("opt", "opt-proj"):
        from transformers import OPTConfig

        # opt-proj: OPT-350m's layout (embeddings in a smaller space, projected in and out; layer norm after)
        extra = dict(word_embed_proj_dim=32, do_layer_norm_before=False) if family == "opt-proj" else {}
        return OPTConfig(**ids, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, **extra, **kw)
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(**ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             rotary_pct=0.25, max_position_embeddings=512, tie_word_embeddings=False, **kw)
    # not in svdllm's table: compressed by patterns
    if family == "gptj":
        from transformers import GPTJConfig

        return GPTJConfig(**ids, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, **kw)
    if family == "stablelm":
        from transformers import StableLmConfig

        return StableLmConfig(**_common(**kw))
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **kw))
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**_common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                        shared_expert_intermediate_size=96, decoder_sparse_step=1, **kw))
    raise KeyError(family)


FAMILIES = ["llama", "llama-mha", "mistral", "qwen2", "qwen3", "gemma3"]  # the LLaMA layout
OTHER_LAYOUTS = ["gemma2", "phi3", "opt", "opt-proj", "gpt_neox"]  # listed in svdllm's table, laid out otherwise
BY_PATTERNS = ["gptj", "stablelm"]  # not listed
MOE = ["mixtral", "qwen2_moe"]  # not listed; experts stored as 3-D tensors, unfused


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=dtype)
    model.config.name_or_path = f"tiny-{family}"
    with torch.no_grad():  # random biases and norms, so that keeping them through the factorization is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or ("norm" in name or ".ln" in name) and family not in FAMILIES:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def saved_tiny(directory, family: str, tokenizer):
    """A tiny model and its tokenizer written as a Hugging Face directory, as a user's checkpoint would be."""
    tiny_model(family).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
