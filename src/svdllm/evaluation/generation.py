"""Generation, greedy or sampled, with the chat template when the tokenizer has one."""
from __future__ import annotations

import contextlib
import time

import torch


@torch.no_grad()
def generate_timed(model, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = True,
                   sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                  kv_cache: str = "dynamic") -> dict:
    """The continuation, how many tokens it has, and the wall time (prefill included) it took.

    kv_cache="low-rank" caches the rank-r intermediates of low-rank k/v projections (svdllm.nn.kv_cache)."""
    from ..nn.kv_cache import CACHE_KW, cache_nbytes, low_rank_kv_cache, output_cache

    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    if templated:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    # the template writes its own special tokens; a plain prompt gets the tokenizer's (BOS for Llama, Gemma)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    torch.manual_seed(seed)
    with (low_rank_kv_cache(model) if kv_cache == "low-rank" else contextlib.nullcontext()) as cache:
        if cache is not None:
            kwargs[CACHE_KW] = cache
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                             pad_token_id=pad, **kwargs)
        seconds = time.perf_counter() - t
    new, kv = out.sequences[0, inputs["input_ids"].shape[1]:], output_cache(out)
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "new_tokens": int(new.numel()),
            "seconds": seconds, "tokens_per_s": new.numel() / max(seconds, 1e-9), "kv_cache": kv_cache,
            "kv_cache_bytes": cache_nbytes(kv) if kv is not None else None}


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = True, **kw) -> str:
    return generate_timed(model, tokenizer, prompt, max_new_tokens, chat, **kw)["text"]
