"""The low-rank KV cache gives the logits of the ordinary cache and of no cache at all, with fewer bytes."""
import pytest
import torch
from transformers import DynamicCache

import svdllm
from svdllm.errors import SvdllmError
from svdllm.nn.kv_cache import CACHE_KW, LowRankKVLayer, cache_nbytes, low_rank_kv_cache, output_cache
from tiny import tiny_model


def _decode(model, ids, cache, steps):
    """Prefill, then greedy decode steps one token at a time; the logits of every step."""
    out = model(input_ids=ids, **{CACHE_KW: cache}, use_cache=True)
    logits, seq = [out.logits[:, -1]], ids
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        out = model(input_ids=nxt, **{CACHE_KW: output_cache(out)}, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), seq


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3"])
@torch.no_grad()
def test_low_rank_cache_equals_the_ordinary_cache_and_no_cache(family, tok):
    model = tiny_model(family)
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.5, method="svd"), progress=False)
    model.eval()
    ids = tok("The game began development in 2010 and it", return_tensors="pt").input_ids
    ref, seq = _decode(model, ids, DynamicCache(config=model.config), steps=6)
    with low_rank_kv_cache(model) as cache:
        got, seq2 = _decode(model, ids, cache, steps=6)
        assert any(isinstance(layer, LowRankKVLayer) for layer in cache.layers)
    assert torch.equal(seq, seq2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and against recomputing the whole sequence without any cache
    full = model(input_ids=seq, use_cache=False).logits[:, ids.shape[1] - 1:]
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_low_rank_cache_is_smaller_and_works_with_generate(tok):
    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.6, method="svd"), progress=False)
    ids = torch.randint(3, 250, (2, 40))
    dense_cache = DynamicCache(config=model.config)
    model(input_ids=ids, **{CACHE_KW: dense_cache}, use_cache=True)
    with low_rank_kv_cache(model) as cache:
        model(input_ids=ids, **{CACHE_KW: cache}, use_cache=True)
        low = cache_nbytes(cache)
    dense = cache_nbytes(dense_cache)
    attn = model.model.layers[0].self_attn
    per_token = 2 * attn.k_proj.out_features  # keys and values, every layer alike here
    ranks = attn.k_proj.rank + attn.v_proj.rank
    rotary = 2 * attn.head_dim  # cos and sin, once for the model (and once for the batch: same positions)
    layers = len(model.model.layers)
    assert dense == 2 * 40 * layers * per_token * 4
    assert low == (2 * 40 * layers * ranks + 40 * rotary) * 4
    assert low < dense
    with low_rank_kv_cache(model) as cache:
        a = model.generate(ids[:1, :10], **{CACHE_KW: cache}, max_new_tokens=5, do_sample=False)
    b = model.generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_dense_model_is_refused(tok):
    with pytest.raises(SvdllmError, match="low-rank"):
        with low_rank_kv_cache(tiny_model("llama")):
            pass
